"""Fused LM-head policy-loss kernels (installed as ``visurf_engine.kernels``).

Public API (DESIGN.md §2):

- ``fused_policy_loss(hidden, lm_weight, targets, old_logp, adv, w, ...) -> (loss, stats)``:
  scalar ``sum_t w_t * loss_t``; gradients flow to ``hidden`` and ``lm_weight``; ``stats``
  holds ``logp[N]`` (float32), ``clipped[N]`` (bool) and, with ``with_entropy``,
  ``entropy[N]`` (float32, no gradient).
- ``fused_logprobs(hidden, lm_weight, targets, ...) -> (logp[N] float32, entropy | None)``,
  no grad (the old-log-prob pass).
- ``FusedPolicyLoss``: ``nn.Module`` wrapper holding the settings, for other stacks (TRL, verl).

Backends: ``triton`` (GPU kernels, ``triton_policy_loss``), ``torch`` (chunked torch ops,
``chunked``; the CPU path), ``reference`` (eager, materialised logits: the test oracle, no
vocab parallelism). ``auto`` picks ``triton`` for CUDA tensors when triton is importable
(and rows are TMA-aligned: ``H * itemsize % 16 == 0``), else ``torch``. The fused backends never hold an ``[N, V]`` tensor and compute the
gradients during the forward pass (``function``).

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
from .reference import IGNORE_INDEX, fused_policy_loss_reference, logprobs_reference, policy_loss_from_logp

BACKENDS = ("auto", "triton", "torch", "reference")


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
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    logprob_mask: torch.Tensor | None = None,
    with_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    tp_group=None,
    vocab_start: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar ``sum_t w_t * loss_t`` of the PPO-clip / log-prob objective; see ``reference``.

    ``old_logp=None``: on-policy (``old_logp = logp`` detached, ``rho = 1``).
    """
    name = resolve_backend(backend, hidden, tp_group)
    if name == "reference":
        return fused_policy_loss_reference(
            hidden,
            lm_weight,
            targets,
            old_logp,
            adv,
            w,
            temperature=temperature,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            logprob_mask=logprob_mask,
            with_entropy=with_entropy,
            ignore_index=ignore_index,
        )
    return function.policy_loss(
        _engine(name, hidden.dtype),
        hidden,
        lm_weight,
        targets,
        old_logp,
        adv,
        w,
        logprob_mask=logprob_mask,
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        with_entropy=with_entropy,
        ignore_index=ignore_index,
        tp_group=tp_group,
        vocab_start=vocab_start,
    )


@torch.no_grad()
def fused_logprobs(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    tp_group=None,
    vocab_start: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad per-token ``logp[N]`` (float32) and optional entropy ``[N]``."""
    name = resolve_backend(backend, hidden, tp_group)
    if name != "reference":
        return function.logprobs(
            _engine(name, hidden.dtype),
            hidden,
            lm_weight,
            targets,
            temperature=temperature,
            with_entropy=with_entropy,
            ignore_index=ignore_index,
            tp_group=tp_group,
            vocab_start=vocab_start,
        )
    logp, ent = logprobs_reference(
        hidden, lm_weight, targets, temperature=temperature, with_entropy=with_entropy, ignore_index=ignore_index
    )
    return logp.float(), (ent.float() if ent is not None else None)


from .module import FusedPolicyLoss  # noqa: E402  (uses fused_policy_loss)

__all__ = [
    "fused_policy_loss",
    "fused_logprobs",
    "FusedPolicyLoss",
    "policy_loss_from_logp",
    "resolve_backend",
    "IGNORE_INDEX",
    "BACKENDS",
]
