"""``HFLearner``: trains the transformers policy module itself, data parallel over the world.

Every rank holds a full replica and 1/world of each step's sequences. A micro-batch runs
through ``PolicyForward`` (the final hidden states that predict the completion tokens and the
LM head into the fused loss: no ``[N, V]`` logits), then backward. Over more than one rank the
forward module is wrapped in torch's ``DistributedDataParallel``: gradients are reduced in
buckets while backward runs, once per optimizer step (``no_sync`` on every micro-batch but the
last; the trainer gives every rank the same number of micro-batches), and SUM-reduced
(``world.sum_comm_hook``) because the loss weights are already normalised over the global
batch. The forward runs in the policy's precision (``models.precision``: autocast to the
compute dtype over float32 master weights on CUDA). The rollout engine may share this module:
``export_weights`` yields the parameters themselves, and a shared engine sees them as already
in place.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from visurf_kernels import LossSpec

from ..models.policy import Batching, Policy, Prompts
from ..parallel.world import World, sum_comm_hook
from .base import Learner, LossStats, MicroBatch, adamw, clip_grad_norm
from .checkpointing import apply_activation_checkpointing
from .forward import PolicyForward, forward_logprobs


class HFLearner(Learner):
    def __init__(self, policy: Policy, spec: LossSpec, dp: World, *, lr: float, betas, weight_decay: float,
                 activation_checkpointing: bool = False):  # fmt: skip
        self.policy, self.spec, self.dp = policy, spec, dp
        self.model = policy.model
        if activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.forward_module = PolicyForward(self.model, policy.precision, spec)
        self.ddp = None
        if dp.size > 1:
            self.ddp = DistributedDataParallel(self.forward_module, process_group=dp.group, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)  # fmt: skip
            self.ddp.register_comm_hook(dp.group, sum_comm_hook)
        self.optimizer = adamw(self.model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    def forward_backward(self, micro: Sequence[MicroBatch]) -> list[LossStats]:
        out = []
        for i, x in enumerate(micro):
            reduce_now = self.ddp is None or i == len(micro) - 1
            with contextlib.nullcontext() if reduce_now else self.ddp.no_sync():
                loss, stats = (self.ddp or self.forward_module)(x.batch, x)
                loss.backward()
            out.append((loss.detach(), stats))
        return out

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                 batching: Batching) -> torch.Tensor:  # fmt: skip
        return forward_logprobs(self.forward_module, self.policy, prompts, idx, completions, batching)

    def clip_grads(self, grad_clip: float) -> float:
        return clip_grad_norm(list(self.model.parameters()), grad_clip)

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.ddp is None)  # DDP's gradients are views of its buckets: keep them

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in named:
            if params[name] is not value:
                params[name].copy_(value)
