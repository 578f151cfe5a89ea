"""``HFLearner``: trains the transformers policy module itself, data parallel over the world.

Every rank holds a full replica and 1/world of each step's sequences. Per micro-batch the
final hidden states that predict the completion tokens (``Policy.completion_hidden``) go with
the LM head into the fused loss (``visurf_kernels.fused_policy_loss``: no ``[N, V]`` logits),
then backward; the loss weights are normalised over the global batch, so the gradients are
SUM-reduced over ranks (one flat all-reduce) before the step. The forward runs in the
policy's precision (``Policy.autocast``: bf16 autocast on CUDA). The rollout engine may
share this module: ``export_weights`` yields the parameters themselves, and a shared engine
sees them as already in place.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from visurf_kernels import LossSpec, fused_policy_loss

from ..models.policy import Policy
from ..parallel.data_parallel import World, all_reduce_grads
from .base import Learner, LossStats, MicroBatch, clip_grad_norm


class HFLearner(Learner):
    def __init__(self, policy: Policy, spec: LossSpec, dp: World, *, lr: float, betas, weight_decay: float):
        self.policy, self.spec, self.dp = policy, spec, dp
        self.model = policy.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    def forward_backward(self, micro: Sequence[MicroBatch]) -> list[LossStats]:
        out = []
        for x in micro:
            with self.policy.autocast():
                hidden = self.policy.completion_hidden(x.batch)
                loss, stats = fused_policy_loss(hidden, self.policy.lm_head_weight, x.batch.targets, x.old_logp,
                                                x.adv, x.w, self.spec, x.logprob_mask, ref_logp=x.ref_logp,
                                                rollout_logp=x.rollout_logp)  # fmt: skip
            loss.backward()
            out.append((loss.detach(), stats))
        all_reduce_grads(self.model, self.dp)
        return out

    def clip_grads(self, grad_clip: float) -> float:
        return clip_grad_norm(list(self.model.parameters()), grad_clip)

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_parameters()

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in named:
            if params[name] is not value:
                params[name].copy_(value)
