"""Grounding reward after VisionReasoner (Liu et al. 2025), each component in [0, 1].

An answer is a JSON list of objects, each with ``bbox_2d`` ``[x1, y1, x2, y2]`` and/or
``point_2d`` ``[x, y]``; ``[]`` says the object is absent.

- ``think_format``: 1 iff the whole completion is ``<think>..</think><answer>..</answer>``.
- ``answer_format``: 1 iff the answer parses as such a list (``[]`` included). VisionReasoner
  gives per-item partial credit in [0, 2] and 0 for ``[]``; ours is all-or-nothing.
- ``accuracy``: predicted and gold items are matched one-to-one by the Hungarian algorithm,
  maximising the summed pair scores ``s(p, g)``; ``accuracy = sum_matched s / max(#pred, #gold)``.
  ``s`` is the fraction of the pair's applicable criteria that hold, each 0/1:
  gold has a box: ``IoU > iou_threshold`` and mean ``|p_box - g_box| < l1_threshold``
  (both fail if the prediction has no box); either has a point: the predicted point exists,
  lies inside the gold box (if any) and within ``point_threshold`` of the gold point (if any).
  VisionReasoner sums the three criteria (range [0, 3]) and checks the point against the
  predicted box and gold point; we average them so the component is in [0, 1].
  ``[]`` against ``[]`` scores 1: the public code scores it 0 (its empty arrays raise
  and the exception path returns 0), which would punish every correct "no object" answer.
- ``non_repeat``: 0 if more than ``max_repeats`` sentences of the text outside the answer
  block (split on ``. ! ?`` and the think tags) repeat an earlier one, else 1. VisionReasoner
  also allows one repeat, but splits the whole completion on ``.`` only, so the answer's
  decimal points make "sentences" there.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from .base import ANSWER_RE, RewardSpec, answer_block, think_answer_format
from .geometry import box_iou, matched_total
from .metrics import grounding_metrics

IOU_THRESHOLD = 0.5
L1_THRESHOLD = 10.0  # pixels, mean over the four coordinates
POINT_THRESHOLD = 30.0  # pixels, Euclidean
MAX_REPEATS = 1
ARITY = {"bbox_2d": 4, "point_2d": 2}
_SEPARATORS = {"compact": (",", ":"), "spaced": None}  # json.dumps: None = ", " and ": "


def parse_items(obj: Any) -> list[dict]:
    """Validate a decoded answer: a list of objects with ``bbox_2d`` and/or ``point_2d``.

    Returns each item with only those keys, in the item's own key order; ValueError otherwise.
    """
    if not isinstance(obj, list):
        raise ValueError(f"expected a JSON list of objects, got {type(obj).__name__}")
    return [_parse_item(i, item) for i, item in enumerate(obj)]


def _parse_item(i: int, item: Any) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"item {i}: expected an object, got {item!r}")
    out = {k: v for k, v in item.items() if k in ARITY}
    if not out:
        raise ValueError(f"item {i}: needs bbox_2d and/or point_2d, got keys {sorted(item)}")
    for key, value in out.items():
        if not (isinstance(value, list) and len(value) == ARITY[key] and all(map(_is_number, value))):
            raise ValueError(f"item {i}: {key} must be a list of {ARITY[key]} finite numbers, got {value!r}")
    box = out.get("bbox_2d")
    if box is not None and (box[2] < box[0] or box[3] < box[1]):
        raise ValueError(f"item {i}: bbox_2d needs x1 <= x2 and y1 <= y2, got {box}")
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def non_repeat(completion: str, max_repeats: int = MAX_REPEATS) -> float:
    """1.0 unless more than ``max_repeats`` sentences outside the answer repeat an earlier one."""
    sentences = [s.strip() for s in re.split(r"[.!?]|</?think>", ANSWER_RE.sub("", completion))]
    sentences = [s for s in sentences if s]
    return float(len(sentences) - len(set(sentences)) <= max_repeats)


# VisionReasoner sums its three accuracy checks (range [0, 3]) beside 0/1 format terms; our
# accuracy averages them into [0, 1], so its default weight 3 restores that balance. It
# matters for ViSurf: at weight 1 a correct "no object" gold without thinking credit
# (eliminate) scores no more than a wrong but well-formatted rollout, and smoothing drops it.
DEFAULT_WEIGHTS = {"think_format": 1.0, "answer_format": 1.0, "accuracy": 3.0, "non_repeat": 1.0}


class GroundingReward(RewardSpec):
    name = "grounding"
    components = ("think_format", "answer_format", "accuracy", "non_repeat")
    think_component = "think_format"
    styles = ("compact", "spaced")  # json.dumps with (",", ":") separators / the defaults
    dataset_style = "compact"

    def __init__(self, weights: Mapping[str, float] | None = None, *, iou_threshold: float = IOU_THRESHOLD,
                 l1_threshold: float = L1_THRESHOLD, point_threshold: float = POINT_THRESHOLD,
                 max_repeats: int = MAX_REPEATS):
        super().__init__(DEFAULT_WEIGHTS if weights is None else weights)
        self.iou_threshold, self.l1_threshold = iou_threshold, l1_threshold
        self.point_threshold, self.max_repeats = point_threshold, max_repeats

    def parse_solution(self, raw: Any) -> list[dict]:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"grounding solution is not valid JSON ({e}): {raw[:80]!r}") from None
        return parse_items(raw)

    def render_answer(self, solution: list[dict], style: str) -> str:
        return json.dumps(solution, separators=_SEPARATORS[style])

    def extract_answer(self, completion: str) -> list[dict] | None:
        text = answer_block(completion)
        if text is None:
            return None
        try:
            return parse_items(json.loads(text))
        except ValueError:  # json.JSONDecodeError included
            return None

    def score(self, completion: str, solution: list[dict]) -> dict[str, float]:
        pred = self.extract_answer(completion)
        return {
            "think_format": float(think_answer_format(completion)),
            "answer_format": float(pred is not None),
            "accuracy": 0.0 if pred is None else self.accuracy(pred, solution),
            "non_repeat": non_repeat(completion, self.max_repeats),
        }

    def accuracy(self, pred: list[dict], gold: list[dict]) -> float:
        """Hungarian-matched pair scores over ``max(#pred, #gold)`` (module docstring)."""
        if not pred and not gold:
            return 1.0  # a correct "no object"; see the module docstring
        if not pred or not gold:
            return 0.0
        scores = np.array([[self.pair_score(p, g) for g in gold] for p in pred])
        return matched_total(scores) / max(len(pred), len(gold))

    def pair_score(self, p: dict, g: dict) -> float:
        """The fraction of the pair's applicable criteria that hold (module docstring)."""
        checks = []
        if "bbox_2d" in g:
            box, gbox = p.get("bbox_2d"), g["bbox_2d"]
            checks += [box is not None and box_iou(box, gbox) > self.iou_threshold,
                       box is not None and float(np.abs(np.subtract(box, gbox)).mean()) < self.l1_threshold]
        if "point_2d" in p or "point_2d" in g:
            checks.append(self._point_ok(p.get("point_2d"), g))
        return sum(checks) / len(checks)

    def _point_ok(self, point: list | None, g: dict) -> bool:
        if point is None:
            return False
        x, y = point
        box, gpoint = g.get("bbox_2d"), g.get("point_2d")
        inside = box is None or (box[0] <= x <= box[2] and box[1] <= y <= box[3])
        near = gpoint is None or math.dist(point, gpoint) < self.point_threshold
        return inside and near

    def metrics(self, completions: Sequence[str], solutions: Sequence[list[dict]]) -> dict[str, float]:
        """``giou``, ``ciou``, ``n_acc``, ``bbox_acc``, ``parse_rate`` (see ``metrics``)."""
        return grounding_metrics([self.extract_answer(c) for c in completions], solutions)
