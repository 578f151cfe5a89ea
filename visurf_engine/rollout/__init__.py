"""Generation backends behind one protocol (``base.RolloutEngine``), chosen once by ``rollout.backend``.

This ``__init__`` imports nothing heavy: ``visurf_engine/__init__`` imports ``vllm_cpu`` from here
before anything imports transformers.
"""

from __future__ import annotations


def build_rollout(cfg, policy):
    """The engine of ``cfg.rollout.backend`` over ``policy`` (``Config``, ``Policy``)."""
    from .hf import HFRollout

    return HFRollout(policy, cfg.rollout)
