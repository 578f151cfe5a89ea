"""Held-out evaluation: greedy completions scored by a metrics function, and the table.

Rows go in chunks of ``batch_size`` (one ``greedy`` call each), dealt round-robin over the
ranks of a world: rank r generates chunks r, r + W, r + 2W, ..., the completions are gathered in
row order and every rank scores all of them. The chunks are the ones one process would form,
so the result equals one process's exactly, while every GPU generates (a rank-0-only
evaluation idles the others, and at real sizes can outlast NCCL's watchdog).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data import Row
from ..models.policy import Policy
from ..parallel.world import World, all_gather_objects
from ..rollout.base import RolloutEngine

Metrics = Callable[[Sequence[str], Sequence[Row]], dict[str, float]]  # (completions, rows) -> metrics


@torch.no_grad()
def greedy_completions(policy: Policy, rollout: RolloutEngine, rows: Sequence[Row], batch_size: int = 64,
                       world: World = World()) -> list[str]:  # fmt: skip
    """The decoded greedy completion of every row's prompt (module docstring: the chunks of each rank)."""
    chunks = [range(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    mine = {}
    for k in range(world.rank, len(chunks), world.size):
        chunk = [rows[i] for i in chunks[k]]
        prompts = policy.encode([r.problem for r in chunk], [r.image for r in chunk])
        mine[k] = policy.tokenizer.batch_decode(rollout.greedy(prompts), skip_special_tokens=True)
    done = {k: texts for part in all_gather_objects(mine, world) for k, texts in part.items()}
    return [text for k in range(len(chunks)) for text in done[k]]


def evaluate(policy: Policy, rollout: RolloutEngine, rows: Sequence[Row], metrics: Metrics, world: World = World(),
             batch_size: int = 64) -> dict[str, float]:  # fmt: skip
    """``metrics`` of the greedy completions on ``rows`` (e.g. gIoU / N-Acc / bbox_acc for grounding),
    on every rank of ``world``. Rows read lazily from a file (``data.RowTable``) are read once,
    images decoded when encoded."""
    rows = list(rows)
    return metrics(greedy_completions(policy, rollout, rows, batch_size, world), rows)


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per metric, one column per evaluation (e.g. base / final)."""
    names = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [f"{col[name]:.4f}" if name in col else "-" for col in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
