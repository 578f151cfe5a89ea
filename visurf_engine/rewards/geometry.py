"""Box geometry shared by the grounding reward and its evaluation metrics (a leaf: numpy, scipy).

Boxes are ``[x1, y1, x2, y2]`` in continuous coordinates (x2/y2 are edges, as in the shapes
task), area ``(x2 - x1) * (y2 - y1)``. A sample's boxes are taken as one region, the union of
its boxes, as gRefCOCO does with masks: ``IoU = |P & G| / |P | G|`` (0 when the union has no
area: touching boxes share no area, a degenerate box covers none). ``matched_total`` is the
one-to-one matching of predicted and gold items (Hungarian algorithm) by pair scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


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


def matched_total(scores: np.ndarray) -> float:
    """The largest sum of pair scores ``scores[p, g]`` over one-to-one matchings of the rows
    (predictions) to the columns (golds)."""
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return float(scores[rows, cols].sum())
