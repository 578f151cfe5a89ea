"""Data parallelism over the torchrun world: gloo on CPU, NCCL on GPU.

Every rank holds a full policy replica and 1/world of each step's prompts. The loss
weights are normalised over the global batch, so gradients are SUM-reduced. A ``World``
with a ``group`` is a data-parallel view of a larger world (``parallel.megatron``: the
replicas of one model-parallel rank); its collectives run over that group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None  # process group of the collectives (None: the whole world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun process group if launched by torchrun (``WORLD_SIZE`` > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank() if size > 1 else 0, size=size, local_rank=local_rank, device=device)


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=world.group)
    return tensor


def all_reduce_grads(model: torch.nn.Module, world: World) -> None:
    """SUM-reduce gradients across ranks (one flat buffer)."""
    if world.size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=world.group)
    torch.nn.utils.vector_to_parameters(flat, grads)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank of the whole run (the default process group): one
    MAX all-reduce of a scalar, on the GPU under NCCL."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier(group=world.group)
