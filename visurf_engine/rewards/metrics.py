"""Evaluation metrics of the reward families (``RewardSpec.metrics``): grounding (gIoU, cIoU,
N-Acc, bbox_acc) and rates. Box geometry (unions, IoU): ``geometry``.

Grounding, per sample with prediction ``P`` (a parsed item list, or None if unparseable)
and gold ``G`` (``[]`` = the object is absent); items without ``bbox_2d`` cover no area:

- ``giou``: mean of the per-sample score: 0 if ``P`` is None; 1 if ``P == G == []``;
  0 if exactly one of them is ``[]``; else the IoU of the box unions.
- ``ciou``: ``sum |P & G| / sum |P | G|`` over all samples (an unparseable ``P`` covers
  nothing; a box predicted for an absent object adds its area to the union).
- ``n_acc``: share of absent-object samples answered ``[]``; NaN if there are none.
- ``bbox_acc``: share of present-object samples whose per-sample IoU exceeds 0.5; NaN if none.
- ``parse_rate``: share of samples whose answer parsed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .geometry import boxes_of, iou, overlap

BBOX_ACC_IOU = 0.5


def sample_iou(pred: list[dict] | None, gold: list[dict]) -> float:
    """The per-sample gIoU term (module docstring)."""
    if pred is None:
        return 0.0
    if not pred or not gold:
        return float(not pred and not gold)
    return iou(boxes_of(pred), boxes_of(gold))


def rate(values) -> float:
    """Mean of ``values`` (booleans or floats); NaN when empty."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def grounding_metrics(preds: Sequence[list[dict] | None], golds: Sequence[list[dict]]) -> dict[str, float]:
    """``giou``, ``ciou``, ``n_acc``, ``bbox_acc``, ``parse_rate`` (module docstring)."""
    if len(preds) != len(golds):
        raise ValueError(f"grounding_metrics: {len(preds)} predictions for {len(golds)} golds")
    ious = np.array([sample_iou(p, g) for p, g in zip(preds, golds)])
    absent = np.array([not g for g in golds], dtype=bool)
    inter, union = np.array([overlap(boxes_of(p or []), boxes_of(g)) for p, g in zip(preds, golds)]).reshape(-1, 2).sum(0)
    return {
        "giou": rate(ious),
        "ciou": float(inter / union) if union > 0 else float("nan"),
        "n_acc": rate(ious[absent]),  # an absent object's sample IoU is 1 for `[]`, else 0
        "bbox_acc": rate(ious[~absent] > BBOX_ACC_IOU),
        "parse_rate": rate([p is not None for p in preds]),
    }
