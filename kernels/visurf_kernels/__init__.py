"""visurf_kernels: the fused LM-head policy loss, as a package of its own (torch + triton only).

Public API (``docs/design.md`` §2 of visurf-engine); every entry point takes a ``LossSpec``,
the loss options held once (``spec``):

- ``fused_policy_loss(hidden, lm_weight, targets, old_logp, adv, w, spec, objective=None,
  *, tp_group=None, vocab_start=0) -> (loss, stats)``:
  scalar ``sum_t w_t * loss_t``, each token's objective chosen by ``objective[N]`` (codes of
  ``OBJECTIVES``: ``ppo``, ``logprob``, ``shaped``, ``dft``, ``phi``; a bool mask: ``logprob``
  where True; None: ``ppo``); gradients flow to ``hidden`` and ``lm_weight``; ``stats``
  holds ``logp[N]`` (float32), ``clipped[N]`` (bool) and, with ``with_entropy``,
  ``entropy[N]`` (float32, no gradient).
- ``fused_logprobs(hidden, lm_weight, targets, spec, *, tp_group=None, vocab_start=0)
  -> (logp[N] float32, entropy | None)``, no grad (the old-log-prob pass);
  ``fused_logprobs_grad`` (same arguments): ``logp`` with a gradient, for stacks whose loss
  takes log-probs.
- ``FusedPolicyLoss(spec)``: ``nn.Module`` wrapper holding the spec, for other stacks (TRL, verl).
- ``policy_loss_from_logp(logp, old_logp, adv, w, spec, objective=None, *, ref_logp=None,
  rollout_logp=None)``: the elementwise objective on given log-probs (what every backend and
  other stacks' loss hooks share); ``kl_penalty`` and ``truncated_is_ratio``: its KL term
  (``spec.kl_coef``) and TIS weight (``spec.tis_cap``) on their own.

Backends: ``triton`` (GPU kernels, ``triton_policy_loss``), ``torch`` (chunked torch ops,
``chunked``; the CPU path), ``reference`` (eager, materialised logits: the test oracle, no
vocab parallelism). ``auto`` picks ``triton`` for CUDA tensors when triton is importable
(and rows are TMA-aligned: ``H * itemsize % 16 == 0``), else ``torch``. The fused backends
never hold an ``[N, V]`` tensor and compute the gradients during the forward pass
(``function``).

Vocab parallel (``tp_group``, ``vocab_start``): each rank passes its shard
``lm_weight[V_local, H]`` holding vocabulary rows ``vocab_start .. vocab_start + V_local``;
loss and stats are the full-vocabulary ones on every rank, ``d lm_weight`` is the rank's
shard, and ``d hidden`` is a per-rank partial that the caller sums over the TP group
(its tensor-parallel region mapping).
"""

from __future__ import annotations

import importlib.util

import torch

from . import function
from .chunked import TorchTiles
from .reference import (OBJECTIVES, fused_policy_loss_reference, kl_penalty, logprobs_reference,
                        policy_loss_from_logp, truncated_is_ratio)  # fmt: skip
from .spec import BACKENDS, IGNORE_INDEX, LossSpec


def resolve_backend(backend: str, hidden: torch.Tensor, tp_group=None) -> str:
    """The concrete backend for ``backend`` and ``hidden[N, H]``. ``auto``: ``triton`` for CUDA
    bf16/fp16/fp32 tensors when triton is importable and rows are TMA-aligned
    (``H * itemsize % 16 == 0``, true of every real model), else ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        fits = hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
        fits = fits and hidden.shape[-1] * hidden.element_size() % 16 == 0
        backend = "triton" if hidden.is_cuda and fits and importlib.util.find_spec("triton") else "torch"
    if backend == "reference" and tp_group is not None:
        raise ValueError("the reference backend does not run vocab-parallel (tp_group given)")
    return backend


def _engine(name: str, dtype: torch.dtype):
    if name == "triton":
        from .triton_policy_loss import TritonTiles

        return TritonTiles.for_dtype(dtype)
    return TorchTiles()


def fused_policy_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    w: torch.Tensor,
    spec: LossSpec = LossSpec(),
    objective: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    tp_group=None,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar ``sum_t w_t * loss_t`` of each token's objective (``objective[N]``: PPO-clip by
    default; see ``reference``) plus the KL penalty against ``ref_logp[N]`` when
    ``spec.kl_coef > 0``. ``rollout_logp[N]``
    (NaN: not sampled by the engine) enters only with ``spec.tis_cap`` (truncated IS weights).

    ``old_logp=None``: on-policy (``old_logp = logp`` detached, ``rho = 1``).
    """
    name = resolve_backend(spec.backend, hidden, tp_group)
    if name == "reference":
        return fused_policy_loss_reference(hidden, lm_weight, targets, old_logp, adv, w, spec, objective,
                                           ref_logp=ref_logp, rollout_logp=rollout_logp)  # fmt: skip
    return function.policy_loss(
        _engine(name, hidden.dtype), hidden, lm_weight, targets, old_logp, adv, w, spec, objective,
        ref_logp=ref_logp, rollout_logp=rollout_logp, tp_group=tp_group, vocab_start=vocab_start,
    )  # fmt: skip


def _logprobs(run, hidden, lm_weight, targets, spec: LossSpec, tp_group, vocab_start):
    """Dispatch of the two log-prob entry points: ``run`` (``function.logprobs`` or
    ``function.logprobs_grad``) on the backend's tile engine, or the reference."""
    name = resolve_backend(spec.backend, hidden, tp_group)
    if name != "reference":
        return run(_engine(name, hidden.dtype), hidden, lm_weight, targets, spec, tp_group=tp_group, vocab_start=vocab_start)
    logp, ent = logprobs_reference(hidden, lm_weight, targets, spec)
    return logp.float(), (ent.detach().float() if ent is not None else None)


@torch.no_grad()
def fused_logprobs(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    tp_group=None,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad per-token ``logp[N]`` (float32) and, with ``spec.with_entropy``, entropy ``[N]``."""
    return _logprobs(function.logprobs, hidden, lm_weight, targets, spec, tp_group, vocab_start)


def fused_logprobs_grad(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    tp_group=None,
    vocab_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``logp[N]`` (float32) with a gradient to ``hidden`` and ``lm_weight``, and with
    ``spec.with_entropy`` the entropy ``[N]`` (no gradient): the LM head for stacks whose loss
    takes log-probs (verl's fused forward). The backward recomputes the softmax statistics, so
    ``[N, V]`` never exists; prefer ``fused_policy_loss`` where the loss's inputs are at hand."""
    return _logprobs(function.logprobs_grad, hidden, lm_weight, targets, spec, tp_group, vocab_start)


from .module import FusedPolicyLoss  # noqa: E402  (uses fused_policy_loss)

__all__ = [
    "LossSpec",
    "OBJECTIVES",
    "fused_policy_loss",
    "fused_logprobs",
    "fused_logprobs_grad",
    "FusedPolicyLoss",
    "policy_loss_from_logp",
    "kl_penalty",
    "truncated_is_ratio",
    "resolve_backend",
    "IGNORE_INDEX",
    "BACKENDS",
]
