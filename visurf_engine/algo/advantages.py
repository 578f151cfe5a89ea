"""Group-relative advantages (GRPO), over the G rollouts or the G+1 augmented group.

For a group of rewards ``r[B, M]`` (M = G, or G + 1 with the gold as the last member):

    mu = mean_j r_j,   sigma = std_j r_j  (unbiased, as ``torch.std``)
    A_j = (r_j - mu) / (sigma + eps)       (norm_by_std, GRPO)
    A_j = r_j - mu                          (Dr.GRPO)

A group whose rewards are all equal gets all-zero advantages exactly (floating-point
rounding of the mean would otherwise leave ~1e-16 / ~1e-16 noise of order one).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``A[B, M]`` from ``rewards[B, M]``; computed in float64, returned in float32."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, members>=2], got {tuple(rewards.shape)}")
    r = rewards.double()
    adv = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    flat = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)
    return torch.where(flat, torch.zeros_like(adv), adv).float()
