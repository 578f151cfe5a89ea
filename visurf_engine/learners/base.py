"""The learner seam: one protocol every training backend implements (``docs/design.md`` §3).

A learner owns the trainable weights and their optimizer. One optimizer step is

    stats = learner.forward_backward(micro_batches)  # fused loss + backward per micro-batch;
                                                     # gradients accumulated, reduced over data parallel
    update = learner.step(grad_clip, loss_finite=..) # global grad norm, non-finite guard, clip,
                                                     # optimizer step (or none), zero grads

and ``export_weights()`` then streams the updated weights, under the Hugging Face names of the
policy's ``state_dict``, to the rollout engine (``load_weights`` is the inverse, for resume);
``logprobs(...)`` is the no-grad pass of the current weights (the old log-probs of
``algo.updates_per_step > 1``). The trainer holds one learner, chosen once
(``learners.build_learner``), and never asks which backend it is.

**Lockstep.** Every rank of the learner's world runs ``forward_backward`` and ``logprobs``
together, on the same number of micro-batches (``lockstep_split``): data parallelism
synchronises inside them (DDP's one reduced backward, FSDP's per-layer all-gathers).

A ``MicroBatch`` is a collated set of (prompt, completion) sequences with its per-completion-
token loss inputs ``[N]`` (``make_micro_batch``); ``forward_backward`` returns, per
micro-batch, the detached loss and the kernel's per-token stats (``logp``, ``clipped``,
``entropy``).

The non-finite guard lives in ``step``, the same for every backend: a non-finite global grad
norm, or a non-finite loss on any rank, skips the optimizer step on every rank (the gradients
are zeroed, the weights and optimizer state left as they were) and the returned ``Update``
says so; counting and stopping are the trainer's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from visurf_kernels import LossSpec

from ..algo.members import Members, per_token
from ..models.policy import Batching, Policy, Prompts, SequenceBatch
from ..models.weights import TensorSpec, module_specs
from ..durable import durable
from ..parallel.world import World, all_reduce, any_rank


@dataclass
class MicroBatch:
    """Model inputs of S sequences and their loss inputs per completion token (``[N]`` each)."""

    batch: SequenceBatch
    old_logp: torch.Tensor | None  # None: on-policy (ratio 1)
    adv: torch.Tensor  # float32
    w: torch.Tensor  # float32: the aggregation weight (``algo.members.sequence_weights``)
    objective: torch.Tensor  # int64: each token's objective (a code of visurf_kernels.OBJECTIVES)
    ref_logp: torch.Tensor | None = None  # the reference policy's log-probs (KL penalty)
    rollout_logp: torch.Tensor | None = None  # the engine's sampling log-probs (NaN: the gold); None: none


def make_micro_batch(
    policy: Policy, prompts: Prompts, members: Members, weights: torch.Tensor, batching: Batching
) -> MicroBatch:
    """Collate ``members`` (per-sequence ``weights[S]``; padded or packed as ``batching`` says)
    and broadcast their advantage, weight and objective to their tokens; their ``old_logp``,
    ``ref_logp`` and ``rollout_logp`` (if any) are concatenated."""
    batch = policy.collate(prompts, members.prompt.tolist(), members.tokens, batching)
    dev = batch.targets.device

    def cat(values):
        return torch.cat(values).to(dev) if values is not None else None

    return MicroBatch(
        batch=batch,
        old_logp=cat(members.old_logp),
        ref_logp=cat(members.ref_logp),
        rollout_logp=cat(members.rollout_logp),
        adv=per_token(members.adv, batch.lengths).to(dev),
        w=per_token(weights, batch.lengths).to(dev),
        objective=per_token(members.objective, batch.lengths).to(dev),
    )


LossStats = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (detached loss, per-token stats)


class Update(NamedTuple):
    """What ``Learner.step`` did: the global grad norm before clipping, and whether the
    optimizer step was skipped (non-finite loss or norm)."""

    grad_norm: float
    skipped: bool


class Learner(ABC):
    """The protocol (module docstring), with the optimizer bookkeeping and the checkpoint format
    of a learner whose ranks each hold the whole model (``hf``); sharded learners override
    ``save_state`` / ``load_state`` and ``reference``."""

    policy: Policy  # the trainer's view of the model: encode, collate, tokenizer, the module
    spec: LossSpec
    dp: World  # the data-parallel view of the world: the trainer splits prompts over it
    optimizer: torch.optim.Optimizer
    packs: bool = True  # takes packed micro-batches (models.collate); False: padded only
    shares_module: bool = True  # policy.model holds the current weights and can generate (rollout.hf, shared)
    stable_export: bool = True  # export_weights yields tensors whose storage never moves (the weights themselves)

    @property
    def run_world(self) -> World:
        """Every rank this learner's model lives on (they agree on skipping a step): the
        data-parallel world here; a model-parallel learner's whole world."""
        return self.dp

    @abstractmethod
    def forward_backward(self, micro: Sequence[MicroBatch]) -> list[LossStats]:
        """Loss and backward of every micro-batch; gradients accumulate and are reduced."""

    @abstractmethod
    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                 batching: Batching) -> torch.Tensor:  # fmt: skip
        """Per-token ``logp[N]`` of ``completions[s]`` after prompt ``idx[s]`` under the current
        weights (no grad; the loss spec's temperature), in order; every rank calls it together."""

    @abstractmethod
    def clip_grads(self, grad_clip: float) -> float:
        """The global grad norm ``|g|`` of the reduced gradients, the same on every rank;
        the gradients scaled by ``min(1, grad_clip / (|g| + 1e-6))``."""

    @abstractmethod
    def zero_grads(self) -> None:
        """Clear the accumulated gradients."""

    def step(self, grad_clip: float, *, loss_finite: bool = True) -> Update:
        """Clip, optimizer step, zero the grads, unless ``|g|`` or this or another rank's loss
        (``loss_finite``) is non-finite: then no rank steps.

        The ranks agree: ``|g|`` is computed from gradients already reduced over data
        parallel (and its squares over model parallel), so it is identical everywhere, but a
        loss is rank-local, so the skip flag is MAX-reduced over ``run_world`` (one scalar).
        """
        norm = self.clip_grads(grad_clip)
        skip = any_rank(not (loss_finite and math.isfinite(norm)), self.run_world)
        if not skip:
            self.optimizer_step()
        self.zero_grads()
        return Update(norm, skip)

    def optimizer_step(self) -> None:
        """Update the weights from the clipped gradients (``step`` calls it unless it skips)."""
        self.optimizer.step()

    @abstractmethod
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights, ``(HF state_dict name, tensor)``; every rank must consume it."""

    def weight_specs(self) -> tuple[dict[str, TensorSpec], dict[str, str]]:
        """Names, global shapes and dtypes of what ``export_weights`` yields, and its tied aliases
        (``models.weights.named_specs``), without touching tensor data."""
        return module_specs(self.policy.model)

    @abstractmethod
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Set the weights from HF-named tensors (e.g. a checkpoint loaded into the policy)."""

    def share(self, obj: Any) -> Any:
        """What every rank training the same model replica uses: ``obj`` of the replica's first
        rank (model parallel), or ``obj`` itself when each rank holds a whole replica."""
        return obj

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reference(self, path: str | Path):
        """The KL penalty's frozen reference of the checkpoint at ``path``, held as this learner
        holds its weights (here: a whole replica per rank, ``learners.reference``)."""
        from .reference import Reference

        return Reference.load(path, self.policy, self.spec)

    def save_state(self, directory: Path, world: World) -> None:
        """Write the weights (``model.safetensors``, HF names, tied weights once) and the optimizer
        state (``optimizer.pt``) into ``directory``; rank 0 writes, every file fsynced."""
        if world.is_main:
            durable(directory / "model.safetensors", lambda p: save_model(self.policy.model, str(p)))
            durable(directory / "optimizer.pt", lambda p: torch.save(self.optimizer.state_dict(), p))

    def load_state(self, directory: Path, rank: int) -> None:
        """Restore what ``save_state`` wrote."""
        load_model(self.policy.model, str(directory / "model.safetensors"), strict=True)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))


def lockstep_split(batching: Batching, seq_tokens: Sequence[int], world: World) -> list[range]:
    """``batching.split(seq_tokens)`` into as many micro-batches as any rank of ``world`` needs
    (one MAX all-reduce), so that every rank runs the same number of forwards."""
    parts = len(batching.split(seq_tokens))
    if world.size > 1:
        parts = int(all_reduce(torch.tensor([parts]), world.group, op=dist.ReduceOp.MAX).item())
    return batching.split(seq_tokens, parts)


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients of ``params`` by ``min(1, max_norm / (|g| + 1e-6))`` and return ``|g|``,
    their L2 norm: ``torch.nn.utils.clip_grad_norm_`` exactly."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def adamw(params: Iterable[torch.nn.Parameter], **optim) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` with the fused implementation (one kernel over all
    tensors, on CPU as on CUDA; FSDP2's DTensor shards included): on CPU 4.2 ms a step against 12.1
    for torch's default per-tensor loop over the tiny model's 81 tensors (1.15 M parameters, one
    thread), the same update up to float rounding."""
    return torch.optim.AdamW(params, fused=True, **optim)
