"""megatron-core parallel state over the torchrun world: ``parallel.tp`` x ``parallel.pp`` x data.

The world of ``W`` ranks is split by megatron's ``initialize_model_parallel`` in its default
order (``tp-cp-ep-dp-pp``): ``rank = tp_rank + tp (dp_rank + dp pp_rank)``, ``dp = W / (tp pp)``.
The ranks of one model-parallel group (``tp x pp``) hold the shards of one policy replica
and must see the same data; ``init_megatron`` returns the data-parallel view of the world
(``rank = dp_rank``, ``size = dp``, collectives over the data-parallel group) that the
trainer uses to split prompts and to normalise the loss over the global batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from .world import World, backend_for
from .megatron_cpu import apply_cpu_shims


def init_megatron(world: World, tp: int, pp: int, seed: int) -> World:
    """Initialise megatron's parallel state (and a one-rank process group when not under
    torchrun); returns the data-parallel view of ``world``."""
    if world.size % (tp * pp):
        raise ValueError(f"parallel.tp * parallel.pp = {tp * pp} must divide the world size {world.size}")
    apply_cpu_shims()
    logging.getLogger("megatron").setLevel(logging.WARNING)  # DDP logs every parameter name at INFO
    if not dist.is_initialized():
        dist.init_process_group(backend_for(world.device), store=dist.HashStore(), rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return data_parallel_world(world)
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # On CPU the inference tracker (no-op fork) stands in for CUDA RNG states; dropout is 0.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available())
    return data_parallel_world(world)


def data_parallel_world(world: World) -> World:
    return World(
        rank=parallel_state.get_data_parallel_rank(),
        size=parallel_state.get_data_parallel_world_size(),
        local_rank=world.local_rank,
        device=world.device,
        group=parallel_state.get_data_parallel_group(),
    )


def broadcast_from_model_parallel_source(obj: Any) -> Any:
    """``obj`` of the first rank of this rank's model-parallel group (``tp x pp``), on all its ranks."""
    group = parallel_state.get_model_parallel_group()
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[0], group=group)
    return box[0]
