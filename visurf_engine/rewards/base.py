"""The reward contract every task family implements, and fault-tolerant batch scoring.

A reward is a weighted sum of named components, ``r = sum_c w_c * r_c`` (``docs/design.md`` §1),
computed in float64 and rounded to a grid of ``10**-REWARD_DECIMALS`` (``weighted_total``), so
that totals which are equal in exact arithmetic are equal in floating point: e.g. the grounding
components ``(1, 1, 1/9, 0)`` and ``(0, 0, 4/9, 1)`` under weights ``(1, 1, 3, 1)`` are both 7/3,
yet their float32 (or unrounded float64) sums differ by a rounding step, and a group's flatness
test (max == min) and the gold's smoothing test (max >= r*) must see such ties as ties. A total
reachable by a reward (small rational components) lies far from a grid midpoint, so rounding
never splits two totals closer than 1e-9 apart that are exactly equal.
A completion is ``<think>...</think><answer>...</answer>``; the gold is rendered in the same
template with its reasoning slot empty, ``<think></think><answer>...</answer>`` (it has no
reasoning trace), the answer in one of the task's styles.
"""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

# A block's content may not open or close another block of the same tag.
EMPTY_THINK = "<think></think>"  # the gold's reasoning slot
_THINK = r"<think>(?:(?!</?think>).)*</think>"
_ANSWER = r"<answer>((?:(?!</?answer>).)*)</answer>"
ANSWER_RE = re.compile(_ANSWER, re.DOTALL)
_AFTER_THINK_RE = re.compile(rf"\s*{_THINK}(.*)", re.DOTALL)
_ANSWER_ONLY_RE = re.compile(rf"\s*{_ANSWER}\s*", re.DOTALL)


def answer_block(completion: str) -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` block, or None."""
    blocks = ANSWER_RE.findall(completion)
    return blocks[-1].strip() if blocks else None


def after_think(completion: str) -> str | None:
    """The text after a leading ``<think>...</think>`` block (whitespace before it allowed), or None."""
    m = _AFTER_THINK_RE.fullmatch(completion)
    return m[1] if m else None


def think_answer_format(completion: str) -> bool:
    """Whether the whole completion is ``<think>..</think>`` then ``<answer>..</answer>``.

    VisionReasoner's regex ``<think>.*?</think>\\s*<answer>.*?</answer>`` (full match), with
    surrounding whitespace allowed and no nested or repeated think/answer tags. An empty
    think block passes, as it does there.
    """
    rest = after_think(completion)
    return rest is not None and _ANSWER_ONLY_RE.fullmatch(rest) is not None


class RewardSpec(ABC):
    """One task family's reward: components, gold rendering styles, parsing, eval metrics.

    ``solution`` everywhere is what ``parse_solution`` returns; ``extract_answer`` returns
    the same type (or None), so a parsed prediction can be rendered and compared.
    """

    name: str
    components: tuple[str, ...]
    think_component: str | None  # zeroed for the gold by the "eliminate" control
    styles: tuple[str, ...]  # candidate renderings of a gold answer
    dataset_style: str  # the style the dataset itself uses

    def __init__(self, weights: Mapping[str, float] | None = None):
        unknown = set(weights or {}) - set(self.components)
        if unknown:
            raise ValueError(f"reward {self.name!r}: unknown weight(s) {sorted(unknown)}; components are {self.components}")
        self.weights = {c: 1.0 for c in self.components} | {c: float(w) for c, w in (weights or {}).items()}

    @abstractmethod
    def parse_solution(self, raw: Any) -> Any:
        """The dataset's ``solution`` field as a solution object; ValueError if invalid."""

    @abstractmethod
    def render_answer(self, solution: Any, style: str) -> str:
        """The bare answer text (no tags) of ``solution`` in ``style`` (already validated)."""

    @abstractmethod
    def extract_answer(self, completion: str) -> Any | None:
        """The completion's answer as a solution object, or None if it has none or it is invalid."""

    @abstractmethod
    def score(self, completion: str, solution: Any) -> dict[str, float]:
        """Per-component rewards of one completion, keyed by ``components``."""

    @abstractmethod
    def metrics(self, completions: Sequence[str], solutions: Sequence[Any]) -> dict[str, float]:
        """Eval metrics of the task family over a set of completions."""

    def answer(self, solution: Any, style: str) -> str:
        """``<answer>`` + the answer in ``style`` + ``</answer>``."""
        if style not in self.styles:
            raise ValueError(f"reward {self.name!r}: unknown style {style!r}; styles are {self.styles}")
        return f"<answer>{self.render_answer(solution, style)}</answer>"

    def render(self, solution: Any, style: str) -> str:
        """The gold completion: an empty reasoning slot, then ``answer(solution, style)``.

        The gold has no reasoning trace, but it is written in the policy's completion
        template (``<think></think><answer>..</answer>``), so imitating it never teaches the
        policy to drop the template, and it passes the think-format check on its own merits:
        removing that credit is exactly what the *eliminate* control does (paper §3.4).
        """
        return EMPTY_THINK + self.answer(solution, style)

    def detect_style(self, completion: str) -> str | None:
        """The one style whose re-rendering of the parsed answer equals the answer text.

        None if the answer is missing or unparseable, matches no style, or matches several
        (e.g. grounding's ``[]`` reads the same in every style, so it says nothing).
        """
        text, answer = answer_block(completion), self.extract_answer(completion)
        if answer is None:
            return None
        matches = [s for s in self.styles if self.render_answer(answer, s) == text]
        return matches[0] if len(matches) == 1 else None

    solved_component: str = "accuracy"  # the component that says whether a completion solved its prompt

    def solved(self, components: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool from ``components[n, C]`` (``score_batch``): the completion solved its prompt,
        i.e. ``solved_component`` reached its maximum, 1 (HPT's notion of a correct rollout)."""
        return components[:, self.components.index(self.solved_component)] >= 1.0

    def weight_vector(self) -> torch.Tensor:
        """``w[C]`` float64, in ``components`` order."""
        return torch.tensor([self.weights[c] for c in self.components], dtype=torch.float64)

    def total(self, components: Mapping[str, float]) -> float:
        """The weighted sum ``sum_c w_c * components[c]`` on the reward grid (``weighted_total``)."""
        row = torch.tensor([[float(components[c]) for c in self.components]], dtype=torch.float64)
        return float(weighted_total(row, self.weight_vector()))


REWARD_DECIMALS = 9  # reward totals are multiples of 1e-9 (module docstring)


def on_grid(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` in float64, rounded to ``REWARD_DECIMALS`` decimals (half to even)."""
    return torch.round(rewards.double(), decimals=REWARD_DECIMALS)


def weighted_total(components: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``r[n] = on_grid(sum_c w_c * components[n, c])``, summed in float64."""
    return on_grid(components.double() @ weights.double())


