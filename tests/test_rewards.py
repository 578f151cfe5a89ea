"""Reward functions: grounding components, math answers, the registry and batch scoring."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from visurf_engine.rewards import REWARDS, GroundingReward, MathReward, get_reward, register, score_batch
from visurf_engine.rewards.grounding import non_repeat
from visurf_engine.rewards.math import answers_match, last_boxed

G = get_reward("grounding")
M = get_reward("math")
BOX = [0, 0, 10, 10]
GOLD = [{"bbox_2d": BOX}]


def answer(items) -> str:
    return f"<think>Looking.</think><answer>{json.dumps(items)}</answer>"


def acc(pred_items, gold_items, spec=G) -> float:
    return spec.score(answer(pred_items), gold_items)["accuracy"]


# --- grounding: think format -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><answer>[]</answer>", 1.0),
    ("\n<think>\nline 1\nline 2\n</think>\n\n<answer>\n[]\n</answer>\n", 1.0),
    ("<think></think><answer>[]</answer>", 1.0),  # empty thinking passes, as in VisionReasoner
    ("<answer>[]</answer>", 0.0),  # no think block (the gold)
    ("<think>a</think>", 0.0),
    ("Sure! <think>a</think><answer>[]</answer>", 0.0),  # text before
    ("<think>a</think><answer>[]</answer> done", 0.0),  # text after
    ("<think>a</think>b<answer>[]</answer>", 0.0),  # text between
    ("<think>a</think><answer>[]</answer><answer>[]</answer>", 0.0),  # two answers
    ("<think>a<think>b</think></think><answer>[]</answer>", 0.0),  # nested think
    ("<answer>[]</answer><think>a</think>", 0.0),  # wrong order
])
def test_think_format(text, expected):
    assert G.score(text, [])["think_format"] == expected


# --- grounding: answer format ------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ("[]", 1.0),
    ('[{"bbox_2d": [1, 2, 3, 4]}]', 1.0),
    ('[{"point_2d": [1.5, 2]}]', 1.0),
    ('[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "label": "x"}]', 1.0),
    ('[{"bbox_2d": [1, 2, 3, 4]}', 0.0),  # malformed JSON
    ('{"bbox_2d": [1, 2, 3, 4]}', 0.0),  # not a list
    ('[{"bbox_2d": [1, 2, 3]}]', 0.0),
    ('[{"bbox_2d": ["1", 2, 3, 4]}]', 0.0),
    ('[{"bbox_2d": [true, 2, 3, 4]}]', 0.0),
    ('[{"bbox_2d": [NaN, 2, 3, 4]}]', 0.0),
    ('[{"bbox_2d": [5, 2, 3, 4]}]', 0.0),  # x2 < x1
    ('[{"point_2d": [1, 2, 3]}]', 0.0),
    ('[{"label": "cat"}]', 0.0),
    ('[[1, 2, 3, 4]]', 0.0),
    ('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2]}]', 0.0),  # one bad item spoils the list
])
def test_answer_format(body, expected):
    scores = G.score(f"<think>a</think><answer>{body}</answer>", GOLD)
    assert scores["answer_format"] == expected
    if expected == 0.0:
        assert scores["accuracy"] == 0.0


def test_missing_answer_block_scores_zero_format_and_accuracy():
    scores = G.score("<think>a</think> [{\"bbox_2d\": [0, 0, 10, 10]}]", GOLD)
    assert scores["answer_format"] == scores["accuracy"] == 0.0


# --- grounding: accuracy -----------------------------------------------------------------

def test_exact_box_and_absent_object_cases():
    assert acc(GOLD, GOLD) == 1.0
    assert acc([], []) == 1.0  # deliberate: the public code scores this 0 via an exception path
    assert acc([], GOLD) == 0.0
    assert acc(GOLD, []) == 0.0


def test_iou_and_l1_criteria_are_strict_and_averaged():
    # IoU = 50 / 100 = 0.5 (not > 0.5); mean L1 = 5 / 4 = 1.25 < 10 -> 1 of 2 criteria
    assert acc([{"bbox_2d": [0, 0, 10, 5]}], GOLD) == 0.5
    # gold 100x100, pred shifted 20: IoU = 8000 / 12000 = 0.667; mean L1 = 40 / 4 = 10 (not < 10)
    gold, pred = [{"bbox_2d": [0, 0, 100, 100]}], [{"bbox_2d": [20, 0, 120, 100]}]
    assert acc(pred, gold) == 0.5
    assert acc(pred, gold, GroundingReward(l1_threshold=10.5)) == 1.0
    assert acc([{"bbox_2d": [100, 100, 110, 110]}], GOLD) == 0.0


def test_touching_and_degenerate_boxes():
    # touching: IoU 0; mean L1 = (10 + 0 + 10 + 0) / 4 = 5 < 10 -> 0.5
    assert acc([{"bbox_2d": [10, 0, 20, 10]}], GOLD) == 0.5
    # a zero-area box has IoU 0 even with itself; L1 = 0 still counts -> 0.5
    degenerate = [{"bbox_2d": [5, 5, 5, 9]}]
    assert acc(degenerate, degenerate) == 0.5


def test_extra_missing_and_duplicate_items_divide_by_the_larger_count():
    far = {"bbox_2d": [100, 100, 110, 110]}
    assert acc(GOLD + [far], GOLD) == 0.5  # extra prediction
    assert acc(GOLD, GOLD + [far]) == 0.5  # missing prediction
    assert acc(GOLD + GOLD, GOLD) == 0.5  # duplicate: one gold matches one prediction
    assert acc([far] + GOLD, GOLD + [far]) == 1.0  # order does not matter


def test_hungarian_beats_greedy_matching():
    # scores (pred x gold): p1 meets both golds fully; p2 meets A fully but only L1 for B.
    # Greedy p1->A leaves p2->B = 0.5 (mean 0.75); the optimum p1->B, p2->A gives 1.
    a, b = [0, 0, 10, 10], [2, 0, 12, 10]
    p1, p2 = [1, 0, 11, 10], [-2, 0, 8, 10]
    assert G.pair_score({"bbox_2d": p2}, {"bbox_2d": b}) == 0.5
    assert acc([{"bbox_2d": p1}, {"bbox_2d": p2}], [{"bbox_2d": a}, {"bbox_2d": b}]) == 1.0


def test_point_criteria():
    inside, outside = {"bbox_2d": BOX, "point_2d": [5, 5]}, {"bbox_2d": BOX, "point_2d": [20, 20]}
    assert acc([inside], GOLD) == 1.0
    assert acc([outside], GOLD) == pytest.approx(2 / 3)  # a point outside the gold box fails 1 of 3
    for point in ([20, 5], [5, 20], [-1, 5], [5, -1]):  # out in one coordinate only
        assert acc([{"bbox_2d": BOX, "point_2d": point}], GOLD) == pytest.approx(2 / 3)
    assert acc([{"bbox_2d": BOX, "point_2d": [10, 0]}], GOLD) == 1.0  # the edge is inside
    assert acc(GOLD, [inside]) == pytest.approx(2 / 3)  # the gold has a point, the prediction none
    gold_point = [{"point_2d": [5, 5]}]
    assert acc([{"point_2d": [5, 30]}], gold_point) == 1.0  # distance 25 < 30
    assert acc([{"point_2d": [5, 40]}], gold_point) == 0.0  # distance 35
    assert acc(GOLD, gold_point) == 0.0  # a box alone cannot meet a point criterion


# --- grounding: non-repeat ---------------------------------------------------------------

def test_non_repeat():
    assert non_repeat("<think>A. B. A. C</think>") == 1.0  # one repeat is allowed, as in VisionReasoner
    assert non_repeat("<think>A. B. A. B.</think>") == 0.0
    assert non_repeat("<think>Hmm! Hmm? Hmm.</think>") == 0.0
    assert non_repeat("<think>A. B. A</think>", max_repeats=0) == 0.0
    # decimal points inside the answer are not sentence ends
    box = {"bbox_2d": [1.5, 1.5, 2.5, 2.5]}
    assert G.score(answer([box, box, box]), [box])["non_repeat"] == 1.0


# --- grounding: parsing, rendering, styles ----------------------------------------------

def test_parse_solution_accepts_text_and_objects_and_keeps_key_order():
    assert G.parse_solution('[{"bbox_2d":[4,4,24,24]}]') == [{"bbox_2d": [4, 4, 24, 24]}]
    assert G.parse_solution([]) == [] and G.parse_solution("[]") == []
    parsed = G.parse_solution([{"point_2d": [1, 2], "label": "x", "bbox_2d": [0, 0, 3, 3]}])
    assert list(parsed[0]) == ["point_2d", "bbox_2d"]


@pytest.mark.parametrize("raw, message", [
    ("not json", "not valid JSON"),
    ('{"bbox_2d": [1, 2, 3, 4]}', "expected a JSON list"),
    ('[{"bbox_2d": [1, 2, 3]}]', "4 finite numbers"),
    ('[{"bbox_2d": ["a", 2, 3, 4]}]', "4 finite numbers"),
    ([{"bbox_2d": [float("inf"), 2, 3, 4]}], "4 finite numbers"),
    ('[{"bbox_2d": [1, 5, 3, 4]}]', "x1 <= x2 and y1 <= y2"),
    ('[{"point_2d": [1]}]', "2 finite numbers"),
    ('[{"label": "cat"}]', "needs bbox_2d and/or point_2d"),
    ('["box"]', "expected an object"),
])
def test_parse_solution_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        G.parse_solution(raw)


def test_render_and_detect_style_round_trip():
    sol = [{"bbox_2d": [4, 4, 24, 24]}]
    assert G.render(sol, "compact") == '<think></think><answer>[{"bbox_2d":[4,4,24,24]}]</answer>'
    assert G.render(sol, "spaced") == '<think></think><answer>[{"bbox_2d": [4, 4, 24, 24]}]</answer>'
    assert G.answer(sol, "spaced") == '<answer>[{"bbox_2d": [4, 4, 24, 24]}]</answer>'
    # the gold passes the format check on its own (eliminate is what removes that credit)
    assert G.score(G.render(sol, "spaced"), sol) == {"think_format": 1.0, "answer_format": 1.0, "accuracy": 1.0, "non_repeat": 1.0}
    assert G.dataset_style == "compact" and G.think_component == "think_format"
    two = [{"bbox_2d": [1.5, 2, 3, 4], "point_2d": [2, 3]}, {"point_2d": [7, 8]}]
    for s in (sol, two):
        for style in G.styles:
            gold = G.render(s, style)
            assert G.detect_style(gold) == style
            assert G.detect_style(f"<think>x</think>\n{G.answer(s, style)}") == style
            assert G.extract_answer(gold) == s


@pytest.mark.parametrize("text", [
    "<answer>[]</answer>",  # the same in every style
    '<answer>[{"bbox_2d":[4, 4, 24, 24]}]</answer>',  # mixed spacing
    '<answer>[{"bbox_2d": [4, 4, 24, 24], "label": "x"}]</answer>',  # extra key not re-rendered
    "<answer>[{</answer>",
    "no answer",
])
def test_detect_style_none(text):
    assert G.detect_style(text) is None


def test_unknown_style():
    with pytest.raises(ValueError, match="unknown style"):
        G.render([], "pretty")


def test_weights_and_total():
    spec = GroundingReward({"accuracy": 3.0})
    comps = {"think_format": 1.0, "answer_format": 1.0, "accuracy": 0.5, "non_repeat": 0.0}
    assert spec.total(comps) == 1 + 1 + 1.5 + 0
    with pytest.raises(ValueError, match="unknown weight"):
        GroundingReward({"acc": 1.0})


# --- math --------------------------------------------------------------------------------

def test_last_boxed_balances_braces():
    assert last_boxed(r"so \boxed{\frac{\sqrt{3}}{2}} done") == r"\frac{\sqrt{3}}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert last_boxed("42") is None


@pytest.mark.parametrize("pred, gold, expected", [
    (r"\frac{1}{2}", "0.5", True),
    (r"-\dfrac{3}{4}", "-0.75", True),
    ("3/4", "0.75", True),
    ("3.1416", "3.14159", True),  # relative error 3e-6
    ("3.14", "3.14159", False),  # relative error 5e-4
    ("1,000", "1000", True),
    ("$5$", "5", True),
    (r"50\%", "50", True),
    ("12.", "12", True),
    (r"\text{red}", "red", True),
    ("x + 1", "x+1", True),
    ("x+1", "x+2", False),
    (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt{3}}{2}", True),
    ("1,2", "12", False),
    ("1/0", "1/0", True),  # not a number: compared as strings
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


@pytest.mark.parametrize("text, fmt, accuracy", [
    ("<think>2 + 2</think><answer>4</answer>", 1.0, 1.0),
    (r"<think>2 + 2</think> The answer is \boxed{4}.", 1.0, 1.0),
    (r"<think>2 + 2</think><answer>\boxed{4}</answer>", 1.0, 1.0),
    ("<answer>4</answer>", 0.0, 1.0),  # the gold rendering: no thinking
    (r"\boxed{4}", 0.0, 1.0),
    ("<think>2 + 2</think> 4", 0.0, 0.0),
    (r"<think>x</think><answer>\boxed{4</answer>", 1.0, 0.0),  # unclosed box inside the answer
    (r"<think>x</think><answer>5</answer> \boxed{4}", 1.0, 0.0),  # the answer block wins
])
def test_math_score(text, fmt, accuracy):
    assert M.score(text, "4") == {"format": fmt, "accuracy": accuracy}


def test_math_parse_render_detect():
    assert M.parse_solution(" 42 ") == "42" and M.parse_solution(42) == "42"
    assert M.parse_solution(r"Adding gives \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    for bad in ("", "  ", None, True, [1], r"\boxed{1"):
        with pytest.raises(ValueError, match="math solution"):
            M.parse_solution(bad)
    assert M.render("42", "plain") == "<think></think><answer>42</answer>"
    assert M.score(M.render("42", "plain"), "42") == {"format": 1.0, "accuracy": 1.0}
    assert M.detect_style("<think>x</think><answer> 42 </answer>") == "plain"
    assert M.detect_style(r"\boxed{42}") is None
    assert M.think_component == "format" and M.styles == ("plain",)
    assert MathReward(rel_tol=0.01).score("<answer>3.14</answer>", "3.14159")["accuracy"] == 1.0


# --- registry and batch scoring ----------------------------------------------------------

def test_registry():
    assert set(REWARDS) >= {"grounding", "math"} and isinstance(G, GroundingReward)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(MathReward())


class Flaky(MathReward):
    """Raises for solution "boom", returns NaN for "nan", inf for "inf"."""

    def score(self, completion, solution):
        if solution == "boom":
            raise RuntimeError("boom")
        scores = super().score(completion, solution)
        if solution in ("nan", "inf"):
            scores["format"] = float(solution)
        return scores


def test_score_batch_contains_failures(caplog):
    spec = Flaky({"accuracy": 2.0})
    ok = "<think>t</think><answer>4</answer>"
    with caplog.at_level(logging.WARNING, logger="visurf_engine.rewards.base"):
        batch = score_batch(spec, [ok, ok, "<answer>4</answer>", ok, "<answer>5</answer>"],
                            ["4", "boom", "4", "nan", "inf"], ["s0", "s1", "s2", "s3", "s4"])
    assert batch.names == ("format", "accuracy")
    assert batch.components.dtype == batch.total.dtype == torch.float64 and batch.components.shape == (5, 2)
    assert batch.components.tolist() == [[1, 1], [0, 0], [0, 1], [0, 0], [0, 0]]
    assert batch.total.tolist() == [3, 0, 2, 0, 0]
    assert [sid for sid, _ in batch.failures] == ["s1", "s3", "s4"]
    assert batch.failures[0][1] == "RuntimeError: boom"
    assert batch.failures[1][1].startswith("ValueError: non-finite reward")
    assert "s1" in caplog.text and "RuntimeError: boom" in caplog.text and "s4" in caplog.text
    with pytest.raises(ValueError, match="2 completions, 1 solutions"):
        score_batch(spec, [ok, ok], ["4"], ["a", "b"])


def test_score_batch_grounding_and_empty():
    texts = [answer(GOLD), answer([]), "<answer>[]</answer>"]
    batch = score_batch(G, texts, [GOLD, [], []], ["a", "b", "c"])
    assert batch.components.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch.total.tolist() == [6, 6, 5] and not batch.failures  # default accuracy weight 3
    empty = score_batch(G, [], [], [])
    assert empty.components.shape == (0, 4) and empty.total.shape == (0,)
    assert math.isclose(G.total(G.score(texts[0], GOLD)), 6.0)
    unit = GroundingReward(weights={"accuracy": 1.0})
    assert score_batch(unit, texts, [GOLD, [], []], ["a", "b", "c"]).total.tolist() == [4, 4, 3]
