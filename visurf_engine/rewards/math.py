"""Math / short-answer reward: ``format + accuracy``, each 0 or 1.

- ``format``: the completion is a ``<think>..</think>`` block followed either by exactly
  ``<answer>..</answer>`` or by text containing a ``\\boxed{..}``. The thinking block is
  required either way, so ``format`` is the component the "eliminate" control zeroes for
  the gold (``think_component``); the gold, ``<think></think><answer>..</answer>``, passes it.
- ``accuracy``: the answer is the content of the last ``<answer>`` block, or of the last
  ``\\boxed{..}`` (balanced braces) inside it, or, with no answer block, in the completion.
  Both sides are normalised (``$``, whitespace, ``\\%``/``%``, ``\\!``/``\\,``/``\\;``,
  ``\\left``/``\\right``, ``\\text{..}`` wrappers and a trailing ``.`` dropped,
  ``\\dfrac``/``\\tfrac`` read as ``\\frac``). If both read as numbers (decimal or scientific,
  thousands commas allowed, ``\\frac{a}{b}`` or ``a/b`` of numbers) they match within a
  relative tolerance (``rel_tol``, default 1e-4); otherwise the normalised strings must be equal.
  ``50\\%`` reads as 50, not 0.5.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

from .base import RewardSpec, after_think, answer_block, think_answer_format
from .metrics import rate

REL_TOL = 1e-4
_BOXED = "\\boxed{"
_DROP = re.compile(r"\$|\s|\\[,!;]|\\?%|\\(?:left|right)(?![a-zA-Z])")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRACTION = re.compile(r"([-+]?)(?:\\frac\{([^{}]+)\}\{([^{}]+)\}|([^/]+)/([^/]+))")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced; None if absent or unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def normalise(answer: str) -> str:
    """Drop formatting that does not change an answer's value (module docstring)."""
    s = re.sub(r"\\[dt]frac", r"\\frac", _DROP.sub("", answer))
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return s.rstrip(".")


def to_number(s: str) -> float | None:
    """A normalised answer's value, if it is a number or a fraction of numbers."""
    s = _THOUSANDS.sub("", s)
    if _NUMBER.fullmatch(s):
        return float(s)
    m = _FRACTION.fullmatch(s)
    if not m:
        return None
    num, den = to_number(m[2] or m[4]), to_number(m[3] or m[5])
    if num is None or not den:
        return None
    return (-1 if m[1] == "-" else 1) * num / den


def answers_match(pred: str, gold: str, rel_tol: float = REL_TOL) -> bool:
    """Numeric comparison within ``rel_tol`` if both are numbers, else normalised string equality."""
    p, g = normalise(pred), normalise(gold)
    x, y = to_number(p), to_number(g)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=rel_tol)
    return p == g


class MathReward(RewardSpec):
    name = "math"
    components = ("format", "accuracy")
    think_component = "format"
    styles = ("plain",)  # <answer>{answer}</answer>
    dataset_style = "plain"

    def __init__(self, weights: Mapping[str, float] | None = None, *, rel_tol: float = REL_TOL):
        super().__init__(weights)
        self.rel_tol = rel_tol

    def parse_solution(self, raw: Any) -> str:
        """A string or number; a string with a ``\\boxed{}`` (a worked solution) gives its last one."""
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueError(f"math solution must be a string or a number, got {type(raw).__name__}: {raw!r}")
        answer = str(raw)
        answer = ((last_boxed(answer) if _BOXED in answer else answer) or "").strip()
        if not answer:
            raise ValueError(f"math solution is empty or has an unclosed \\boxed{{}}: {raw!r}")
        return answer

    def render_answer(self, solution: str, style: str) -> str:
        return solution

    def extract_answer(self, completion: str) -> str | None:
        block = answer_block(completion)
        source = completion if block is None else block
        answer = last_boxed(source) if _BOXED in source else block
        return (answer or "").strip() or None

    def score(self, completion: str, solution: str) -> dict[str, float]:
        rest = after_think(completion)
        boxed_ok = rest is not None and last_boxed(rest) is not None
        pred = self.extract_answer(completion)
        return {
            "format": float(think_answer_format(completion) or boxed_ok),
            "accuracy": float(pred is not None and answers_match(pred, solution, self.rel_tol)),
        }

    def metrics(self, completions: Sequence[str], solutions: Sequence[str]) -> dict[str, float]:
        """``accuracy`` (share of correct answers) and ``parse_rate`` (share with an answer)."""
        if len(completions) != len(solutions):
            raise ValueError(f"metrics: {len(completions)} completions for {len(solutions)} solutions")
        preds = [self.extract_answer(c) for c in completions]
        return {
            "accuracy": rate([p is not None and answers_match(p, s, self.rel_tol) for p, s in zip(preds, solutions)]),
            "parse_rate": rate([p is not None for p in preds]),
        }
