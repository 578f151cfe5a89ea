"""Generation backends behind one protocol (``base.RolloutEngine``), chosen once by ``rollout.backend``
(``auto`` is resolved to ``hf`` or ``vllm`` before: ``auto.resolve``).

This ``__init__`` imports nothing heavy: ``visurf_engine/__init__`` imports ``vllm_cpu`` from here
before anything imports transformers.
"""

from __future__ import annotations

from pathlib import Path


def build_rollout(cfg, policy, model_dir: str | Path, learner, batching):
    """The engine of ``cfg.rollout.backend`` over ``policy`` (``Config``, ``Policy``), holding the
    learner's current weights (``learner.export_weights()``); ``model_dir``: the checkpoint the
    policy was loaded from (vLLM builds its engine over it, one per rank; a replica of a sharded
    learner is loaded from it); ``batching``: the micro-batches of the HF engine's scoring pass."""
    if cfg.rollout.backend == "auto":
        raise ValueError("rollout.backend=auto: resolve it before building the engine (rollout.auto.resolve; the Trainer does)")
    if cfg.rollout.backend == "vllm":
        from .vllm import VLLMRollout

        return VLLMRollout.from_learner(learner, model_dir, cfg.rollout)
    import torch

    from .hf import HFRollout
    from .replica import Replica

    h = cfg.rollout.hf
    use_replica = h.replica if h.replica is not None else not learner.shares_module
    if not use_replica and not learner.shares_module:
        raise ValueError(f"model.backend={cfg.model.backend} holds no whole module to generate with: set "
                         "rollout.hf.replica=true (or leave it null) or rollout.backend=vllm")  # fmt: skip
    replica = Replica.of(learner, model_dir, getattr(torch, h.dtype)) if use_replica else None
    engine = HFRollout(policy, cfg.rollout, replica=replica, batching=batching, spec=learner.spec)
    if replica is not None:
        engine.sync_weights(learner.export_weights())
    return engine
