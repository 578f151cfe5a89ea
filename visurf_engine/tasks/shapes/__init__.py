"""The embedded default task: coloured shapes on a tinted 3x3 grid (``generator``), the
forgetting probe (``probe``) and the warm-started base model (``base_model``); ``load``
gives the splits of a config."""

from __future__ import annotations

from ...config import Config
from ...data.rows import Row
from .generator import make_split, render, think_trace
from .probe import make_probe_split, probe_metrics


def load(cfg: Config) -> tuple[list[Row], list[Row], list[Row]]:
    """``(train, eval, probe)`` rows of ``cfg.data`` (the probe's seed is the eval split's)."""
    d = cfg.data
    return (
        make_split(d.train_size, seed=d.seed, absent_ratio=d.absent_ratio),
        make_split(d.eval_size, seed=d.seed + 1, absent_ratio=d.eval_absent_ratio),
        make_probe_split(d.probe_size, seed=d.seed + 1),
    )


__all__ = ["load", "make_probe_split", "make_split", "probe_metrics", "render", "think_trace"]
