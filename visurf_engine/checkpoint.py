"""Atomic checkpoints and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    step_000020/...                   the learner's weights and optimizer state (``Learner.save_state``):
                                      model.safetensors + optimizer.pt (hf: the whole model, HF names);
                                      megatron_rank{r}.pt (megatron: each rank its slice of the master
                                      weights and its Adam state); state/ (fsdp: a
                                      torch.distributed.checkpoint directory, each rank its shards)
    step_000020/rng_rank{r}.pt        python / numpy / torch (+ CUDA) RNG states of rank r
    step_000020/state.json            step, data-sampler position, base (and final) evaluation, skipped-step
                                      counts (the non-finite guard), config
    latest                            name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp`` and renamed into place; ``latest`` is replaced
by rename too, so a crash at any moment leaves the previous checkpoint intact. Every file is
fsynced by the rank that wrote it, and a directory before and after the rename that publishes
its content, so a power loss cannot publish a name whose data never reached the disk (rename
orders nothing by itself). ``save`` runs the whole sequence on every rank of a world (rank 0
writes the shared files); the newest ``keep`` checkpoints are kept (``train.keep_checkpoints``).
``python -m visurf_engine.export`` turns any of them into a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .durable import durable, fsync, write_atomic
from .parallel.world import World, barrier
from .rng import rng_state, set_rng_state


def begin_checkpoint(root: Path, step: int, state: dict[str, Any], rank: int = 0) -> Path:
    """``step_N.tmp`` with ``state.json`` in it (rank 0 creates it; the others find it after a barrier)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        durable(tmp / "state.json", lambda p: p.write_text(json.dumps(state, indent=1)))
    return tmp


def save_rng(tmp: Path, rank: int) -> None:
    durable(tmp / f"rng_rank{rank}.pt", lambda p: torch.save(rng_state(), p))


def commit_checkpoint(root: Path, step: int, keep: int = 2) -> Path:
    """Rename ``step_N.tmp`` into place, point ``latest`` at it, prune all but the newest
    ``keep`` (rank 0, after every rank's files are written and fsynced)."""
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync(root)
    write_atomic(root / "latest", final.name)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save(root: Path, step: int, learner, state: dict[str, Any], world: World, *, keep: int = 2) -> None:
    """Checkpoint ``step`` from every rank of ``world``: state, the learner's weights and
    optimizer (``Learner.save_state``), RNGs, commit."""
    tmp = begin_checkpoint(root, step, state, world.rank)
    barrier(world)
    learner.save_state(tmp, world)
    save_rng(tmp, world.rank)
    barrier(world)
    if world.is_main:
        commit_checkpoint(root, step, keep)
    barrier(world)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path, learner, rank: int = 0) -> dict[str, Any]:
    """Restore the learner's weights and optimizer (``Learner.load_state``) and this rank's RNG;
    returns ``state.json``."""
    learner.load_state(path, rank)
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
