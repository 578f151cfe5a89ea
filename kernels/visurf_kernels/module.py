"""``FusedPolicyLoss``: an ``nn.Module`` around ``fused_policy_loss`` for other stacks (TRL, verl).

It holds a ``LossSpec`` and, for a vocab-parallel LM head, where this rank's shard sits;
``forward(hidden[N, H], lm_weight[V_local, H], targets[N], old_logp[N], adv[N], w[N],
objective=None, ref_logp=None, rollout_logp=None) -> (loss, stats)`` as
``fused_policy_loss``. It has no parameters: pass the LM head's weight
(``model.lm_head.weight``) at call time.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused_policy_loss
from .spec import LossSpec


class FusedPolicyLoss(nn.Module):
    def __init__(self, spec: LossSpec = LossSpec(), *, tp_group=None, vocab_start: int = 0):
        super().__init__()
        self.spec, self.tp_group, self.vocab_start = spec, tp_group, vocab_start

    def forward(
        self,
        hidden: torch.Tensor,
        lm_weight: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor | None,
        adv: torch.Tensor,
        w: torch.Tensor,
        objective: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_policy_loss(
            hidden, lm_weight, targets, old_logp, adv, w, self.spec, objective,
            ref_logp=ref_logp, rollout_logp=rollout_logp, tp_group=self.tp_group, vocab_start=self.vocab_start,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self.spec).items()) + f", vocab_start={self.vocab_start}"
