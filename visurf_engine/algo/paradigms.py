"""How one step's batch becomes per-sequence advantages and weights for the fused loss.

Paradigms (DESIGN.md §1): ``sft`` trains on the gold only (``-token-mean log pi(y*)``);
``rlvr`` is GRPO on the G rollouts; ``visurf`` is GRPO over the G+1 group whose last member
is the gold; ``sft_then_rlvr`` is ``sft`` for ``sft_steps`` steps, then ``rlvr``.

Aggregation enters the kernel as a per-token weight ``w_t`` that is constant within a
sequence s of length L_s, over the S sequences / T tokens of the global (all-ranks)
optimizer batch:

    token-mean               w = 1 / T
    seq-mean-token-mean      w = 1 / (S * L_s)
    seq-mean-token-sum-norm  w = 1 / (S * L_max)   (Dr.GRPO; L_max = generation budget)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantages import group_advantages


@dataclass
class Member:
    """One sequence to train on: a completion of prompt ``prompt`` with its advantage."""

    prompt: int  # index into the step's prompts
    tokens: list[int]  # completion token ids
    adv: float
    gold: bool = False
    logprob_loss: bool = False  # -A * log pi (no ratio, no clip) instead of the PPO surrogate


def phase_of(paradigm: str, step: int, sft_steps: int) -> str:
    """The objective used at ``step``: ``sft``, ``rlvr`` or ``visurf``."""
    if paradigm == "sft_then_rlvr":
        return "sft" if step < sft_steps else "rlvr"
    return paradigm


def assign_advantages(
    phase: str,
    num_prompts: int,
    rollout_rewards: torch.Tensor | None,
    gold_rewards: torch.Tensor | None,
    smoothed: torch.Tensor | None,
    *,
    norm_by_std: bool,
    eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(rollout_adv[B, G] | None, gold_adv[B] | None)`` for ``phase``.

    SFT gives every gold advantage 1. ViSurf normalises over the G+1 group; a smoothed
    gold's advantage is exactly 0 (analytically ``r* = mu``; set so rounding leaves none).
    """
    if phase == "sft":
        return None, torch.ones(num_prompts)
    if phase == "rlvr":
        return group_advantages(rollout_rewards, norm_by_std=norm_by_std, eps=eps), None
    adv = group_advantages(torch.cat([rollout_rewards, gold_rewards[:, None]], dim=1), norm_by_std=norm_by_std, eps=eps)
    gold_adv = torch.where(smoothed, torch.zeros_like(adv[:, -1]), adv[:, -1])
    return adv[:, :-1], gold_adv


def build_members(
    rollouts: list[list[list[int]]] | None,
    rollout_adv: torch.Tensor | None,
    gold_tokens: list[list[int]] | None,
    gold_adv: torch.Tensor | None,
    *,
    gold_logprob_loss: bool,
) -> list[Member]:
    """Members in prompt order: the G rollouts of prompt b, then its gold."""
    num_prompts = len(rollouts) if rollouts is not None else len(gold_tokens)
    members = []
    for b in range(num_prompts):
        if rollouts is not None:
            members += [Member(b, toks, float(a)) for toks, a in zip(rollouts[b], rollout_adv[b].tolist())]
        if gold_tokens is not None:
            members.append(Member(b, gold_tokens[b], float(gold_adv[b]), gold=True, logprob_loss=gold_logprob_loss))
    return members


def sequence_weights(
    lengths: torch.Tensor, aggregation: str, *, num_seqs: int, num_tokens: int, max_len: int
) -> torch.Tensor:
    """Per-sequence token weight ``[S]`` (see module docstring); counts are global."""
    lengths = lengths.double()
    if aggregation == "token-mean":
        w = torch.full_like(lengths, 1.0 / max(num_tokens, 1))
    elif aggregation == "seq-mean-token-mean":
        w = 1.0 / (num_seqs * lengths.clamp(min=1))
    elif aggregation == "seq-mean-token-sum-norm":
        w = torch.full_like(lengths, 1.0 / (num_seqs * max_len))
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return w.float()
