"""Rollouts with transformers ``generate`` on the training model itself.

The rollout engine and the trainer share one module, so weight sync is a no-op: the
next step samples from the freshly updated weights. Generation is chunked to bound memory.
"""

from __future__ import annotations

from ..config import RolloutConfig
from ..models.policy import Policy, Prompts


class HFRollout:
    def __init__(self, policy: Policy, cfg: RolloutConfig, chunk: int = 64):
        self.policy, self.cfg, self.chunk = policy, cfg, chunk

    def sample(self, prompts: Prompts) -> list[list[list[int]]]:
        """``G = cfg.n`` sampled completions per prompt: ``[B][G][tokens]``."""
        g = self.cfg.n
        idx = [b for b in range(len(prompts)) for _ in range(g)]
        flat = self._run(prompts, idx, do_sample=True, max_new_tokens=self.cfg.max_new_tokens)
        return [flat[b * g : (b + 1) * g] for b in range(len(prompts))]

    def greedy(self, prompts: Prompts) -> list[list[int]]:
        """One greedy completion per prompt (evaluation)."""
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

    def sync_weights(self) -> None:
        """Shared module: nothing to copy."""
