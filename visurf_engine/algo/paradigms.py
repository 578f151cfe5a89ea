"""Paradigms by name: what each step trains on (``docs/design.md`` §1), as a registry.

A ``Paradigm`` maps a step to a ``Phase``; a phase declares whether the step samples G
rollouts per prompt, whether the gold answer joins the group as a member (and whether it is
scored under the reward controls), how the members' advantages are formed, and which loss
the gold's tokens take. Registered:

    sft            gold only, A* = 1, loss -A* log pi (with token-mean weights: the SFT NLL)
    rlvr           G rollouts, GRPO advantages over the G
    visurf         G rollouts + the reward-controlled gold, GRPO over the G + 1;
                   a smoothed gold's advantage is exactly 0
    sft_then_rlvr  sft for ``sft_steps`` steps, then rlvr

A new objective (e.g. a LUFFY- or CHORD-style mix of off-policy gold and rollouts) is one
``Phase`` with its own ``advantages`` and one ``register_paradigm`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import Registry
from .advantages import group_advantages


@dataclass(frozen=True)
class GroupRewards:
    """One step's rewards: ``rollout[B, G]`` (None without rollouts), the gold's ``gold[B]``
    and its smoothing flags ``smoothed[B]`` (None unless the gold is scored)."""

    num_prompts: int
    rollout: torch.Tensor | None = None
    gold: torch.Tensor | None = None
    smoothed: torch.Tensor | None = None


Advantages = tuple[torch.Tensor | None, torch.Tensor | None]  # (rollout [B, G] | None, gold [B] | None)


def sft_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """Every gold has advantage 1 (with the ``-A log pi`` loss: plain SFT)."""
    return None, torch.ones(r.num_prompts)


def grpo_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """GRPO over the G rollouts of each prompt."""
    return group_advantages(r.rollout, norm_by_std=norm_by_std, eps=eps), None


def visurf_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """GRPO over the G + 1 augmented group (gold last). A smoothed gold's advantage is 0
    analytically (``r* = mu``); it is set so that rounding leaves none."""
    adv = group_advantages(torch.cat([r.rollout, r.gold[:, None]], dim=1), norm_by_std=norm_by_std, eps=eps)
    return adv[:, :-1], torch.where(r.smoothed, torch.zeros_like(adv[:, -1]), adv[:, -1])


@dataclass(frozen=True)
class Phase:
    """What one step trains on (module docstring)."""

    name: str
    rollouts: bool  # sample and score G rollouts per prompt
    gold: bool  # the gold answer joins its prompt's group as a member
    scored_gold: bool  # the gold is scored under the reward controls (align / eliminate / smooth)
    advantages: Callable[..., Advantages]  # (GroupRewards, *, norm_by_std, eps) -> Advantages
    gold_logprob: bool | None  # gold tokens take -A log pi (True), the PPO surrogate (False), algo.gold_loss (None)

    def gold_logprob_loss(self, gold_loss: str) -> bool:
        """Whether the gold's tokens take ``-A log pi`` given ``algo.gold_loss`` (ppo | logprob)."""
        return self.gold_logprob if self.gold_logprob is not None else gold_loss == "logprob"


SFT = Phase("sft", rollouts=False, gold=True, scored_gold=False, advantages=sft_advantages, gold_logprob=True)
RLVR = Phase("rlvr", rollouts=True, gold=False, scored_gold=False, advantages=grpo_advantages, gold_logprob=None)
VISURF = Phase("visurf", rollouts=True, gold=True, scored_gold=True, advantages=visurf_advantages, gold_logprob=None)


@dataclass(frozen=True)
class Paradigm:
    """A named schedule of phases: ``phase(step, sft_steps)``."""

    name: str
    phase: Callable[[int, int], Phase]


PARADIGMS: Registry[Paradigm] = Registry("paradigm")


def register_paradigm(paradigm: Paradigm) -> Paradigm:
    """Add ``paradigm`` under its name (``algo.paradigm`` then accepts it); a name is registered once."""
    return PARADIGMS.register(paradigm.name, paradigm)


def get_paradigm(name: str) -> Paradigm:
    return PARADIGMS.get(name)


for _phase in (SFT, RLVR, VISURF):
    register_paradigm(Paradigm(_phase.name, lambda step, sft_steps, p=_phase: p))
register_paradigm(Paradigm("sft_then_rlvr", lambda step, sft_steps: SFT if step < sft_steps else RLVR))
