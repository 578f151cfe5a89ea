"""The torchrun world and the engine's collectives: gloo on CPU, NCCL and gloo on GPU.

A ``World`` is this process's rank, the world size and its device; a ``World`` with a
``group`` is a view of a larger world (``parallel.megatron``: the data-parallel replicas of one
model-parallel rank), whose collectives run over that group.

**One process group, two backends on GPU.** The step reduces host tensors (float64 counters,
the non-finite flag, evaluation results) as well as device tensors (gradients, the
vocab-parallel loss partials). NCCL reduces device tensors only, gloo host tensors (and, slowly,
device ones), so on CUDA the world is ``"cpu:gloo,cuda:nccl"`` (``backend_for``): torch routes
each collective by its tensor's device. Every collective of the engine goes through the
functions here, which check that the group's backend serves the tensor's device
(``check_device``) and name the fix when it does not, so a host tensor can never reach a
NCCL-only group unnoticed, on CPU tests included (``tests/test_world.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

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


class CollectiveDeviceError(RuntimeError):
    """A collective's tensor lives on a device its process group's backend does not serve."""


def backend_for(device: torch.device) -> str:
    """The process group backend of a world on ``device``: ``"cpu:gloo,cuda:nccl"`` on CUDA (host
    tensors through gloo, device tensors through NCCL), ``"gloo"`` elsewhere."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


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
        dist.init_process_group(backend_for(device))
    return World(rank=dist.get_rank() if size > 1 else 0, size=size, local_rank=local_rank, device=device)


def served_by(backend_config: str) -> set[str]:
    """The device types a backend config reduces tensors on: ``"cpu:gloo,cuda:nccl"`` -> {cpu,
    cuda}; ``"cuda:nccl"`` (what a plain ``"nccl"`` group is) -> {cuda}."""
    return {entry.split(":")[0] for entry in backend_config.split(",")}


def served_devices(group=None) -> set[str]:
    """``served_by`` the backend config of ``group`` (None: the default group)."""
    return served_by(dist.get_backend_config(group))


def check_device(tensor: torch.Tensor, group=None) -> None:
    """Raise ``CollectiveDeviceError`` unless ``group``'s backend serves ``tensor``'s device."""
    served = served_devices(group)
    if tensor.device.type not in served:
        raise CollectiveDeviceError(
            f"a collective on a {tensor.device.type} tensor {tuple(tensor.shape)} over a process group whose backend "
            f"({dist.get_backend_config(group)}) serves {sorted(served)} only: create the group with "
            f"{backend_for(torch.device('cuda'))!r} (parallel.world.init_world does), or move the tensor to a served device"
        )


def _live(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``tensor`` reduced in place over ``group`` (checked: ``check_device``); returned."""
    if _live(group):
        check_device(tensor, group)
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` of ``group`` into ``parts`` (checked: ``check_device``)."""
    check_device(tensor, group)
    dist.all_gather(parts, tensor, group=group)
    return parts


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``tensor`` of global rank ``src`` on every rank of ``group``, in place (checked)."""
    if _live(group):
        check_device(tensor, group)
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def sum_comm_hook(group, bucket):  # no annotations: DDP checks them and this module's are strings
    """A ``DistributedDataParallel`` communication hook: SUM-reduce a gradient bucket (``dist.GradBucket``) over
    ``group`` (DDP's default averages; the engine's loss weights are normalised over the global
    batch already, so the gradient of the global loss is the sum of the ranks')."""
    buffer = bucket.buffer()
    check_device(buffer, group)
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` SUM-reduced over ``world`` (its group), in place."""
    return all_reduce(tensor, world.group) if world.size > 1 else tensor


def any_rank(flag: bool, world: World) -> bool:
    """Whether ``flag`` holds on any rank of ``world`` (its group): one MAX all-reduce of a host scalar."""
    if world.size == 1:
        return flag
    return bool(all_reduce(torch.tensor([float(flag)]), world.group, op=dist.ReduceOp.MAX).item())


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj`` (picklable) of ``world``, in rank order of the group."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj, group=world.group)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier(group=world.group)


def ranks_of(group) -> Sequence[int]:
    """The global ranks of ``group``, in group order."""
    return dist.get_process_group_ranks(group)
