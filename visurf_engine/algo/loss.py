"""The policy loss of one micro-batch of members, through the fused kernel contract.

Each member's advantage, weight and loss kind are broadcast to its completion tokens
(``[N]`` rows); the final hidden states ``[N, H]`` and the LM head go to
``visurf_engine.kernels.fused_policy_loss``, so no ``[N, V]`` logits are materialised by
the fast backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..kernels import fused_logprobs, fused_policy_loss
from ..models.policy import Policy, Prompts, SequenceBatch
from .paradigms import Member


def _per_token(values: Sequence[float], lengths: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(values, dtype=dtype), lengths).to(device)


@dataclass
class LossInputs:
    """A collated micro-batch and its per-completion-token loss inputs (``[N]`` each)."""

    batch: SequenceBatch
    old_logp: torch.Tensor | None  # None: on-policy (ratio 1)
    adv: torch.Tensor
    w: torch.Tensor
    logprob_mask: torch.Tensor  # bool: rows with the ``-A log pi`` loss


def loss_inputs(
    policy: Policy, prompts: Prompts, members: Sequence[Member], weights: torch.Tensor, old_logp: torch.Tensor | None
) -> LossInputs:
    """Collate ``members`` and broadcast their advantage, weight and loss kind to tokens."""
    batch = policy.collate(prompts, [m.prompt for m in members], [m.tokens for m in members])
    dev = batch.targets.device
    return LossInputs(
        batch=batch,
        old_logp=old_logp,
        adv=_per_token([m.adv for m in members], batch.lengths, dev),
        w=_per_token(weights.tolist(), batch.lengths, dev),
        logprob_mask=_per_token([m.logprob_loss for m in members], batch.lengths, dev, torch.bool),
    )


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
    x = loss_inputs(policy, prompts, members, weights, old_logp)
    loss, stats = fused_policy_loss(
        policy.completion_hidden(x.batch),
        policy.lm_head_weight,
        x.batch.targets,
        x.old_logp,
        x.adv,
        x.w,
        temperature=temperature,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        logprob_mask=x.logprob_mask,
        with_entropy=with_entropy,
        backend=backend,
    )
    return loss, stats, x.batch.lengths


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
