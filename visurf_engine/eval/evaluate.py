"""Held-out evaluation: greedy completions scored by a metrics function, and the table."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data import Row
from ..models.policy import Policy
from ..rollout.base import RolloutEngine

Metrics = Callable[[Sequence[str], Sequence[Row]], dict[str, float]]  # (completions, rows) -> metrics


@torch.no_grad()
def greedy_completions(policy: Policy, rollout: RolloutEngine, rows: Sequence[Row], batch_size: int = 64) -> list[str]:
    """The decoded greedy completion of every row's prompt."""
    texts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = policy.encode([r.problem for r in chunk], [r.image for r in chunk])
        texts += policy.tokenizer.batch_decode(rollout.greedy(prompts), skip_special_tokens=True)
    return texts


def evaluate(policy: Policy, rollout: RolloutEngine, rows: Sequence[Row], metrics: Metrics,
             batch_size: int = 64) -> dict[str, float]:  # fmt: skip
    """``metrics`` of the greedy completions on ``rows`` (e.g. gIoU / N-Acc / bbox_acc for grounding).
    Rows read lazily from a file (``data.RowTable``) are read once, images decoded when encoded."""
    rows = list(rows)
    return metrics(greedy_completions(policy, rollout, rows, batch_size), rows)


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per metric, one column per evaluation (e.g. base / final)."""
    names = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [f"{col[name]:.4f}" if name in col else "-" for col in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
