"""``FSDPLearner`` (``model.backend=fsdp``): torch FSDP2 over every rank of the world.

Parallelism is applied to the built model as a transform (as torchtitan does), in this order:

1. **Build without memory**: the transformers model is constructed with its parameters on the
   meta device (``_params_on_meta``; its buffers, e.g. the rotary ``inv_freq``, are computed as
   usual); activation checkpointing per decoder layer and vision block if asked
   (``learners.checkpointing``).
2. **Shard**: ``fully_shard`` on every decoder layer and vision block (one FSDP unit each),
   then on ``PolicyForward`` (``learners.forward``: the vision tower's patch embedding and merger,
   the token embedding, the final norm and the LM head, and the fused loss that uses the head's
   weight inside the root's forward), over a 1-D device mesh of the world. Each rank holds
   ``1/W`` of every parameter (``Shard(0)`` DTensors) in the master dtype (``model.dtype``,
   fp32), its gradient and its AdamW state, so all three are sharded. ``MixedPrecisionPolicy``:
   the gathered parameters are cast to the compute dtype once per gather (``model.compute_dtype``:
   bf16 on CUDA), gradients are reduce-scattered in fp32. ``fsdp.offload``: parameters,
   gradients and optimizer state live in host memory (``CPUOffloadPolicy``), the optimizer
   steps on the CPU.
3. **Load sharded**: the shards are materialised on the device (``to_empty``) and each rank
   reads only its slices of the checkpoint's safetensors files
   (``torch.distributed.checkpoint`` with ``HuggingFaceStorageReader``), cast to the master
   dtype; no rank holds the whole model, in host or device memory.

One optimizer step: every rank runs the same number of micro-batches (``lockstep_split``: the
forwards all-gather layer by layer), each reduce-scatters its gradients; the grad norm is the
DTensor norm over all shards; AdamW steps on the local shards. The loss weights are normalised
over the global batch, so the reduction is a SUM (divide factor 1, sum-only collectives).

``export_weights`` gathers one parameter at a time (``DTensor.full_tensor``, in the compute
dtype) and yields it under its HF in-memory name: a sync holds one gathered tensor, or one
engine bucket (``SyncPlan.batches``). The rollout engine is a replica or vLLM (no rank has a
whole module to generate with). Checkpoints are ``torch.distributed.checkpoint`` directories
(``state/``: each rank writes its shards of the weights and the optimizer state);
``python -m visurf_engine.export`` writes them as a Hugging Face checkpoint. The KL reference
is sharded the same way, in the compute dtype, without gradients (``reference``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from visurf_kernels import LossSpec

from ..config import FSDPConfig
from ..models.hf import ImageOnlyProcessor, model_class
from ..models.policy import Batching, Policy, Prompts
from ..models.precision import Precision
from ..models.weights import checkpoint_name, checkpoint_specs, module_specs
from ..parallel.world import World, backend_for
from .base import Learner, LossStats, MicroBatch, adamw
from .checkpointing import apply_activation_checkpointing
from .forward import PolicyForward, forward_logprobs
from .reference import Reference


@contextlib.contextmanager
def _params_on_meta():
    """Every parameter created inside goes to the meta device as it is registered (before any
    initialiser touches it); buffers are built as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a tied parameter registered again stays the same object
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def shard_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units below the root: every decoder layer and vision block."""
    inner = model.model
    return [*inner.language_model.layers, *inner.visual.blocks]


def load_sharded(path: str | Path, precision: Precision, spec: LossSpec, world: World, cfg: FSDPConfig, *,
                 trainable: bool = True, activation_checkpointing: bool = False) -> PolicyForward:  # fmt: skip
    """``PolicyForward`` over the checkpoint at ``path``, sharded over ``world`` (module docstring
    steps 1-3); ``trainable=False``: a frozen copy (no gradients)."""
    if not dist.is_initialized():  # one process: FSDP still wants a process group
        dist.init_process_group(backend_for(world.device), store=dist.HashStore(), rank=0, world_size=1)
    cls = model_class(path)
    config = cls.config_class.from_pretrained(path)
    with _params_on_meta():
        model = cls._from_config(config, attn_implementation="visurf_packed", dtype=precision.master)
    model.requires_grad_(trainable)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    mesh = init_device_mesh(world.device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=precision.compute if precision.mixed else None, reduce_dtype=torch.float32)
    if cfg.offload and world.device.type != "cuda":
        raise ValueError("fsdp.offload: offloading to host memory needs a CUDA device (on CPU everything is host memory)")
    offload = CPUOffloadPolicy() if cfg.offload else OffloadPolicy()
    shard = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
    for block in shard_blocks(model):
        fully_shard(block, **shard)
    root = PolicyForward(model, Precision(precision.compute, precision.compute), spec)
    fully_shard(root, **(shard | {"mp_policy": MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, cast_forward_inputs=False)}))
    for unit in root.modules():  # the loss is normalised over the global batch: SUM the gradients
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    root.to_empty(device="cpu" if cfg.offload else world.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    _read_checkpoint(model, path)
    return root


def _read_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Each rank's shards of the checkpoint's safetensors files into the sharded ``model``
    (checkpoint names; tied aliases once); names the tensors either side lacks."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    stored = checkpoint_specs(path)
    specs, aliases = module_specs(model)
    wanted = {checkpoint_name(n): p for n, p in model.named_parameters() if n not in aliases}
    missing, unused = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing or unused:
        raise ValueError(f"model.path {str(path)!r}: checkpoint tensors do not match the model: the checkpoint lacks "
                         f"{missing}, the model has no {unused}")  # fmt: skip
    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(path)))


class FSDPLearner(Learner):
    shares_module = False  # no rank holds a whole module to generate with: a replica or vLLM does
    stable_export = False  # export_weights gathers fresh tensors

    def __init__(self, root: PolicyForward, processor: ImageOnlyProcessor, precision: Precision, spec: LossSpec,
                 dp: World, cfg: FSDPConfig, *, lr: float, betas, weight_decay: float):  # fmt: skip
        self.root, self.spec, self.dp, self.cfg = root, spec, dp, cfg
        self.precision = precision
        self.policy = Policy(root.model, processor, dp.device, precision)
        self.params = [p for p in root.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, lr=lr, betas=betas, weight_decay=weight_decay)

    @classmethod
    def load(cls, path: str | Path, processor: ImageOnlyProcessor, precision: Precision, spec: LossSpec, dp: World,
             cfg: FSDPConfig, *, activation_checkpointing: bool = False, **optim) -> FSDPLearner:  # fmt: skip
        if dp.size != (dist.get_world_size() if dist.is_initialized() else 1):
            raise ValueError("model.backend=fsdp shards over the whole world; its data-parallel view must be the world")
        root = load_sharded(path, precision, spec, dp, cfg, activation_checkpointing=activation_checkpointing)
        return cls(root, processor, precision, spec, dp, cfg, **optim)

    def reference(self, path: str | Path) -> Reference:
        """The KL reference sharded like the policy, in the compute dtype (its master dtype too:
        no optimizer), frozen."""
        compute = Precision(self.precision.compute, self.precision.compute)
        frozen = load_sharded(path, compute, self.spec, self.dp, self.cfg, trainable=False)
        return Reference(frozen.eval(), self.policy, self.dp)

    # -- one optimizer step ---------------------------------------------------------------
    def forward_backward(self, micro: Sequence[MicroBatch]) -> list[LossStats]:
        out = []
        for x in micro:
            loss, stats = self.root(x.batch, x)
            loss.backward()
            out.append((loss.detach(), stats))
        return out

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                 batching: Batching) -> torch.Tensor:  # fmt: skip
        logp = forward_logprobs(self.root, self.policy, prompts, idx, completions, batching, self.dp)
        self.root.reshard()  # the root's gathered parameters are kept after a forward for its backward: free them
        return logp

    def clip_grads(self, grad_clip: float) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(self.params, grad_clip, norm)
        return float(norm)

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- weights --------------------------------------------------------------------------
    def weight_specs(self):
        """Names, global shapes (the DTensors'), the master dtype, tied aliases."""
        return module_specs(self.root.model)

    @torch.no_grad()
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter gathered whole, one at a time, in the compute dtype, under its HF
        in-memory name; every rank must consume it (the gathers are collectives)."""
        for name, p in self.root.model.named_parameters():
            yield name, p.to(self.precision.compute).full_tensor()

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Whole HF-named tensors into the shards (each rank keeps its slice)."""
        params = dict(self.root.model.named_parameters())
        for name, value in named:
            p = params[name]
            p.copy_(distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements))

    # -- checkpoints ----------------------------------------------------------------------
    def _state(self):
        return get_state_dict(self.root.model, self.optimizer, options=StateDictOptions())

    def save_state(self, directory: Path, world: World) -> None:
        """``state/``: a ``torch.distributed.checkpoint`` of the weights (HF in-memory names) and
        the optimizer state; every rank writes its shards (fsynced by DCP's writer)."""
        model, optim = self._state()
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(directory / "state"))

    def load_state(self, directory: Path, rank: int) -> None:
        model, optim = self._state()
        state = {"model": model, "optim": optim}
        dcp.load(state, checkpoint_id=str(directory / "state"))
        set_state_dict(self.root.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
