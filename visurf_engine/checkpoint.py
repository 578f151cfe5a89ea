"""Atomic checkpoints and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    step_000020/model.safetensors     policy weights (safetensors; tied weights stored once)
    step_000020/optimizer.pt          optimizer state (a learner with a sharded optimizer, e.g.
                                      model.backend=megatron: optimizer_rank{r}.pt, each rank's own)
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
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .durable import fsync, write_atomic
from .parallel.data_parallel import World, barrier
from .rng import rng_state, set_rng_state


def _durable(path: Path, write) -> None:
    """``write(path)``, then fsync the file."""
    write(path)
    fsync(path)


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer_state: dict | None, state: dict[str, Any], rank: int = 0
) -> Path:
    """Write checkpoint ``step`` (rank 0 writes weights/optimizer/state; each rank its RNG).
    ``optimizer_state=None``: each rank writes its own with ``save_optimizer_shard``.

    Multi-rank callers must barrier between this call on all ranks and ``commit_checkpoint``.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _durable(tmp / "model.safetensors", lambda p: save_model(model, str(p)))  # tied weights stored once
        if optimizer_state is not None:
            _durable(tmp / "optimizer.pt", lambda p: torch.save(optimizer_state, p))
        _durable(tmp / "state.json", lambda p: p.write_text(json.dumps(state, indent=1)))
    return tmp


def save_rng(tmp: Path, rank: int) -> None:
    _durable(tmp / f"rng_rank{rank}.pt", lambda p: torch.save(rng_state(), p))


def save_optimizer_shard(tmp: Path, rank: int, optimizer_state: dict) -> None:
    _durable(tmp / f"optimizer_rank{rank}.pt", lambda p: torch.save(optimizer_state, p))


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


def save(
    root: Path, step: int, model: torch.nn.Module, optimizer_state: dict, state: dict[str, Any], world: World,
    *, sharded_optimizer: bool, keep: int = 2,
) -> None:  # fmt: skip
    """Checkpoint ``step`` from every rank of ``world``: shared files, RNGs, optimizer shards, commit."""
    tmp = save_checkpoint(root, step, model, None if sharded_optimizer else optimizer_state, state, world.rank)
    barrier(world)
    save_rng(tmp, world.rank)
    if sharded_optimizer:
        save_optimizer_shard(tmp, world.rank, optimizer_state)
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


def load_checkpoint(path: Path, model: torch.nn.Module, rank: int = 0) -> tuple[dict[str, Any], dict]:
    """Restore the weights into ``model`` and this rank's RNG; ``(state.json, this rank's optimizer state)``."""
    load_model(model, str(path / "model.safetensors"), strict=True)
    shared = path / "optimizer.pt"
    optimizer_state = torch.load(shared if shared.is_file() else path / f"optimizer_rank{rank}.pt", weights_only=False)
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((path / "state.json").read_text()), optimizer_state
