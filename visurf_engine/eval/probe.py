"""The forgetting probe: short-answer questions outside the post-training data.

On the embedded task the probe asks, about the same kind of images, "how many shapes" (a
count, e.g. ``"2"``) or "what colour is the circle" (e.g. ``"red"``); see
``data.shapes.make_probe_split``. A completion is correct when the text of its last
``<answer>...</answer>`` block, stripped and with a trailing ``.`` dropped, equals the
solution: as an integer when the solution is a count (``"02"`` reads as 2), as a
lower-case word otherwise (``"Red"`` reads as ``"red"``). Anything else scores 0.
"""

from __future__ import annotations

from typing import Sequence

from ..rewards.base import answer_block
from .metrics import rate


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
