"""Rollouts with transformers ``generate``: on the policy module itself, or on a separate replica.

**Shared** (default). The engine generates with the policy's own module (``Policy.generate``),
chunked to bound memory. The learner trains that very module (``model.backend=hf``) or writes
its updated weights into it (``model.backend=megatron``: ``export_weights`` refreshes the HF
replica in place), so the weight sync finds every tensor already in place and copies nothing
(a tensor that is not in place is copied into it).

**Replica** (``rollout.hf.replica``). Generation runs on a separate copy of the policy in
``rollout.hf.dtype`` (``replica.Replica``: bf16 by default), fed every step through the same
kind of sync plan as vLLM, as one CUDA graph on GPU. With a static KV cache
(``rollout.hf.static_cache``; default on CUDA) transformers compiles the decode step (its
auto-compile of static-cache generation, ``torch.compile`` in ``reduce-overhead`` mode: CUDA
graphs). It costs a copy of the weights; generation then no longer depends on the training
module's precision or mode, and decodes from captured graphs. The replica reports no sampling
log-probs (``Rollouts.logprobs`` is None).
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..config import RolloutConfig
from ..models.policy import Policy, Prompts
from .base import RolloutEngine, Rollouts
from .replica import Replica


class HFRollout(RolloutEngine):
    def __init__(self, policy: Policy, cfg: RolloutConfig, chunk: int = 64):
        self.policy, self.cfg, self.chunk = policy, cfg, chunk
        h = cfg.hf
        self.replica = Replica(policy.model, getattr(torch, h.dtype)) if h.replica else None
        self.generator = Policy(self.replica.model, policy.processor, policy.device) if h.replica else policy
        static = policy.device.type == "cuda" if h.static_cache is None else h.static_cache
        self.cache_implementation = "static" if h.replica and static else None

    def sample(self, prompts: Prompts, n: int) -> Rollouts:
        idx = [b for b in range(len(prompts)) for _ in range(n)]
        flat = self._run(prompts, idx, do_sample=True, max_new_tokens=self.cfg.max_new_tokens)
        return Rollouts([flat[b * n : (b + 1) * n] for b in range(len(prompts))])

    def greedy(self, prompts: Prompts) -> list[list[int]]:
        return self._run(prompts, list(range(len(prompts))), do_sample=False, max_new_tokens=self.cfg.eval_max_new_tokens)

    def _run(self, prompts: Prompts, idx: list[int], *, do_sample: bool, max_new_tokens: int) -> list[list[int]]:
        out = []
        for i in range(0, len(idx), self.chunk):
            out += self.generator.generate(
                prompts,
                idx[i : i + self.chunk],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                cache_implementation=self.cache_implementation,
            )
        return out

    @torch.no_grad()
    def sync_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.replica is not None:
            self.replica.sync(named)
            return
        targets = self.policy.model.state_dict(keep_vars=True)
        for name, value in named:
            if targets[name] is not value:
                targets[name].copy_(value)
