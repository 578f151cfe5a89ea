"""Fused LM-head policy-loss kernels (installed as ``visurf_engine.kernels``).

Public API (DESIGN.md §2):

- ``fused_policy_loss(hidden, lm_weight, targets, old_logp, adv, w, ...) -> (loss, stats)``
- ``fused_logprobs(hidden, lm_weight, targets, ...) -> (logp, entropy | None)`` (no grad)

Backends: ``reference`` (eager, materialised logits: the oracle). ``auto`` picks the
fastest backend available for the device.
"""

from __future__ import annotations

import torch

from .reference import IGNORE_INDEX, fused_policy_loss_reference, logprobs_reference, policy_loss_from_logp

BACKENDS = ("auto", "reference")


def _resolve(backend: str, device: torch.device, tp_group) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = "reference"
    if backend == "reference" and tp_group is not None:
        raise ValueError("the reference backend does not run vocab-parallel (tp_group given)")
    return backend


def fused_policy_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
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
    """Scalar ``sum_t w_t * loss_t`` of the PPO-clip / log-prob objective; see ``reference``."""
    _resolve(backend, hidden.device, tp_group)
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
    _resolve(backend, hidden.device, tp_group)
    logp, ent = logprobs_reference(
        hidden, lm_weight, targets, temperature=temperature, with_entropy=with_entropy, ignore_index=ignore_index
    )
    return logp.float(), (ent.float() if ent is not None else None)


__all__ = ["fused_policy_loss", "fused_logprobs", "policy_loss_from_logp", "IGNORE_INDEX", "BACKENDS"]
