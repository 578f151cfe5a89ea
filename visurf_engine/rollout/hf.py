"""Rollouts with transformers ``generate`` on the policy module.

The engine generates with the policy's own module (``Policy.generate``), chunked to bound
memory. When the learner trains that same module (``model.backend=hf``) the weight sync
finds every tensor already in place and copies nothing; when the learner holds its own
copy (``model.backend=megatron``) the sync copies each exported tensor into the module in
place, so the next step samples the updated weights.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..config import RolloutConfig
from ..models.policy import Policy, Prompts
from .base import RolloutEngine, Rollouts


class HFRollout(RolloutEngine):
    def __init__(self, policy: Policy, cfg: RolloutConfig, chunk: int = 64):
        self.policy, self.cfg, self.chunk = policy, cfg, chunk

    def sample(self, prompts: Prompts, n: int) -> Rollouts:
        idx = [b for b in range(len(prompts)) for _ in range(n)]
        flat = self._run(prompts, idx, do_sample=True, max_new_tokens=self.cfg.max_new_tokens)
        return Rollouts([flat[b * n : (b + 1) * n] for b in range(len(prompts))])

    def greedy(self, prompts: Prompts) -> list[list[int]]:
        return self._run(prompts, list(range(len(prompts))), do_sample=False, max_new_tokens=self.cfg.eval_max_new_tokens)

    def _run(self, prompts: Prompts, idx: list[int], *, do_sample: bool, max_new_tokens: int) -> list[list[int]]:
        out = []
        for i in range(0, len(idx), self.chunk):
            out += self.policy.generate(
                prompts,
                idx[i : i + self.chunk],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
            )
        return out

    @torch.no_grad()
    def sync_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        targets = self.policy.model.state_dict(keep_vars=True)
        for name, value in named:
            if targets[name] is not value:
                targets[name].copy_(value)
