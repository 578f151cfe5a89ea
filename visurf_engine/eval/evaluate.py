"""Held-out evaluation: greedy completions scored by the task's metrics, and the table."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import Row
from ..models.policy import Policy
from ..rewards import RewardSpec
from ..rollout.hf import HFRollout
from .probe import probe_metrics


@torch.no_grad()
def greedy_completions(policy: Policy, rollout: HFRollout, rows: Sequence[Row], batch_size: int = 64) -> list[str]:
    """The decoded greedy completion of every row's prompt."""
    texts = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = policy.encode([r.problem for r in chunk], [r.image for r in chunk])
        texts += policy.tokenizer.batch_decode(rollout.greedy(prompts), skip_special_tokens=True)
    return texts


def evaluate(policy: Policy, rollout: HFRollout, spec: RewardSpec, rows: Sequence[Row], batch_size: int = 64) -> dict[str, float]:
    """``spec.metrics`` of greedy completions on ``rows`` (gIoU / N-Acc / bbox_acc for grounding)."""
    return spec.metrics(greedy_completions(policy, rollout, rows, batch_size), [r.solution for r in rows])


def evaluate_probe(policy: Policy, rollout: HFRollout, rows: Sequence[Row], batch_size: int = 64) -> dict[str, float]:
    """Forgetting-probe accuracy (``eval.probe``) of greedy completions on probe ``rows``."""
    texts = greedy_completions(policy, rollout, rows, batch_size)
    return probe_metrics(texts, [r.solution for r in rows], [r.meta["question"] for r in rows])


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per metric, one column per evaluation (e.g. base / final)."""
    names = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [f"{col[name]:.4f}" if name in col else "-" for col in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
