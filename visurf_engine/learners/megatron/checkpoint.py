"""The megatron backend's checkpoint: one file per rank, ``megatron_rank{r}.pt`` (no megatron-core needed to read it).

The master weights of a run live in megatron-core's distributed optimizer: each data-parallel
rank of a ``(tp rank, pp stage)`` shard holds the fp32 main parameters of a contiguous slice of
that shard's flattened parameters (the parameters themselves when they are fp32, a separate fp32
copy when they are bf16), and the Adam state of that slice. Rank ``r`` writes

    layout     ``convert.Layout`` as a dict (the shapes, ``tp``, ``pp``)
    rank       ``{"tp", "pp", "dp", "dp_size"}``: where the file sits in the grid
    master     ``{megatron name: {"shape", "start", "values"}}``: for every parameter of which the
               rank holds a slice, the slice's fp32 values, which start at flat index ``start``
    optimizer  the inner ``torch.optim.AdamW``'s ``state_dict`` (moments and step of those slices,
               the hyper-parameters), in the order of megatron's parameter groups

So the files hold every master weight exactly once and no rank writes more than its slice.
``read_master`` joins the slices of one shard (resume: each rank rebuilds its shard's
parameters and main parameters from them); ``read_hf_weights`` joins every shard and converts
the stages back to HF names (``convert.megatron_to_hf``: cuts and joins only), in one process:
what ``python -m visurf_engine.export`` writes as a Hugging Face checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .convert import Layout, megatron_to_hf

FILE = re.compile(r"megatron_rank(\d+)\.pt")


def rank_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"megatron_rank{rank}.pt"


def is_megatron_checkpoint(directory: Path) -> bool:
    return rank_file(directory, 0).is_file()


def _read_all(directory: Path) -> list[dict[str, Any]]:
    """Every rank's file, memory-mapped (a tensor is read when it is used)."""
    ranks = {int(m[1]): p for p in Path(directory).iterdir() if (m := FILE.fullmatch(p.name))}
    files = [ranks[r] for r in sorted(ranks)]
    return [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in files]


def join_master(parts: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors of one shard from its data-parallel ranks' ``master`` slices; raises
    ``ValueError`` naming a tensor the slices do not cover."""
    out: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for part in parts:
        for name, s in part.items():
            if name not in out:
                out[name], covered[name] = torch.empty(s["shape"], dtype=s["values"].dtype), 0
            values = s["values"]
            out[name].view(-1)[s["start"] : s["start"] + values.numel()] = values
            covered[name] += values.numel()
    if short := [n for n, t in out.items() if covered[n] != t.numel()]:
        raise ValueError(f"megatron checkpoint: the data-parallel slices do not cover {short[:3]}")
    return out


def read_master(directory: Path, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
    """The master weights of shard ``(tp_rank, pp_rank)``, whole (megatron names)."""
    parts = [f["master"] for f in _read_all(directory) if (f["rank"]["tp"], f["rank"]["pp"]) == (tp_rank, pp_rank)]
    if not parts:
        raise FileNotFoundError(f"{directory}: no megatron_rank*.pt of tensor rank {tp_rank}, pipeline stage {pp_rank}")
    return join_master(parts)


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every master weight of the checkpoint, whole, under the HF model's in-memory names (fp32)."""
    files = _read_all(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no megatron_rank*.pt")
    lay = Layout(**files[0]["layout"])
    by_shard: dict[tuple[int, int], list] = {}
    for f in files:
        by_shard.setdefault((f["rank"]["tp"], f["rank"]["pp"]), []).append(f["master"])
    if missing := [(t, p) for p in range(lay.pp) for t in range(lay.tp) if (t, p) not in by_shard]:
        raise FileNotFoundError(f"{directory}: no megatron_rank*.pt of (tensor rank, pipeline stage) {missing}")
    out: dict[str, torch.Tensor] = {}
    for p in range(lay.pp):
        out |= megatron_to_hf([join_master(by_shard[(t, p)]) for t in range(lay.tp)], lay, p)
    return out
