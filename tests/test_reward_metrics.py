"""The reward families' eval metrics and the box geometry beneath them: gIoU / cIoU / N-Acc /
bbox_acc, hand-computed."""

from __future__ import annotations

import json
import math

import pytest

from visurf_engine.rewards import get_reward
from visurf_engine.rewards.geometry import box_iou, iou, overlap
from visurf_engine.rewards.metrics import grounding_metrics, rate, sample_iou

A = [0, 0, 10, 10]


@pytest.mark.parametrize("a, b, expected", [
    (A, A, 1.0),
    (A, [10, 0, 20, 10], 0.0),  # touching edges share no area
    (A, [5, 0, 15, 10], 50 / 150),
    (A, [0, 0, 5, 5], 25 / 100),  # containment
    (A, [20, 20, 30, 30], 0.0),
    ([5, 5, 5, 9], [5, 5, 5, 9], 0.0),  # degenerate: no area at all
    ([5, 0, 5, 10], A, 0.0),  # a line inside a box
    ([0.5, 0, 1.5, 2], [1, 0, 2, 2], 1 / 3),  # fractional coordinates
])
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_union_of_boxes_counts_overlap_once():
    # two overlapping predicted boxes cover 150, not 200: exactly the gold box
    pred, gold = [A, [5, 0, 15, 10]], [[0, 0, 15, 10]]
    assert overlap(pred, gold) == (150.0, 150.0)
    assert iou(pred, gold) == 1.0
    # disjoint gold boxes; one predicted box covers one of them: 100 / 200
    assert iou([A], [A, [20, 0, 30, 10]]) == pytest.approx(0.5)
    assert overlap([], []) == (0.0, 0.0) and iou([], [A]) == 0.0


def test_sample_iou_cases():
    gold = [{"bbox_2d": A}]
    assert sample_iou([], []) == 1.0
    assert sample_iou([], gold) == 0.0
    assert sample_iou(gold, []) == 0.0
    assert sample_iou(None, []) == 0.0 and sample_iou(None, gold) == 0.0
    assert sample_iou([{"point_2d": [5, 5]}], gold) == 0.0  # a point covers no area
    assert sample_iou([{"bbox_2d": [0, 0, 10, 5]}], gold) == 0.5


def test_grounding_metrics_hand_computed():
    gold, half = [{"bbox_2d": A}], [{"bbox_2d": [0, 0, 10, 5]}]
    preds = [half, gold, [], gold, None, []]
    golds = [gold, gold, [], [], gold, gold]
    # per-sample IoU: 0.5, 1, 1 (correct []), 0 (box for absent), 0 (unparseable), 0 ([] for present)
    m = grounding_metrics(preds, golds)
    assert m["giou"] == pytest.approx(2.5 / 6)
    assert m["n_acc"] == 0.5  # absent samples 3, 4: one answered []
    assert m["bbox_acc"] == 0.25  # present samples 1, 2, 5, 6: only 2 has IoU > 0.5 (sample 1 is = 0.5)
    assert m["parse_rate"] == pytest.approx(5 / 6)
    # intersections 50 + 100; unions 100 + 100 + 0 + 100 (absent: the box) + 100 + 100
    assert m["ciou"] == pytest.approx(150 / 500)


def test_grounding_metrics_undefined_shares_are_nan():
    gold = [{"bbox_2d": A}]
    present = grounding_metrics([gold], [gold])
    assert math.isnan(present["n_acc"]) and present["bbox_acc"] == 1.0 and present["giou"] == 1.0
    absent = grounding_metrics([[]], [[]])
    assert math.isnan(absent["bbox_acc"]) and math.isnan(absent["ciou"]) and absent["n_acc"] == 1.0
    assert math.isnan(grounding_metrics([], [])["giou"])
    with pytest.raises(ValueError, match="1 predictions for 2 golds"):
        grounding_metrics([gold], [gold, gold])


def test_rate():
    assert rate([True, False, True, True]) == 0.75
    assert math.isnan(rate([]))


def test_grounding_reward_metrics_from_completions():
    spec = get_reward("grounding")
    gold = [{"bbox_2d": [0, 0, 20, 20]}]
    completions = [
        f"<think>t</think><answer>{json.dumps([{'bbox_2d': [0, 0, 20, 10]}])}</answer>",  # IoU 0.5
        "<think>t</think><answer>[]</answer>",  # correct no-object
        "<think>t</think><answer>[{\"bbox_2d\": [0, 0]}]</answer>",  # unparseable
        "<answer>[{\"bbox_2d\": [0, 0, 20, 20]}]</answer>",  # exact, no thinking needed for eval
    ]
    m = spec.metrics(completions, [gold, [], gold, gold])
    assert m["giou"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert m["n_acc"] == 1.0 and m["bbox_acc"] == pytest.approx(1 / 3) and m["parse_rate"] == 0.75


def test_math_metrics():
    spec = get_reward("math")
    completions = ["<answer>4</answer>", r"\boxed{0.5}", "<answer>5</answer>", "no answer"]
    m = spec.metrics(completions, ["4", r"\frac{1}{2}", "4", "4"])
    assert m == {"accuracy": 0.5, "parse_rate": 0.75}
