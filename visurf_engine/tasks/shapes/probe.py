"""The forgetting probe: short-answer questions outside the post-training data.

The probe asks, about the same kind of images as the grounding task, "how many shapes" (a
count, e.g. ``"2"``) or "what colour is the circle" (e.g. ``"red"``): ``make_probe_split``.
The warm-started base model learns them; post-training never sees them. A completion is
correct when the text of its last ``<answer>...</answer>`` block, stripped and with a trailing
``.`` dropped, equals the solution: as an integer when the solution is a count (``"02"`` reads as 2), as a
lower-case word otherwise (``"Red"`` reads as ``"red"``). Anything else scores 0.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from ...data.rows import Row
from ...rewards.base import answer_block
from ...rewards.metrics import rate
from .generator import render, scene

COUNT_QUESTION = "How many shapes are in the image? Answer with a number inside <answer></answer>."
COLOUR_QUESTION = "What colour is the {shape}? Answer with a colour name inside <answer></answer>."


def make_probe_split(n: int, seed: int) -> list[Row]:
    """``n`` probe rows: "how many shapes" (answer e.g. ``"2"``) or, when the shape is unique
    in its image, "what colour is the circle" (answer e.g. ``"red"``), half and half where possible."""
    if n < 0:
        raise ValueError(f"need n >= 0, got {n}")
    rows = []
    for i in range(n):
        rng = random.Random(f"probe:{seed}:{i}")
        objects = scene(rng)
        counts = Counter(shape for _, shape, _, _ in objects)
        unique = [obj for obj in objects if counts[obj[1]] == 1]
        if unique and rng.random() < 0.5:
            colour, shape, _, _ = rng.choice(unique)
            question, problem, solution = "colour", COLOUR_QUESTION.format(shape=shape), colour
        else:
            question, problem, solution = "count", COUNT_QUESTION, str(len(objects))
        rows.append(Row(f"probe-{seed}-{i}", render(objects), problem, solution,
                        {"question": question, "objects": objects}))
    return rows


def probe_correct(completion: str, solution: str) -> bool:
    """Whether ``completion`` answers the probe question whose answer is ``solution``."""
    text = answer_block(completion)
    if text is None:
        return False
    text = text.rstrip(".").strip().lower()
    if solution.isdigit():
        return text.isdigit() and int(text) == int(solution)
    return text == solution.lower()


def probe_metrics(completions: Sequence[str], solutions: Sequence[str], questions: Sequence[str]) -> dict[str, float]:
    """``probe_acc`` over all rows and ``probe_acc/<question>`` per question kind (NaN if empty)."""
    if not len(completions) == len(solutions) == len(questions):
        raise ValueError(f"probe_metrics: {len(completions)} completions, {len(solutions)} solutions, {len(questions)} questions")
    correct = [probe_correct(c, s) for c, s in zip(completions, solutions)]
    out = {"probe_acc": rate(correct)}
    for kind in sorted(set(questions)):
        out[f"probe_acc/{kind}"] = rate([ok for ok, q in zip(correct, questions) if q == kind])
    return out


def probe_row_metrics(completions: Sequence[str], rows: Sequence[Row]) -> dict[str, float]:
    """``probe_metrics`` of ``completions`` against the probe ``rows`` they answer."""
    return probe_metrics(completions, [r.solution for r in rows], [r.meta["question"] for r in rows])
