"""Reward functions by name: ``get_reward("grounding")``, ``get_reward("math")``.

``score_batch(spec, completions, solutions, sample_ids)`` scores a batch into tensors,
containing (recording, logging, zeroing) any per-sample failure.
"""

from __future__ import annotations

from .base import RewardSpec, ScoreBatch, score_batch
from .grounding import GroundingReward
from .math import MathReward

REWARDS: dict[str, RewardSpec] = {}


def register(spec: RewardSpec) -> RewardSpec:
    """Add ``spec`` under ``spec.name``; a name can be registered once."""
    if spec.name in REWARDS:
        raise ValueError(f"reward {spec.name!r} is already registered")
    REWARDS[spec.name] = spec
    return spec


def get_reward(name: str) -> RewardSpec:
    """The registered reward ``name``; ValueError naming the choices otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None


register(GroundingReward())
register(MathReward())

__all__ = ["REWARDS", "GroundingReward", "MathReward", "RewardSpec", "ScoreBatch", "get_reward", "register",
           "score_batch"]