@dataclass
class ScoreBatch:
    components: torch.Tensor  # [n, C] float64, columns in ``names`` order
    total: torch.Tensor  # [n] float64, the weighted sum of the components (``weighted_total``)
    names: tuple[str, ...]
    failures: list[tuple[str, str]]  # (sample_id, "ExcType: message")


def score_batch(spec: RewardSpec, completions: Sequence[str], solutions: Sequence[Any],
                sample_ids: Sequence[str]) -> ScoreBatch:
    """Score ``n`` completions. A sample whose scoring raises or yields a non-finite value
    gets 0 for every component; the failure is recorded and logged, never raised."""
    if not len(completions) == len(solutions) == len(sample_ids):
        raise ValueError(f"score_batch: {len(completions)} completions, {len(solutions)} solutions, "
                         f"{len(sample_ids)} sample ids")
    rows, failures = [], []
    for completion, solution, sid in zip(completions, solutions, sample_ids):
        try:
            rows.append(_score_one(spec, completion, solution))
        except Exception as e:  # noqa: BLE001 - any reward bug is contained to its sample
            msg = f"{type(e).__name__}: {e}"
            log.warning("reward %r failed on sample %s: %s", spec.name, sid, msg)
            failures.append((sid, msg))
            rows.append([0.0] * len(spec.components))
    comps = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(spec.components))
    return ScoreBatch(comps, weighted_total(comps, spec.weight_vector()), spec.components, failures)


def _score_one(spec: RewardSpec, completion: str, solution: Any) -> list[float]:
    scores = spec.score(completion, solution)
    row = [float(scores[c]) for c in spec.components]
    if not all(map(math.isfinite, row)):
        raise ValueError(f"non-finite reward {dict(zip(spec.components, row))}")
    return row
