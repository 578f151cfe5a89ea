"""ViSurf's three reward controls for the gold answer (paper §3.4, DESIGN.md §1).

- **align**: render the gold in the policy's own output style. ``auto`` takes the style
  most of the group's rollouts are written in; where none is recognisable, the style
  whose rendering the policy finds most likely (a caller-supplied scorer). Off: the
  dataset's own style.
- **eliminate**: the gold carries no reasoning trace (its think slot is empty), so its
  thinking-format component is set to 0. Off: the gold keeps what it scores, which is the
  full thinking-format reward (an empty think block passes the format check).
- **smooth**: if ``max_i r_i >= r*`` then ``r* := mean_i r_i`` (rollouts only), so the
  gold's advantage is exactly 0 and the step is pure RLVR for that group.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from ..rewards import RewardSpec


def choose_style(
    spec: RewardSpec,
    rollout_texts: Sequence[str],
    candidates: dict[str, str],
    *,
    align: bool,
    align_style: str,
    loglik: Callable[[list[str]], list[float]] | None,
) -> str:
    """The style the gold is rendered in for one group; ``candidates`` maps style -> text."""
    if not align:
        return spec.dataset_style
    if align_style != "auto":
        if align_style not in candidates:
            raise ValueError(f"algo.align_style: {align_style!r} is not a style of reward {spec.name!r}: {spec.styles}")
        return align_style
    seen = Counter(s for s in map(spec.detect_style, rollout_texts) if s is not None)
    if seen:
        return seen.most_common(1)[0][0]
    if loglik is None or len(candidates) == 1:
        return spec.dataset_style
    styles = list(candidates)
    scores = loglik([candidates[s] for s in styles])
    return styles[max(range(len(styles)), key=scores.__getitem__)]


def control_gold_rewards(
    gold_components: torch.Tensor,
    rollout_rewards: torch.Tensor,
    weights: torch.Tensor,
    think_index: int | None,
    *,
    eliminate: bool,
    smooth: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold rewards ``r*[B]`` and the smoothing flags ``[B]``.

    ``gold_components[B, C]`` are the reward components scored on the gold text,
    ``rollout_rewards[B, G]`` the rollouts' weighted totals, ``weights[C]``.
    """
    comps = gold_components.clone()
    if eliminate and think_index is not None:
        comps[:, think_index] = 0.0
    gold = comps @ weights
    smoothed = torch.zeros_like(gold, dtype=torch.bool)
    if smooth:
        smoothed = rollout_rewards.max(dim=1).values >= gold
        gold = torch.where(smoothed, rollout_rewards.mean(dim=1), gold)
    return gold, smoothed
