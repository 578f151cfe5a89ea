"""Reward functions by name: ``get_reward("grounding")``, ``get_reward("math")``.

``score_batch(spec, completions, solutions, sample_ids)`` scores a batch into tensors,
containing (recording, logging, zeroing) any per-sample failure.
"""

from __future__ import annotations

from ..registry import Registry
from .base import RewardSpec, ScoreBatch, score_batch
from .grounding import GroundingReward
from .math import MathReward

REWARDS: Registry[RewardSpec] = Registry("reward")


def register(spec: RewardSpec) -> RewardSpec:
    """Add ``spec`` under ``spec.name``; a name can be registered once."""
    return REWARDS.register(spec.name, spec)


def get_reward(name: str) -> RewardSpec:
    """The registered reward ``name``; ValueError naming the choices otherwise."""
    return REWARDS.get(name)


register(GroundingReward())
register(MathReward())

__all__ = ["REWARDS", "GroundingReward", "MathReward", "RewardSpec", "ScoreBatch", "get_reward", "register",
           "score_batch"]
