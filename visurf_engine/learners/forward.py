"""``PolicyForward``: the training forward of a Qwen2(.5)-VL policy as one module.

    forward(batch)     -> logp[N]            no-grad scoring (old log-probs, the KL reference)
    forward(batch, x)  -> (loss, stats)      the fused policy loss of micro-batch ``x``

It is the module data parallelism wraps (torch ``DistributedDataParallel``, FSDP2's root
unit): their hooks fire on a module's ``forward``, and the loss uses the LM head's weight
directly (``visurf_kernels.fused_policy_loss``: ``hidden[N, H]`` against ``W[V, H]``, the
``[N, V]`` logits never formed) instead of calling the head, so the loss must run inside the
wrapped forward for the head's parameters to be gathered (FSDP) and their gradients reduced.
The head's inputs are cast to the compute dtype (``models.precision``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from visurf_kernels import LossSpec, fused_logprobs, fused_policy_loss

from ..models.policy import Batching, Policy, Prompts, SequenceBatch, completion_hidden
from ..models.precision import Precision
from ..parallel.world import World
from .base import LossStats, MicroBatch, lockstep_split


class PolicyForward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, precision: Precision, spec: LossSpec):
        super().__init__()
        self.model, self.precision, self.spec = model, precision, spec
        self._scoring = spec.replace(with_entropy=False)

    def forward(self, batch: SequenceBatch, x: MicroBatch | None = None) -> torch.Tensor | LossStats:
        device = batch.input_ids.device
        with self.precision.autocast(device):
            hidden, weight = self.precision.head_inputs(completion_hidden(self.model, batch), self.model.lm_head.weight)
            if x is None:
                return fused_logprobs(hidden, weight, batch.targets, self._scoring)[0]
            return fused_policy_loss(hidden, weight, batch.targets, x.old_logp, x.adv, x.w, self.spec, x.objective,
                                     ref_logp=x.ref_logp, rollout_logp=x.rollout_logp)  # fmt: skip


@torch.no_grad()
def forward_logprobs(module: torch.nn.Module, policy: Policy, prompts: Prompts, idx: Sequence[int],
                     completions: Sequence[Sequence[int]], batching: Batching, world: World | None = None) -> torch.Tensor:  # fmt: skip
    """``logp[N]`` of ``completions[s]`` after prompt ``idx[s]`` through ``module`` (a
    ``PolicyForward``, or its FSDP form), micro-batch by micro-batch (``policy.batches``); with a
    ``world``, as many micro-batches as any of its ranks needs (``lockstep_split``: a sharded
    module's forwards gather parameters from every rank)."""
    parts = None
    if world is not None:
        parts = lockstep_split(batching, [len(prompts.input_ids[p]) + len(c) for p, c in zip(idx, completions)], world)
    return torch.cat([module(batch) for batch in policy.batches(prompts, idx, completions, batching, parts)])
