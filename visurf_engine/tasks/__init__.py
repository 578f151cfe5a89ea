"""Tasks: where a run's rows and base model come from (``data.task``).

- ``shapes``: the embedded, procedurally generated grounding task with its forgetting probe
  and its warm-started base model (``tasks.shapes``);
- ``files``: JSONL / parquet files (``data.train_path``, ``data.eval_path``) and a real
  checkpoint (``model.path``).

``prepare_base_model`` makes sure the model to post-train exists (the entry point calls it,
with its own progress bar, before it builds the trainer); ``base_model_path`` only finds it,
so building a trainer never trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..data import Row, load_rows
from ..parallel.data_parallel import World, barrier
from ..rewards import RewardSpec
from . import shapes
from .shapes.base_model import build_base_model, cached_base_model

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    train: list[Row]
    eval: list[Row]
    probe: list[Row] = field(default_factory=list)  # forgetting-probe rows (shapes only)
    skipped: int = 0  # bad rows skipped while loading (data.on_bad_row=skip)


def load_task(cfg: Config, spec: RewardSpec) -> TaskData:
    """The rows of ``cfg.data``; bad rows of data files are skipped and logged or raise (``data.on_bad_row``)."""
    d = cfg.data
    if d.task == "shapes":
        return TaskData(*shapes.load(cfg))
    results = [load_rows(p, spec.parse_solution, d.on_bad_row) for p in (d.train_path, d.eval_path) if p]
    for bad in (b for res in results for b in res.skipped):
        log.warning("skipped bad row: %s", bad)
    train = results[0].rows
    evals = results[1].rows if d.eval_path else train[: d.eval_size]
    return TaskData(train, evals[: d.eval_size], skipped=sum(len(r.skipped) for r in results))


def base_model_path(cfg: Config) -> Path:
    """The checkpoint to post-train: ``model.path``, or the embedded task's cached base model."""
    if cfg.model.path:
        return Path(cfg.model.path)
    path = cached_base_model(cfg)
    if path is None:
        raise FileNotFoundError(
            "the embedded base model of this config is not built yet: call "
            "visurf_engine.tasks.prepare_base_model(cfg) first (the entry point does), or set model.path"
        )
    return path


def prepare_base_model(cfg: Config, world: World = World(), *, progress: bool = True) -> Path:
    """``base_model_path(cfg)``, building the embedded base model first if needed (rank 0
    builds it, the other ranks wait and then find it)."""
    if not cfg.model.path and world.is_main:
        build_base_model(cfg, progress=progress)
    barrier(world)
    return base_model_path(cfg)


__all__ = ["TaskData", "base_model_path", "load_task", "prepare_base_model"]
