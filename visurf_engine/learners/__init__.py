"""Training backends behind one protocol (``base.Learner``), chosen once by ``model.backend``.

``parallel_world(cfg, world)`` initialises the backend's parallel state and returns the
data-parallel view the trainer splits prompts over (``hf``: the world itself; ``megatron``:
``parallel.tp x parallel.pp`` model parallel, data parallel over the rest);
``build_learner(cfg, policy, spec, dp)`` builds the learner over the loaded policy.
"""

from __future__ import annotations

from visurf_kernels import LossSpec

from ..config import Config
from ..models.policy import Policy
from ..parallel.data_parallel import World
from .base import Learner, LossStats, MicroBatch, clip_grad_norm, make_micro_batch
from .hf import HFLearner


def parallel_world(cfg: Config, world: World) -> World:
    if cfg.model.backend == "megatron":
        from ..parallel.megatron import init_megatron  # megatron-core: the optional [megatron] extra

        return init_megatron(world, cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    return world


def build_learner(cfg: Config, policy: Policy, spec: LossSpec, dp: World) -> Learner:
    t = cfg.train
    optim = dict(lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    if cfg.model.backend == "megatron":
        from .megatron.convert import Layout
        from .megatron.learner import MegatronLearner

        layout = Layout.from_hf_config(policy.model.config, cfg.parallel.tp, cfg.parallel.pp)
        return MegatronLearner(policy.model, layout, spec, dp, **optim)
    return HFLearner(policy, spec, dp, **optim)


__all__ = ["HFLearner", "Learner", "LossStats", "MicroBatch", "build_learner", "clip_grad_norm", "make_micro_batch",
           "parallel_world"]
