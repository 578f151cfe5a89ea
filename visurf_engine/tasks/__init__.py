"""Tasks: where a run's rows and base model come from (``data.task``).

- ``shapes``: the embedded, procedurally generated grounding task with its forgetting probe
  and its warm-started base model (``tasks.shapes``);
- ``files``: JSONL / parquet files or ``datasets`` directories (``data.train_path``, and
  ``data.eval_path`` or a held-out share ``data.eval_split`` of the training rows), read
  lazily (``data.loading``), and a real checkpoint (``model.path``). The evaluation rows'
  images are decoded once at start, so a bad one is met before step 1, not at an evaluation.

``prepare_base_model`` makes sure the model to post-train exists (the entry point calls it,
with its own progress bar, before it builds the trainer); ``base_model_path`` only finds it,
so building a trainer never trains. Without ``model.path``, a config whose warm-start recipe is
the default's uses the base model shipped with the package; any other recipe is built once and
cached (``tasks.shapes.base_model``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import Config
from ..data import DataError, Row, decodable, load_rows
from ..parallel.world import World, barrier
from ..rewards import RewardSpec
from . import shapes
from .shapes.base_model import (
    base_model_dir,
    build_base_model,
    cached_base_model,
    not_shipped_reason,
    shipped_base_model,
    shipped_manifest,
)

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    train: Sequence[Row]
    eval: Sequence[Row]
    probe: list[Row] = field(default_factory=list)  # forgetting-probe rows (shapes only)
    skipped: int = 0  # bad rows skipped while loading (data.on_bad_row=skip)


def load_task(cfg: Config, spec: RewardSpec) -> TaskData:
    """The rows of ``cfg.data``; bad rows of data files are skipped and logged or raise (``data.on_bad_row``)."""
    d = cfg.data
    if d.task == "shapes":
        return TaskData(*shapes.load(cfg))
    train = load_rows(d.train_path, spec.parse_solution, d.on_bad_row)
    skipped = list(train.skipped)
    if d.eval_path:
        held_out = load_rows(d.eval_path, spec.parse_solution, d.on_bad_row)
        rows, evals, skipped = train.rows, held_out.rows, skipped + held_out.skipped
    else:
        rows, evals = train.rows.split(d.eval_split, d.seed)
        if not len(rows) or not len(evals):
            raise DataError(f"{d.train_path}: data.eval_split={d.eval_split} holds out {len(evals)} of its "
                            f"{len(train.rows)} usable rows; choose a share that leaves rows on both sides")  # fmt: skip
    keep, bad = decodable(evals, d.eval_size, d.on_bad_row)
    for b in skipped + bad:
        log.warning("skipped bad row: %s", b)
    return TaskData(rows, evals.take(keep), skipped=len(skipped) + len(bad))


def base_model_path(cfg: Config) -> Path:
    """The checkpoint to post-train: ``model.path``, else the embedded task's base model (the
    shipped one when ``cfg``'s recipe is its recipe, otherwise the cached one)."""
    if cfg.model.path:
        return Path(cfg.model.path)
    path = shipped_base_model(cfg) or cached_base_model(cfg)
    if path is None:
        raise FileNotFoundError(
            "the embedded base model of this config is not built yet: call "
            "visurf_engine.tasks.prepare_base_model(cfg) first (the entry point does), or set model.path"
        )
    return path


def prepare_base_model(cfg: Config, world: World = World(), *, progress: bool = True) -> Path:
    """``base_model_path(cfg)``, building the embedded base model first if ``cfg``'s recipe is not
    the shipped one's and it is not cached (rank 0 builds it, the other ranks wait and then find
    it). Rank 0 logs which base model is used."""
    if not cfg.model.path and world.is_main:
        shipped = shipped_base_model(cfg)
        if shipped is not None:
            built = shipped_manifest()["built_with"]
            log.info("base model: the one shipped with the package, %s (built %s on %s, %s torch thread(s))",
                     shipped, built["date"], built["cpu"], built["threads"]["torch"])  # fmt: skip
        else:
            log.info("base model: %s %s, not the shipped one (%s)", "cached at" if cached_base_model(cfg) else
                     "warm-starting it (a few minutes) into", base_model_dir(cfg), not_shipped_reason(cfg))  # fmt: skip
            build_base_model(cfg, progress=progress)
    barrier(world)
    return base_model_path(cfg)


__all__ = ["TaskData", "base_model_path", "load_task", "prepare_base_model"]
