"""The forgetting probe's scoring: answer extraction, count vs colour matching, per-kind rates."""

from __future__ import annotations

import math

import pytest

from visurf_engine.config import ConfigError, load_config
from visurf_engine.tasks.shapes.probe import make_probe_split, probe_correct, probe_metrics


@pytest.mark.parametrize("completion, solution, expected", [
    ("<answer>2</answer>", "2", True),
    ("<think>two shapes</think><answer> 02 </answer>", "2", True),  # read as an integer
    ("<answer>2.</answer>", "2", True),  # a trailing full stop is dropped
    ("<answer>3</answer>", "2", False),
    ("<answer>two</answer>", "2", False),  # a count must be written as a number
    ("<answer>2.5</answer>", "2", False),
    ("2", "2", False),  # no answer block
    ("<answer>1</answer><answer>2</answer>", "2", True),  # the last block counts
    ("<answer>Red</answer>", "red", True),  # colours compare lower-case
    ("<answer> blue. </answer>", "blue", True),
    ("<answer>the red one</answer>", "red", False),
    ("<answer>green</answer>", "red", False),
    ("<answer></answer>", "red", False),
])
def test_probe_correct(completion, solution, expected):
    assert probe_correct(completion, solution) is expected


def test_probe_metrics_hand_computed():
    completions = ["<answer>2</answer>", "<answer>1</answer>", "<answer>red</answer>", "no answer", "<answer>3</answer>"]
    solutions = ["2", "2", "red", "blue", "3"]
    questions = ["count", "count", "colour", "colour", "count"]
    m = probe_metrics(completions, solutions, questions)
    assert m == {"probe_acc": pytest.approx(3 / 5), "probe_acc/colour": 0.5, "probe_acc/count": pytest.approx(2 / 3)}
    assert math.isnan(probe_metrics([], [], [])["probe_acc"])
    with pytest.raises(ValueError, match="2 completions, 1 solutions"):
        probe_metrics(["a", "b"], ["2"], ["count", "count"])


def test_probe_rows_score_their_own_solutions():
    rows = make_probe_split(40, seed=3)
    gold = [f"<answer>{r.solution}</answer>" for r in rows]
    m = probe_metrics(gold, [r.solution for r in rows], [r.meta["question"] for r in rows])
    assert m["probe_acc"] == 1.0 and set(m) == {"probe_acc", "probe_acc/colour", "probe_acc/count"}


def test_probe_size_is_validated():
    assert load_config(None, ["data.probe_size=10"]).data.probe_size == 10
    with pytest.raises(ConfigError, match="data.probe_size"):
        load_config(None, ["data.probe_size=-1"])
    with pytest.raises(ConfigError, match="data.probe_size"):  # the probe is a shapes-task family
        load_config(None, ["data.task=files", "data.train_path=x.jsonl", "data.eval_path=y.jsonl", "data.probe_size=10"])
    # unset, it is on for the embedded task and off for files, so a files config loads as is
    assert load_config(None, []).data.probe_size == 100
    assert load_config(None, ["data.task=files", "data.train_path=x.jsonl", "data.eval_split=0.1"]).data.probe_size == 0
