"""Rollouts with transformers ``generate``: on the policy module itself, or on a separate replica.

**Shared** (``rollout.hf.replica=false``; the default where the learner allows it). The engine
generates with the policy's own module (``Policy.generate``), chunked to bound memory. The
learner trains that very module (``model.backend=hf``) or writes its updated weights into it
(``model.backend=megatron``: ``export_weights`` refreshes the HF replica in place), so the
weight sync finds every tensor already in place and copies nothing (a tensor that is not in
place is copied into it). A sharded learner (``fsdp``) has no whole module to generate with.

**Replica** (``rollout.hf.replica=true``; the default under ``fsdp``). Generation runs on a
separate copy of the policy in ``rollout.hf.dtype`` (``replica.Replica``: bf16 by default), fed
every step through the same kind of sync plan as vLLM (one CUDA graph on GPU when the learner's
tensors have fixed storage). With a static KV cache (``rollout.hf.static_cache``; default on
CUDA) transformers compiles the decode step (its auto-compile of static-cache generation,
``torch.compile`` in ``reduce-overhead`` mode: CUDA graphs), the cache sized in buckets
(``models.policy.static_cache_length``) so the compiled step is not rebuilt every step. It costs
a copy of the weights; generation then no longer depends on the training module's precision or
mode. The replica reports no sampling log-probs (``Rollouts.logprobs`` is None).

``logprobs`` (align's scoring) is the no-grad fused pass of the generating module at the
sampling temperature, micro-batched as the trainer's passes (``Batching``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from visurf_kernels import LossSpec

from ..config import RolloutConfig
from ..models.policy import Batching, Policy, Prompts
from ..models.precision import Precision
from .base import RolloutEngine, Rollouts
from .replica import Replica


class HFRollout(RolloutEngine):
    def __init__(self, policy: Policy, cfg: RolloutConfig, *, replica: Replica | None = None,
                 batching: Batching = Batching(), spec: LossSpec | None = None, chunk: int = 64):  # fmt: skip
        """Generate with ``policy``'s module, or with ``replica`` (``Replica.of``); ``batching`` and
        ``spec`` (loss backend) of the ``logprobs`` pass."""
        self.policy, self.cfg, self.chunk, self.replica, self.batching = policy, cfg, chunk, replica, batching
        if replica is None:
            self.generator = policy
        else:
            dtype = next(replica.model.parameters()).dtype
            self.generator = Policy(replica.model, policy.processor, policy.device, Precision(dtype, dtype))
        self.spec = (spec or LossSpec()).replace(temperature=cfg.temperature, with_entropy=False)
        static = policy.device.type == "cuda" if cfg.hf.static_cache is None else cfg.hf.static_cache
        self.cache_implementation = "static" if replica is not None and static else None
        self.engine = cfg.hf.decode if cfg.hf.decode != "auto" else ("generate" if policy.device.type == "cuda" else "loop")

    def sample(self, prompts: Prompts, n: int) -> Rollouts:
        idx = [b for b in range(len(prompts)) for _ in range(n)]
        flat, logp = self._run(prompts, idx, do_sample=True, max_new_tokens=self.cfg.max_new_tokens)
        group = lambda xs: [xs[b * n : (b + 1) * n] for b in range(len(prompts))]  # noqa: E731
        return Rollouts(group(flat), group(logp) if logp is not None else None)

    def greedy(self, prompts: Prompts) -> list[list[int]]:
        return self._run(prompts, list(range(len(prompts))), do_sample=False, max_new_tokens=self.cfg.eval_max_new_tokens)[0]

    def _run(self, prompts: Prompts, idx: list[int], *, do_sample: bool, max_new_tokens: int):
        """Completions of ``idx`` in chunks, and their sampling log-probs (the ``loop`` engine's; else None)."""
        out, logp = [], []
        for i in range(0, len(idx), self.chunk):
            tokens, lp = self.generator.generate(
                prompts,
                idx[i : i + self.chunk],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                engine=self.engine,
                cache_implementation=self.cache_implementation,
            )
            out += tokens
            logp = logp + lp if lp is not None else None
        return out, logp

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        logp = self.generator.logprobs(prompts, idx, completions, self.spec, self.batching)
        return list(torch.split(logp, [len(c) for c in completions]))

    @torch.no_grad()
    def sync_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.replica is not None:
            self.replica.sync(named)
            return
        targets = self.policy.model.state_dict(keep_vars=True)
        for name, value in named:
            if targets[name] is not value:
                targets[name].copy_(value)
