"""The ViSurf gold member (paper §3.4, ``docs/design.md`` §1): render, align, score, eliminate, smooth.

For B groups with gold solutions ``y*_b``, the reward's styles ``s`` and the policy ``pi``:

- **render**: the candidates ``c_{b,s} = spec.render(y*_b, s)``: the policy's completion
  template with an empty reasoning slot, the answer in style ``s``.
- **align** (``choose_styles``): off, the dataset's style; a fixed ``align_style``; or
  ``auto``: the style most of group b's rollouts are written in (``spec.detect_style``),
  and where none is recognisable ``argmax_s (1/|c|) sum_t log pi(c_{b,s,t} | x_b, c_{b,s,<t})``,
  the mean per-token log-likelihood, from ONE batched no-grad pass over every (b, s) pair
  that needs it (the caller's ``loglik``). The mean, not the sum: renderings of one answer
  differ in length (compact JSON has no spaces), and a sum of negative terms favours the
  shorter one whatever the policy writes.
- **score**: the components ``r*_{b,c}`` of the chosen text (``score_batch``: a failing
  sample is zeroed and counted, never raised).
- **eliminate**: the gold carries no reasoning trace, so its thinking-format component is
  set to 0. Off: it keeps what it scores (an empty think block passes the format check).
- **smooth**: if ``max_i r_{b,i} >= r*_b`` then ``r*_b := mean_i r_{b,i}`` (rollouts only),
  so the gold's advantage is exactly 0 and the step is pure RLVR for that group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..rewards import RewardSpec, score_batch
from ..rewards.base import on_grid, weighted_total

LogLik = Callable[[list[int], list[str]], list[float]]  # (group indices, texts) -> mean per-token log pi(text | prompt)


@dataclass
class Gold:
    """The gold member of each of B groups."""

    texts: list[str]  # [B] rendered completion texts
    styles: list[str]  # [B] the style each was rendered in
    rewards: torch.Tensor | None  # [B] under the controls; None when the phase does not score the gold
    smoothed: torch.Tensor | None  # [B] bool
    failures: int  # reward failures while scoring the gold


def choose_styles(
    spec: RewardSpec,
    rollout_texts: Sequence[Sequence[str]],
    candidates: Sequence[dict[str, str]],
    *,
    align: bool,
    align_style: str,
    loglik: LogLik | None,
) -> list[str]:
    """The style of each group's gold; ``candidates[b]`` maps style -> text (module docstring)."""
    if not align:
        return [spec.dataset_style] * len(candidates)
    if align_style != "auto":
        if align_style not in spec.styles:
            raise ValueError(f"algo.align_style: {align_style!r} is not a style of reward {spec.name!r}: {spec.styles}")
        return [align_style] * len(candidates)
    chosen: list[str | None] = []
    for texts in rollout_texts:
        seen = Counter(s for s in map(spec.detect_style, texts) if s is not None)
        chosen.append(seen.most_common(1)[0][0] if seen else None)
    pending = [b for b, s in enumerate(chosen) if s is None]
    if pending and (loglik is None or len(spec.styles) == 1):
        return [s or spec.dataset_style for s in chosen]
    if pending:
        styles = list(candidates[pending[0]])
        scores = loglik([b for b in pending for _ in styles], [candidates[b][s] for b in pending for s in styles])
        for k, b in enumerate(pending):
            group = scores[k * len(styles) : (k + 1) * len(styles)]
            chosen[b] = styles[max(range(len(styles)), key=group.__getitem__)]
    return chosen


def control_gold_rewards(
    gold_components: torch.Tensor,
    rollout_rewards: torch.Tensor,
    weights: torch.Tensor,
    think_index: int | None,
    *,
    eliminate: bool,
    smooth: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold rewards ``r*[B]`` (float64, on the reward grid) and the smoothing flags ``[B]``.

    ``gold_components[B, C]`` are the reward components scored on the gold text,
    ``rollout_rewards[B, G]`` the rollouts' totals (``score_batch``), ``weights[C]``. The
    gold's total is formed as the rollouts' are (``rewards.base.weighted_total``), so a gold
    that ties the best rollout is smoothed; the smoothed value, the rollouts' mean, is put on
    the grid too, so a group of equal rollouts and its smoothed gold is exactly flat.
    """
    comps = gold_components.double().clone()
    if eliminate and think_index is not None:
        comps[:, think_index] = 0.0
    gold = weighted_total(comps, weights)
    smoothed = torch.zeros_like(gold, dtype=torch.bool)
    if smooth:
        smoothed = rollout_rewards.max(dim=1).values >= gold
        gold = torch.where(smoothed, on_grid(rollout_rewards.mean(dim=1)), gold)
    return gold, smoothed


def make_gold(
    spec: RewardSpec,
    solutions: Sequence,
    sample_ids: Sequence[str],
    rollout_texts: Sequence[Sequence[str]] | None,
    rollout_rewards: torch.Tensor | None,
    *,
    align: bool,
    align_style: str,
    eliminate: bool,
    smooth: bool,
    scored: bool,
    loglik: LogLik | None,
) -> Gold:
    """Render, align and (``scored``) score the gold of every group (module docstring)."""
    candidates = [{s: spec.render(sol, s) for s in spec.styles} for sol in solutions]
    styles = choose_styles(spec, rollout_texts or [[] for _ in solutions], candidates,
                           align=align, align_style=align_style, loglik=loglik)  # fmt: skip
    texts = [c[s] for c, s in zip(candidates, styles)]
    if not scored:
        return Gold(texts, styles, None, None, 0)
    sb = score_batch(spec, texts, solutions, [f"{i}:gold" for i in sample_ids])
    think = spec.components.index(spec.think_component) if spec.think_component else None
    rewards, smoothed = control_gold_rewards(sb.components, rollout_rewards, spec.weight_vector(), think,
                                             eliminate=eliminate, smooth=smooth)  # fmt: skip
    return Gold(texts, styles, rewards, smoothed, len(sb.failures))
