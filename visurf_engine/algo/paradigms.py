"""Paradigms by name: what each step trains on (``docs/design.md`` §1), as a registry.

A ``Paradigm`` maps a step to a ``Phase``; a phase declares whether the step samples G
rollouts per prompt, whether the gold answer joins the group as a member (whether it is
scored, under ViSurf's reward controls or raw), how the members' advantages are formed, the
objective of the gold's tokens (a ``visurf_kernels.OBJECTIVES`` name), and optionally which
prompts' rollouts / gold train at all (``select``) and a mix of two separately normalised
loss terms (``mix``). Registered (``knobs``: the ``algo.*`` values the phases read):

    sft            gold only, A* = 1, -A* log pi (the SFT NLL, aggregated as algo.aggregation says)
    rlvr           G rollouts, GRPO advantages over the G
    visurf         G rollouts + the reward-controlled gold, GRPO over the G + 1 (a smoothed
                   gold's advantage is exactly 0); the gold's objective is algo.gold_loss
    sft_then_rlvr  sft for sft_steps steps, then rlvr
    luffy          Yan et al. 2025 (LUFFY): the gold (the off-policy demonstration) joins the
                   group, scored raw (no reward controls), GRPO over the G + 1 (their Eq. 5);
                   its tokens take the shaped objective A p / (p + gamma) (behaviour
                   probability 1, no clip: Eq. 7-8, gamma = algo.luffy_gamma), the rollouts the
                   clipped surrogate
    chord          Zhang et al. 2025 (CHORD): (1 - mu) L_GRPO + mu L_SFT (Eq. 5), each term
                   token-averaged over its own tokens; GRPO over the G rollouts, SFT on the
                   gold (-log p, or CHORD-phi's p (1 - p)-weighted -log p with algo.chord_phi,
                   Eq. 7); mu decays linearly from algo.chord_mu[0] to algo.chord_mu[1] over
                   algo.chord_mu[2] steps (their schedule, without its warm-up)
    dft            Wu et al. 2025 (DFT): SFT whose per-token loss is -sg(p) log p (Eq. 10)
    hpt            Lv et al. 2025 (HPT, Alg. 1): per prompt, the rollouts' success rate P (the
                   reward's solved(): accuracy at 1) decides: P > algo.hpt_threshold trains
                   GRPO on the rollouts alone, else SFT on the gold alone

Where a paper leaves a choice open it is fixed here and said so: LUFFY's gold takes its raw
reward in the dataset's answer style; CHORD's mu schedule is linear without warm-up; HPT's
"performance" is the share of rollouts the reward calls solved, and its SFT and RL prompts share
one token-mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from visurf_kernels import OBJECTIVES

from ..registry import Registry
from .advantages import group_advantages
from .members import Members, build_members

Knobs = Mapping[str, Any]  # the algo.* values a phase reads (gold_loss, luffy_gamma, chord_mu, ...)


@dataclass(frozen=True)
class GroupRewards:
    """One step's rewards: ``rollout[B, G]`` (None without rollouts) and whether each rollout
    solved its prompt, ``solved[B, G]``; the gold's ``gold[B]`` and its smoothing flags
    ``smoothed[B]`` (None unless the gold is scored)."""

    num_prompts: int
    rollout: torch.Tensor | None = None
    gold: torch.Tensor | None = None
    smoothed: torch.Tensor | None = None
    solved: torch.Tensor | None = None


Advantages = tuple[torch.Tensor | None, torch.Tensor | None]  # (rollout [B, G] | None, gold [B] | None)


def sft_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """Every gold has advantage 1 (with the ``-A log pi`` loss: plain SFT)."""
    return None, torch.ones(r.num_prompts)


def grpo_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """GRPO over the G rollouts of each prompt."""
    return group_advantages(r.rollout, norm_by_std=norm_by_std, eps=eps), None


def grpo_and_sft_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """GRPO over the G rollouts; every gold 1 (its own SFT term)."""
    return group_advantages(r.rollout, norm_by_std=norm_by_std, eps=eps), torch.ones(r.num_prompts)


def mixed_group_advantages(r: GroupRewards, *, norm_by_std: bool, eps: float) -> Advantages:
    """GRPO over the G + 1 augmented group (gold last). A smoothed gold's advantage is 0
    analytically (``r* = mu``); it is set so that rounding leaves none."""
    adv = group_advantages(torch.cat([r.rollout, r.gold[:, None]], dim=1), norm_by_std=norm_by_std, eps=eps)
    gold = adv[:, -1] if r.smoothed is None else torch.where(r.smoothed, torch.zeros_like(adv[:, -1]), adv[:, -1])
    return adv[:, :-1], gold


def hpt_select(r: GroupRewards, knobs: Knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """HPT's switch: (rollouts train [B], gold trains [B]); RL where the success rate exceeds the threshold."""
    rl = r.solved.double().mean(dim=1) > knobs["hpt_threshold"]
    return rl, ~rl


