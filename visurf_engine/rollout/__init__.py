"""Generation backends behind one protocol (``base.RolloutEngine``), chosen once by ``rollout.backend``.

This ``__init__`` imports nothing heavy: ``visurf_engine/__init__`` imports ``vllm_cpu`` from here
before anything imports transformers.
"""

from __future__ import annotations

from pathlib import Path


def build_rollout(cfg, policy, model_dir: str | Path):
    """The engine of ``cfg.rollout.backend`` over ``policy`` (``Config``, ``Policy``), holding the
    policy's current weights; ``model_dir``: the checkpoint the policy was loaded from (vLLM
    builds its engine over it, one per rank)."""
    if cfg.rollout.backend == "vllm":
        from .vllm import VLLMRollout

        return VLLMRollout.from_policy(policy, model_dir, cfg.rollout)
    from .hf import HFRollout

    return HFRollout(policy, cfg.rollout)
