"""Evaluation metrics: grounding (gIoU, cIoU, N-Acc, bbox_acc) and rates.

Geometry: boxes are ``[x1, y1, x2, y2]`` in continuous coordinates (x2/y2 are edges, as
in the shapes task), area ``(x2 - x1) * (y2 - y1)``. A sample's boxes are taken as one
region, the union of its boxes, as gRefCOCO does with masks: ``IoU = |P & G| / |P | G|``
(0 when the union has no area: touching boxes share no area, a degenerate box covers none).

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

BBOX_ACC_IOU = 0.5


def overlap(pred_boxes: Sequence[Sequence[float]], gold_boxes: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Areas ``(|P & G|, |P | G|)`` of the unions ``P``, ``G`` of two box lists.

    Exact by coordinate compression: the boxes' edges cut the plane into cells that each
    lie wholly inside or outside every box, so each cell is tested at its centre.
    """
    boxes = np.asarray([*pred_boxes, *gold_boxes], dtype=np.float64).reshape(-1, 4)
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    cx, cy = (xs[1:] + xs[:-1]) / 2, (ys[1:] + ys[:-1]) / 2
    area = np.outer(np.diff(xs), np.diff(ys))
    p, g = _covered(boxes[: len(pred_boxes)], cx, cy), _covered(boxes[len(pred_boxes):], cx, cy)
    return float(area[p & g].sum()), float(area[p | g].sum())


def _covered(boxes: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """``[len(cx), len(cy)]``: whether cell (i, j) lies in any of ``boxes``."""
    in_x = ((boxes[:, [0]] <= cx) & (cx <= boxes[:, [2]])).astype(np.float64)  # [K, nx]
    in_y = ((boxes[:, [1]] <= cy) & (cy <= boxes[:, [3]])).astype(np.float64)  # [K, ny]
    return in_x.T @ in_y > 0


def iou(pred_boxes: Sequence[Sequence[float]], gold_boxes: Sequence[Sequence[float]]) -> float:
    """IoU of the unions of two box lists; 0 when the union has no area."""
    inter, union = overlap(pred_boxes, gold_boxes)
    return inter / union if union > 0 else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes."""
    return iou([a], [b])


def boxes_of(items: Sequence[dict]) -> list:
    """The ``bbox_2d`` of every item that has one."""
    return [item["bbox_2d"] for item in items if "bbox_2d" in item]


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
