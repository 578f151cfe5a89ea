"""``MegatronLearner`` (``model.backend=megatron``): pipeline schedules, DDP, the optimizer over local shards.

The learner protocol (``learners.base``) on megatron-core: it holds this rank's stage and
tensor shard of the policy (``model.QwenVLMegatron``), loaded from the HF model through
``convert.hf_to_megatron`` and wrapped in megatron-core's ``DistributedDataParallel``. The HF
model stays the rollout / evaluation / scoring replica (``policy``; its no-grad passes are the
learner's ``logprobs``); ``export_weights`` streams the trained weights back under HF names
(``convert.megatron_to_hf``, gathered over the tensor group, broadcast over the pipeline group)
into the HF replica, for the weight sync, which is also the checkpoint format (rank 0 writes
``model.safetensors`` from it, every rank its ``optimizer_rank{r}.pt``).
The ranks of one model-parallel group train on the same members (``share``).

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
  the grads over data-parallel replicas (and the tied embedding over first/last stage);
- ``step``: global grad norm ``sqrt(sum over unique params of |g|^2)`` (a parameter counts on
  one tensor rank unless it is tensor-parallel, and the last stage's copy of a tied
  embedding not at all), all-reduced over the model-parallel group; clip; AdamW over the
  local shards.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from visurf_kernels import LossSpec, fused_policy_loss

from ...config import ParallelConfig
from ...durable import durable
from ...models.hf import ImageOnlyProcessor, load_model
from ...models.policy import Batching, Policy, Prompts
from ...models.precision import Precision
from ...parallel.megatron import broadcast_from_model_parallel_source
from ...parallel.world import World, all_gather, broadcast, ranks_of
from ..base import Learner, LossStats, MicroBatch, clip_grad_norm
from ..checkpointing import apply_activation_checkpointing
from .convert import Layout, canonical_hf_name, hf_to_megatron, megatron_to_hf
from .model import QwenVLMegatron, transformer_config


class MegatronLearner(Learner):
    """This rank's shard of the policy, its DDP wrapper and optimizer (module docstring)."""

    packs = False  # the local layer spec has no packed (THD) attention: padded rows

    def __init__(self, policy: Policy, layout: Layout, spec: LossSpec, dp: World, *, lr: float, betas,
                 weight_decay: float):  # fmt: skip
        hf_model = policy.model
        dtype = next(hf_model.parameters()).dtype
        self.policy, self.layout, self.hf_model, self.spec, self.dp = policy, layout, hf_model, spec, dp
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.config = transformer_config(hf_model.config, layout, dtype)
        visual = copy.deepcopy(hf_model.model.visual) if parallel_state.is_pipeline_first_stage() else None
        with torch.random.fork_rng():  # megatron's throw-away init must not shift the rollouts' RNG
            self.module = QwenVLMegatron(hf_model.config, layout, self.config, visual).to(dtype)
        self.load_weights(hf_model.state_dict().items())
        self.model = DistributedDataParallel(
            self.config, DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False), self.module
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay)

    @classmethod
    def load(cls, path: str | Path, processor: ImageOnlyProcessor, precision: Precision, spec: LossSpec, dp: World,
             parallel: ParallelConfig, *, activation_checkpointing: bool = False, **optim) -> MegatronLearner:  # fmt: skip
        """This rank's shard of the checkpoint at ``path`` and its HF replica (``policy``)."""
        if activation_checkpointing:
            raise NotImplementedError("train.activation_checkpointing with model.backend=megatron: not wired to "
                                      "megatron's recompute options yet; use model.backend=fsdp or hf")  # fmt: skip
        model = load_model(path, dtype=precision.master, device=dp.device)
        layout = Layout.from_hf_config(model.config, parallel.tp, parallel.pp)
        return cls(Policy(model, processor, dp.device, precision), layout, spec, dp, **optim)

    # -- weights --------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """This rank's shard of the HF-named weights (``convert.hf_to_megatron``)."""
        shard = hf_to_megatron(dict(named), self.layout, self.tp_rank, self.pp_rank)
        missing, unexpected = self.module.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"megatron shard mismatch: missing {missing}, unexpected {unexpected}")

    @torch.no_grad()
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights under the HF model's ``state_dict`` names, on every rank.

        Each gathered tensor is written into the HF replica's own tensor, which is what is yielded:
        the replica (scoring, checkpoints) is current after every export, a rollout engine that
        generates with it finds its weights in place, and any other engine is fed from storage
        whose addresses never change (what a CUDA-graph-captured sync needs).
        """
        tp_group = parallel_state.get_tensor_model_parallel_group()
        shards = [{} for _ in range(self.layout.tp)]
        for name, p in self.module.named_parameters():
            if getattr(p, "tensor_model_parallel", False) and self.layout.tp > 1:
                parts = all_gather([torch.empty_like(p) for _ in range(self.layout.tp)], p.contiguous(), tp_group)
            else:  # replicated over the tensor group
                parts = [p] * self.layout.tp
            for shard, part in zip(shards, parts):
                shard[name] = part
        mine = megatron_to_hf(shards, self.layout, self.pp_rank)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        pp_ranks = ranks_of(pp_group)
        for name, target in self.hf_model.state_dict(keep_vars=True).items():
            owner = self.layout.owner_stage(name)
            if owner == self.pp_rank:
                target.copy_(mine[canonical_hf_name(name)])
            if self.layout.pp > 1:
                broadcast(target.detach(), pp_ranks[owner], pp_group)
            yield name, target

    @property
    def run_world(self) -> World:
        return World(rank=dist.get_rank(), size=dist.get_world_size(), device=self.dp.device)

    def share(self, obj: Any) -> Any:
        return broadcast_from_model_parallel_source(obj)

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                 batching: Batching) -> torch.Tensor:  # fmt: skip
        """From the HF replica, which ``export_weights`` keeps current (rank-local)."""
        return self.policy.logprobs(prompts, idx, completions, self.spec.replace(with_entropy=False), batching)

    def save_state(self, directory: Path, world: World) -> None:
        """``model.safetensors`` from the HF replica (rank 0) and each rank's ``optimizer_rank{r}.pt``."""
        for _ in self.export_weights():  # the replica holds the trained weights (every rank takes part)
            pass
        if world.is_main:
            durable(directory / "model.safetensors", lambda p: save_model(self.hf_model, str(p)))
        durable(directory / f"optimizer_rank{world.rank}.pt", lambda p: torch.save(self.optimizer.state_dict(), p))

    def load_state(self, directory: Path, rank: int) -> None:
        load_model(self.hf_model, str(directory / "model.safetensors"), strict=True)
        self.load_weights(self.hf_model.state_dict().items())
        self.optimizer.load_state_dict(torch.load(directory / f"optimizer_rank{rank}.pt", weights_only=False))

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
        """The global grad norm over the model-parallel group (module docstring); clips the local shards."""
        for p in self.params:
            p.grad = p.main_grad
        counted = [p.grad for p in self.params if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
        return clip_grad_norm(self.params, grad_clip, counted=counted, group=parallel_state.get_model_parallel_group())

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad_buffer()