def chord_mix(step: int, knobs: Knobs) -> tuple[float, float]:
    """CHORD's ``(1 - mu, mu)`` at ``step``: mu linear from start to end over the decay steps, then end."""
    start, end, decay = knobs["chord_mu"]
    mu = end if step >= decay else start + (end - start) * step / decay
    return 1.0 - mu, mu


@dataclass(frozen=True)
class Phase:
    """What one step trains on (module docstring)."""

    name: str
    rollouts: bool  # sample and score G rollouts per prompt
    gold: bool  # the gold answer is a member
    scored_gold: bool  # the gold is scored (its reward enters the advantages)
    advantages: Callable[..., Advantages]  # (GroupRewards, *, norm_by_std, eps) -> Advantages
    gold_objective: str | Callable[[Knobs], str] | None  # the gold tokens' objective (of the knobs); None: algo.gold_loss
    controls: bool = True  # the reward controls (align / eliminate / smooth) apply to the gold
    select: Callable[[GroupRewards, Knobs], tuple[torch.Tensor, torch.Tensor]] | None = None
    mix: Callable[[int, Knobs], tuple[float, float]] | None = None  # (RL, SFT) scales; the gold in part 1

    def gold_objective_of(self, knobs: Knobs) -> str:
        """The objective of the gold's tokens given ``knobs`` (``algo.gold_loss``, ``algo.chord_phi``)."""
        if callable(self.gold_objective):
            return self.gold_objective(knobs)
        return self.gold_objective or knobs["gold_loss"]

    def scales(self, step: int, knobs: Knobs) -> tuple[float, ...]:
        """Each part's scale: one part of scale 1, or ``mix``'s two."""
        return self.mix(step, knobs) if self.mix is not None else (1.0,)

    def members(self, knobs: Knobs, rewards: GroupRewards, rollouts, rollout_adv, gold_tokens, gold_adv,
                rollout_logp=None) -> Members:  # fmt: skip
        """The step's ``Members``: those ``select`` keeps, the gold with its objective, in part 1 when mixing."""
        keep_rollouts, keep_gold = self.select(rewards, knobs) if self.select is not None else (None, None)
        return build_members(rollouts, rollout_adv, gold_tokens, gold_adv, rollout_logp=rollout_logp,
                             gold_objective=OBJECTIVES.index(self.gold_objective_of(knobs)),
                             gold_part=int(self.mix is not None), keep_rollouts=keep_rollouts, keep_gold=keep_gold)  # fmt: skip


SFT = Phase("sft", rollouts=False, gold=True, scored_gold=False, advantages=sft_advantages, gold_objective="logprob")
RLVR = Phase("rlvr", rollouts=True, gold=False, scored_gold=False, advantages=grpo_advantages, gold_objective="ppo")
VISURF = Phase("visurf", rollouts=True, gold=True, scored_gold=True, advantages=mixed_group_advantages, gold_objective=None)
LUFFY = Phase("luffy", rollouts=True, gold=True, scored_gold=True, advantages=mixed_group_advantages,
              gold_objective="shaped", controls=False)  # fmt: skip
CHORD = Phase("chord", rollouts=True, gold=True, scored_gold=False, advantages=grpo_and_sft_advantages,
              gold_objective=lambda knobs: "phi" if knobs["chord_phi"] else "logprob", mix=chord_mix)  # fmt: skip
DFT = Phase("dft", rollouts=False, gold=True, scored_gold=False, advantages=sft_advantages, gold_objective="dft")
HPT = Phase("hpt", rollouts=True, gold=True, scored_gold=False, advantages=grpo_and_sft_advantages,
            gold_objective="logprob", select=hpt_select)  # fmt: skip


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


for _phase in (SFT, RLVR, VISURF, LUFFY, CHORD, DFT, HPT):
    register_paradigm(Paradigm(_phase.name, lambda step, sft_steps, p=_phase: p))
register_paradigm(Paradigm("sft_then_rlvr", lambda step, sft_steps: SFT if step < sft_steps else RLVR))
