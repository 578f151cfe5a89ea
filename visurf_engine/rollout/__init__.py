"""Generation backends behind one protocol (``base.RolloutEngine``), chosen once by ``rollout.backend``."""

from __future__ import annotations

from ..config import Config
from ..models.policy import Policy
from .base import RolloutEngine, Rollouts
from .hf import HFRollout


def build_rollout(cfg: Config, policy: Policy) -> RolloutEngine:
    return HFRollout(policy, cfg.rollout)


__all__ = ["HFRollout", "RolloutEngine", "Rollouts", "build_rollout"]
