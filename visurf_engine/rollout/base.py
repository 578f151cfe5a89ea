"""The rollout-engine seam: one protocol every generation backend implements (``docs/design.md`` §3).

    rollouts = engine.sample(prompts, n)     # n sampled completions per prompt
    texts    = engine.greedy(prompts)        # one greedy completion per prompt (evaluation)
    logp     = engine.logprobs(prompts, idx, completions)  # per-token log-probs of given completions
    engine.sync_weights(named_tensors)       # the learner's updated weights, HF names, in place

Every call is rank-local (no collective): ranks may call them different numbers of times
(evaluation shares, align's scoring of the groups that need it).

A completion is a list of token ids that ends at (and includes) the end-of-turn token, or is
cut at the generation budget. Engines that compute the sampling distribution's per-token
log-probs while generating (vLLM) return them too; they are what a rollout/trainer mismatch
correction compares against. The trainer holds one engine, chosen once
(``rollout.build_rollout``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..models.policy import Prompts


@dataclass
class Rollouts:
    tokens: list[list[list[int]]]  # [B][n][T_i] completion token ids
    logprobs: list[list[torch.Tensor]] | None = None  # [B][n] float32 [T_i] sampling log-probs, if the engine has them


class RolloutEngine(ABC):
    @abstractmethod
    def sample(self, prompts: Prompts, n: int) -> Rollouts:
        """``n`` sampled completions per prompt."""

    @abstractmethod
    def greedy(self, prompts: Prompts) -> list[list[int]]:
        """One greedy completion per prompt."""

    @abstractmethod
    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-token log-probs ``[T_s]`` of ``completions[s]`` after prompt ``idx[s]`` under the
        engine's current weights (the HF engine: at the sampling temperature, as the trainer's
        fused pass; vLLM: ``log softmax(z)``)."""

    @abstractmethod
    def sync_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the learner's current weights (``(HF state_dict name, tensor)``; consume all)."""
