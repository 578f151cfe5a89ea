"""Training backends behind one protocol (``base.Learner``), chosen once by ``model.backend``.

``parallel_world(cfg, world)`` initialises the backend's parallel state and returns the
data-parallel view the trainer splits prompts over (``hf``, ``fsdp``: the world itself;
``megatron``: ``parallel.tp x parallel.pp`` model parallel, data parallel over the rest);
``build_learner(cfg, path, processor, precision, spec, dp)`` loads the checkpoint at ``path``
the way the backend holds it (``hf``: a whole replica per rank; ``fsdp``: each rank its shards;
``megatron``: each rank its tensor/pipeline shard) and returns the learner, whose ``policy``
is the trainer's view of the model (encode, collate, tokenizer); ``build_reference`` the KL
penalty's frozen reference, held like the learner holds the policy.
"""

from __future__ import annotations

from pathlib import Path

from visurf_kernels import LossSpec

from ..config import Config
from ..models.hf import ImageOnlyProcessor, load_model
from ..models.policy import Policy
from ..models.precision import Precision
from ..parallel.world import World
from .base import Learner, LossStats, MicroBatch, clip_grad_norm, lockstep_split, make_micro_batch
from .hf import HFLearner
from .reference import Reference


def parallel_world(cfg: Config, world: World) -> World:
    if cfg.model.backend == "megatron":
        from ..parallel.megatron import init_megatron  # megatron-core: the optional [megatron] extra

        return init_megatron(world, cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    return world


def build_learner(cfg: Config, path: str | Path, processor: ImageOnlyProcessor, precision: Precision, spec: LossSpec,
                  dp: World) -> Learner:  # fmt: skip
    t = cfg.train
    optim = dict(lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    if cfg.model.backend == "fsdp":
        from .fsdp import FSDPLearner

        return FSDPLearner.load(path, processor, precision, spec, dp, cfg.fsdp,
                                activation_checkpointing=t.activation_checkpointing, **optim)  # fmt: skip
    if cfg.model.backend == "megatron":
        from .megatron.learner import MegatronLearner

        return MegatronLearner.load(path, processor, precision, spec, dp, cfg.parallel,
                                    activation_checkpointing=t.activation_checkpointing, **optim)  # fmt: skip
    model = load_model(path, dtype=precision.master, device=dp.device)
    return HFLearner(Policy(model, processor, dp.device, precision), spec, dp,
                     activation_checkpointing=t.activation_checkpointing, **optim)  # fmt: skip


def build_reference(cfg: Config, path: str | Path, learner: Learner):
    """The KL penalty's reference (``algo.kl_coef > 0``; else None): the learner's own kind
    (``Learner.reference``), or a whole frozen replica in the compute dtype."""
    if cfg.algo.kl_coef <= 0:
        return None
    return learner.reference(path)


__all__ = ["HFLearner", "Learner", "LossStats", "MicroBatch", "Reference", "build_learner", "build_reference",
           "clip_grad_norm", "lockstep_split", "make_micro_batch", "parallel_world"]
