"""Atomic checkpoints and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    step_000020/model.safetensors     policy weights (safetensors)
    step_000020/optimizer.pt          optimizer state (model.backend=megatron: optimizer_rank{r}.pt,
                                      each rank's state over its local shards)
    step_000020/rng_rank{r}.pt        python / numpy / torch (+ CUDA) RNG states of rank r
    step_000020/state.json            step, data-sampler position, config
    latest                            name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp`` and renamed into place; ``latest`` is replaced
by rename too, so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any], rank: int = 0
) -> Path:
    """Write checkpoint ``step`` (rank 0 writes weights/optimizer/state; each rank its RNG).
    ``optimizer=None``: each rank writes its own with ``save_optimizer_shard``.

    Multi-rank callers must barrier between this call on all ranks and ``commit_checkpoint``.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))  # tied weights (shared storage) stored once
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    return tmp


def save_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def save_optimizer_shard(tmp: Path, rank: int, optimizer: torch.optim.Optimizer) -> None:
    torch.save(optimizer.state_dict(), tmp / f"optimizer_rank{rank}.pt")


def commit_checkpoint(root: Path, step: int, keep: int = 2) -> Path:
    """Rename ``step_N.tmp`` into place, point ``latest`` at it, prune older ones (rank 0)."""
    final = root / f"step_{step:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(root / f"step_{step:06d}.tmp", final)
    _write_atomic(root / "latest", final.name)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG; return ``state.json``."""
    load_model(model, str(path / "model.safetensors"), strict=True)
    shared = path / "optimizer.pt"
    optimizer.load_state_dict(torch.load(shared if shared.is_file() else path / f"optimizer_rank{rank}.pt", weights_only=False))
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
