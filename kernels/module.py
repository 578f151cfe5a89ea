"""``FusedPolicyLoss``: an ``nn.Module`` around ``fused_policy_loss`` for other stacks (TRL, verl).

It holds the settings; ``forward(hidden[N, H], lm_weight[V_local, H], targets[N],
old_logp[N], adv[N], w[N], logprob_mask=None) -> (loss, stats)`` as ``fused_policy_loss``.
It has no parameters: pass the LM head's weight (``model.lm_head.weight``) at call time.
"""

from __future__ import annotations

import torch
from torch import nn

from . import IGNORE_INDEX, fused_policy_loss


class FusedPolicyLoss(nn.Module):
    def __init__(
        self,
        *,
        temperature: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip: float | None = None,
        with_entropy: bool = False,
        ignore_index: int = IGNORE_INDEX,
        tp_group=None,
        vocab_start: int = 0,
        backend: str = "auto",
    ):
        super().__init__()
        self.options = {
            "temperature": temperature,
            "eps_low": eps_low,
            "eps_high": eps_high,
            "dual_clip": dual_clip,
            "with_entropy": with_entropy,
            "ignore_index": ignore_index,
            "tp_group": tp_group,
            "vocab_start": vocab_start,
            "backend": backend,
        }

    def forward(
        self,
        hidden: torch.Tensor,
        lm_weight: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor | None,
        adv: torch.Tensor,
        w: torch.Tensor,
        logprob_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_policy_loss(hidden, lm_weight, targets, old_logp, adv, w, logprob_mask=logprob_mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items() if k != "tp_group")
