"""``MegatronLearner`` (``model.backend=megatron``): pipeline schedules, DDP, megatron's distributed optimizer.

The learner protocol (``learners.base``) on megatron-core: it holds this rank's stage and
tensor shard of the policy (``model.QwenVLMegatron``), cut from the checkpoint's weights by
``convert.hf_to_megatron``, wrapped in megatron-core's ``DistributedDataParallel`` and trained by
megatron-core's distributed optimizer. The ranks of one model-parallel group train on the same
members (``share``).

**Precision and where the weights live.** The shard's parameters are in the compute dtype
(``model.compute_dtype``: bf16 on CUDA, fp32 on CPU), gradients accumulate and are reduced in
fp32 (``grad_reduce_in_fp32``). The master weights are the distributed optimizer's fp32 main
parameters (the parameters themselves when they are fp32), read from the checkpoint in the
master dtype: each data-parallel rank of a shard holds the main parameters and the Adam moments
of ``1/dp`` of it, updates that slice, and all-gathers the updated parameters.
The HF model (``policy``) is a replica in the compute dtype for rollouts, scoring (the
learner's ``logprobs``) and evaluation: ``export_weights`` writes the trained weights into it
under HF names, one megatron tensor at a time (gathered over the tensor group,
``convert.megatron_to_hf``), then broadcasts each over the pipeline group.
**Checkpoints** (``learners.megatron.checkpoint``): every rank writes its slice of the master
weights and its Adam state (``megatron_rank{r}.pt``); resume joins a shard's slices and needs
the same ``(tp, pp, world)``; ``python -m visurf_engine.export`` joins all of them into an HF
checkpoint.

One optimizer step over micro-batches ``m = 1..M`` (``forward_backward`` then ``step``):

- ``get_forward_backward_func()`` runs megatron's schedule (no pipelining, or 1F1B when
  ``pp > 1``); every stage takes micro-batch ``m`` from the same list: ids, mRoPE positions
  ``[3, B, S]`` and a causal mask for every stage, pixels on stage 0, loss inputs on the last;
- the last stage gathers ``h[N, H]`` at the positions predicting the ``N`` completion tokens
  and calls ``fused_policy_loss(h, W_r, ..., tp_group, vocab_start)`` with its vocab shard
  ``W_r`` of the LM head: no logits are formed, and the per-rank partial ``d h`` is summed
  by the ``copy_to_tensor_model_parallel_region`` in front of the head;
- the loss is ``sum_t w_t loss_t`` with weights normalised over the global batch, so no
  stage scales it (``calculate_per_token_loss``) and ``finalize_model_grads`` SUM-reduces
  (reduce-scatters) the grads over data-parallel replicas (and the tied embedding over
  first/last stage);
- ``step`` (``Learner.step``, the non-finite guard included): ``clip_grads`` moves each rank's
  reduced gradient slice to its main parameters (``prepare_grads``) and takes the global norm
  ``sqrt(sum over unique params of |g|^2)`` over every rank (megatron's ``get_grad_norm``: a
  parameter counts on one tensor rank unless it is tensor-parallel, the last stage's copy of a
  tied embedding not at all, each data-parallel slice once), then clips; ``optimizer_step`` is
  megatron's ``step_with_ready_grads`` (AdamW on the slices, then the parameter all-gather).
  Megatron's own ``step()`` is not used: without a loss scaler (fp32, bf16) it checks no
  gradient for inf/nan and would apply a non-finite one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from visurf_kernels import LossSpec, fused_policy_loss

from ...config import ParallelConfig
from ...durable import durable
from ...models.hf import ImageOnlyProcessor, load_model
from ...models.policy import Batching, Policy, Prompts
from ...models.precision import Precision
from ...models.weights import CheckpointTensors
from ...parallel.megatron import broadcast_from_model_parallel_source
from ...parallel.world import World, all_gather, broadcast, ranks_of
from ..base import Learner, LossStats, MicroBatch
from .checkpoint import rank_file, read_master
from .convert import Layout, canonical_hf_name, hf_to_megatron, megatron_to_hf
from .model import QwenVLMegatron, transformer_config


class MegatronLearner(Learner):
    """This rank's shard of the policy, its DDP wrapper and distributed optimizer (module docstring)."""

    packs = False  # the local layer spec has no packed (THD) attention: padded rows

    def __init__(self, policy: Policy, layout: Layout, spec: LossSpec, dp: World, *, lr: float, betas,
                 weight_decay: float, weights: Mapping[str, torch.Tensor] | None = None):  # fmt: skip
        """``policy``: the HF replica, its parameters in ``policy.precision.compute`` (the dtype the
        shard computes in); ``weights``: the HF-named weights to start from, in the master dtype
        (default: the replica's own)."""
        hf_model = policy.model
        compute = policy.precision.compute
        self.policy, self.layout, self.hf_model, self.spec, self.dp = policy, layout, hf_model, spec, dp
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.config = transformer_config(hf_model.config, layout, compute)
        visual = copy.deepcopy(hf_model.model.visual) if parallel_state.is_pipeline_first_stage() else None
        with torch.random.fork_rng():  # megatron's throw-away init must not shift the rollouts' RNG
            self.module = QwenVLMegatron(hf_model.config, layout, self.config, visual).to(compute)
        ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                            overlap_grad_reduce=False, overlap_param_gather=False)  # fmt: skip
        self.model = DistributedDataParallel(self.config, ddp, self.module)
        optim = OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
            bf16=compute == torch.bfloat16, params_dtype=compute, use_distributed_optimizer=True,
            clip_grad=0.0,  # clipping is clip_grads', with the step's grad_clip
        )  # fmt: skip
        # config_overrides={}: weight decay on every parameter, as the other backends (megatron's
        # default exempts biases and norms)
        self.optimizer = get_megatron_optimizer(optim, [self.model], config_overrides={})
        if len(self.optimizer.chained_optimizers) != 1:
            raise RuntimeError("megatron optimizer: expected one distributed optimizer (no expert parameters)")
        named = weights if weights is not None else hf_model.state_dict()
        self._set_master(hf_to_megatron(named, layout, self.tp_rank, self.pp_rank))

    @classmethod
    def load(cls, path: str | Path, processor: ImageOnlyProcessor, precision: Precision, spec: LossSpec, dp: World,
             parallel: ParallelConfig, *, activation_checkpointing: bool = False, **optim) -> MegatronLearner:  # fmt: skip
        """This rank's shard of the checkpoint at ``path`` (read in the master dtype, only this
        stage's tensors) and the HF replica in the compute dtype (``policy``)."""
        if activation_checkpointing:
            raise NotImplementedError("train.activation_checkpointing with model.backend=megatron: not wired to "
                                      "megatron's recompute options yet; use model.backend=fsdp or hf")  # fmt: skip
        model = load_model(path, dtype=precision.compute, device=dp.device)
        layout = Layout.from_hf_config(model.config, parallel.tp, parallel.pp)
        policy = Policy(model, processor, dp.device, Precision(precision.compute, precision.compute))
        return cls(policy, layout, spec, dp, weights=CheckpointTensors(path, precision.master), **optim)

    # -- weights --------------------------------------------------------------------------
    @torch.no_grad()
    def _set_master(self, shard: Mapping[str, torch.Tensor]) -> None:
        """This rank's parameters (cast to their dtype) and main parameters (in full precision)
        from its megatron-named ``shard``."""
        missing, unexpected = self.module.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"megatron shard mismatch: missing {missing}, unexpected {unexpected}")
        self.optimizer.reload_model_params(state_dict=shard)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """This rank's shard of the HF-named weights into the parameters, the main parameters and the replica."""
        self._set_master(hf_to_megatron(dict(named), self.layout, self.tp_rank, self.pp_rank))
        self._refresh_replica()

    @torch.no_grad()
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights under the HF model's ``state_dict`` names, on every rank.

        Each megatron tensor of the stage is gathered over the tensor group and converted alone
        (a sync holds one gathered tensor), written into the HF replica's own tensor; then every
        replica tensor is broadcast from its stage over the pipeline group and yielded: the replica
        (rollouts, scoring) is current after every export, a rollout engine that generates with it
        finds its weights in place, and any other engine is fed from storage whose addresses
        never change (what a CUDA-graph-captured sync needs).
        """
        tp_group = parallel_state.get_tensor_model_parallel_group()
        state = self.hf_model.state_dict(keep_vars=True)
        replica = {canonical_hf_name(name): t for name, t in state.items()}
        for name, p in self.module.named_parameters():
            if getattr(p, "tensor_model_parallel", False) and self.layout.tp > 1:
                parts = all_gather([torch.empty_like(p) for _ in range(self.layout.tp)], p.contiguous(), tp_group)
            else:  # replicated over the tensor group
                parts = [p] * self.layout.tp
            for hf_name, value in megatron_to_hf([{name: part} for part in parts], self.layout, self.pp_rank).items():
                replica[hf_name].copy_(value)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        pp_ranks = ranks_of(pp_group)
        for name, target in state.items():
            if self.layout.pp > 1:
                broadcast(target.detach(), pp_ranks[self.layout.owner_stage(name)], pp_group)
            yield name, target

    def _refresh_replica(self) -> None:
        for _ in self.export_weights():  # every rank takes part
            pass

    @property
    def run_world(self) -> World:
        return World(rank=dist.get_rank(), size=dist.get_world_size(), device=self.dp.device)

    def share(self, obj: Any) -> Any:
        return broadcast_from_model_parallel_source(obj)

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                 batching: Batching) -> torch.Tensor:  # fmt: skip
        """From the HF replica, which ``export_weights`` keeps current (rank-local)."""
        return self.policy.logprobs(prompts, idx, completions, self.spec.replace(with_entropy=False), batching)

    # -- checkpoints (learners.megatron.checkpoint) ---------------------------------------
    @property
    def _distributed(self):
        """megatron-core's ``DistributedOptimizer`` (the one optimizer of the chain)."""
        return self.optimizer.chained_optimizers[0]

    def _grid(self) -> dict[str, int]:
        return {"tp": self.tp_rank, "pp": self.pp_rank, "dp": self.dp.rank, "dp_size": self.dp.size}

    def _master_slices(self) -> dict[str, dict[str, Any]]:
        """This rank's slice of every parameter's main parameter: ``{name: {shape, start, values}}``
        (megatron-core 0.16.1's ``DistributedOptimizer``: its model / main parameter groups, and
        ``_get_model_param_range_map`` for where a slice starts in its parameter)."""
        opt = self._distributed
        main = {}
        for models, mains in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                              (opt.model_fp32_groups, opt.shard_fp32_groups)):  # fmt: skip
            for model_group, main_group in zip(models, mains):
                main |= {id(p): m for p, m in zip(model_group, main_group)}
        return {
            name: {"shape": tuple(p.shape), "start": opt._get_model_param_range_map(p)["param"].start,
                   "values": main[id(p)].detach().clone()}  # fmt: skip
            for name, p in self.module.named_parameters()
            if id(p) in main
        }

    def save_state(self, directory: Path, world: World) -> None:
        """Every rank writes ``megatron_rank{r}.pt``: its slice of the master weights and its Adam state."""
        state = {"layout": asdict(self.layout), "rank": self._grid(), "master": self._master_slices(),
                 "optimizer": self._distributed.optimizer.state_dict()}  # fmt: skip
        durable(rank_file(directory, world.rank), lambda p: torch.save(state, p))

    def load_state(self, directory: Path, rank: int) -> None:
        """The shard's master weights joined from its data-parallel ranks' files, this rank's Adam
        state, the replica refreshed; raises ``ValueError`` if the files were written by another grid."""
        path = rank_file(directory, rank)
        state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        if state is None or state["rank"] != self._grid() or state["layout"] != asdict(self.layout):
            written = f"{state['rank']} of {state['layout']}" if state else "nothing"
            raise ValueError(
                f"{path}: written by {written}, this rank is {self._grid()} of {asdict(self.layout)}: resume a "
                "megatron checkpoint with the parallel.tp, parallel.pp and world size that wrote it, or export it "
                "(python -m visurf_engine.export) and start from the exported model"
            )
        self._set_master(read_master(directory, self.tp_rank, self.pp_rank))
        self._distributed.optimizer.load_state_dict(state["optimizer"])
        self._refresh_replica()

    # -- one optimizer step ----------------------------------------------------------------
    def forward_backward(self, micro: Sequence[MicroBatch]) -> list[LossStats]:
        """Forward and backward of every micro-batch through the schedule; ``(loss, stats)`` per
        micro-batch (loss detached) on every rank of the pipeline group; gradients reduced."""
        batches = [self._stage_inputs(x) for x in micro]
        store = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=max(b["input_ids"].shape[1] for b in batches),
            micro_batch_size=max(b["input_ids"].shape[0] for b in batches),
            forward_only=False,
        )
        finalize_model_grads([self.model])
        results = [(s["loss"], s["stats"]) for s in store]
        if self.layout.pp > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            box = [results]
            dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[-1], group=group)
            results = box[0]
        return results

    def _stage_inputs(self, x: MicroBatch) -> dict[str, torch.Tensor]:
        b = x.batch
        if b.cu_seqlens is not None:
            raise ValueError("the megatron learner takes padded micro-batches (Batching(pack=False))")
        s = b.input_ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=b.input_ids.device).triu(1)[None, None]
        return {
            "input_ids": b.input_ids,
            "position_ids": b.position_ids,
            "attention_mask": causal,
            "pixel_values": b.pixel_values,
            "image_grid_thw": b.image_grid_thw,
            "image_of_seq": b.image_of_seq,
            "loss_inputs": x,
        }

    def _forward_step(self, data_iterator, model):
        b = next(data_iterator)
        hidden = model(b["input_ids"], b["position_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                       b["image_of_seq"])  # fmt: skip
        return hidden, partial(self._loss, b["loss_inputs"])

    def _loss(self, x: MicroBatch, hidden: torch.Tensor):
        """Fused vocab-parallel policy loss of one micro-batch on the last stage (``hidden[S, B, H]``)."""
        pos = x.batch.positions
        weight, start = self.module.head_shard()
        loss, stats = fused_policy_loss(
            hidden[pos[:, 1], pos[:, 0]], weight, x.batch.targets, x.old_logp, x.adv, x.w, self.spec, x.objective,
            ref_logp=x.ref_logp,
            rollout_logp=x.rollout_logp,
            tp_group=parallel_state.get_tensor_model_parallel_group() if self.layout.tp > 1 else None,
            vocab_start=start,
        )  # fmt: skip
        tokens = torch.tensor(x.batch.targets.numel(), dtype=torch.int)
        return loss, tokens, {"loss": loss.detach(), "stats": stats}

    def clip_grads(self, grad_clip: float) -> float:
        """The global grad norm of the reduced gradients (module docstring); clips this rank's slices."""
        self.optimizer.prepare_grads()  # no loss scaler: finds nothing to unscale
        norm = self.optimizer.get_grad_norm()
        clip_grad_by_total_norm_fp32(self.optimizer.get_parameters(), grad_clip, norm)
        return float(norm)

    def optimizer_step(self) -> None:
        self.optimizer.step_with_ready_grads()

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad_buffer()
