"""The learning rate of each optimizer step (``train.lr_schedule``), shared by every paradigm.

With base rate ``lr``, ``W = train.warmup_steps`` and ``T = train.steps``, at 0-based step ``s``:

    warmup (s < W):  lr * (s + 1) / W
    constant:        lr
    cosine:          lr * (m + (1 - m) * (1 + cos(pi * p)) / 2),   p = (s - W) / max(1, T - W)
    linear:          lr * (m + (1 - m) * (1 - p))

``m = train.min_lr_ratio``: where the decay ends (the last step's rate is close to ``m * lr``).
A pure function of the step: a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_at(step: int, train) -> float:
    """The learning rate of 0-based optimizer step ``step`` under ``train`` (a ``TrainConfig``:
    ``lr``, ``steps``, ``lr_schedule``, ``warmup_steps``, ``min_lr_ratio``; module docstring)."""
    lr, warmup, m = train.lr, train.warmup_steps, train.min_lr_ratio
    if train.lr_schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule: unknown schedule {train.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return lr
    p = (step - warmup) / max(1, train.steps - warmup)
    decay = (1 + math.cos(math.pi * p)) / 2 if train.lr_schedule == "cosine" else 1 - p
    return lr * (m + (1 - m) * decay)
