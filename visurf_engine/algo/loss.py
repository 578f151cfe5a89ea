"""The policy loss of one micro-batch of members, through the fused kernel contract.

Each member's advantage, weight and loss kind are broadcast to its completion tokens
(``[N]`` rows); the final hidden states ``[N, H]`` and the LM head go to
``visurf_engine.kernels.fused_policy_loss``, so no ``[N, V]`` logits are materialised by
the fast backends.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..kernels import fused_logprobs, fused_policy_loss
from ..models.policy import Policy, Prompts
from .paradigms import Member


def _per_token(values: Sequence[float], lengths: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(values, dtype=dtype), lengths).to(device)


def members_loss(
    policy: Policy,
    prompts: Prompts,
    members: Sequence[Member],
    weights: torch.Tensor,
    *,
    old_logp: torch.Tensor | None,
    temperature: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    backend: str,
    with_entropy: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(loss, stats, lengths)`` for ``members`` with per-sequence ``weights[S]``.

    ``old_logp[N]`` (or None: on-policy, ratio 1) is per completion token in member order.
    ``stats`` holds the kernel's per-token ``logp``, ``clipped`` and optional ``entropy``.
    """
    batch = policy.collate(prompts, [m.prompt for m in members], [m.tokens for m in members])
    hidden = policy.completion_hidden(batch)
    dev = hidden.device
    loss, stats = fused_policy_loss(
        hidden,
        policy.lm_head_weight,
        batch.targets,
        old_logp,
        _per_token([m.adv for m in members], batch.lengths, dev),
        _per_token(weights.tolist(), batch.lengths, dev),
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        logprob_mask=_per_token([m.logprob_loss for m in members], batch.lengths, dev, torch.bool),
        with_entropy=with_entropy,
        backend=backend,
    )
    return loss, stats, batch.lengths


@torch.no_grad()
def members_logprobs(
    policy: Policy, prompts: Prompts, members: Sequence[Member], *, temperature: float, backend: str
) -> torch.Tensor:
    """Per-token ``logp[N]`` of ``members`` under the current policy (the old-log-prob pass)."""
    batch = policy.collate(prompts, [m.prompt for m in members], [m.tokens for m in members])
    logp, _ = fused_logprobs(
        policy.completion_hidden(batch), policy.lm_head_weight, batch.targets, temperature=temperature, backend=backend
    )
    return logp
