"""Test fixtures for the megatron backend: a tiny random Qwen2.5-VL, random micro-batches with an
image each, the single-process HF oracle, and the worker that spawned ranks run
(``tests/test_megatron_parallel.py``; spawned processes import it through ``tests/`` on
``sys.path``, see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from visurf_kernels import LossSpec, fused_policy_loss

from visurf_engine.learners.base import MicroBatch
from visurf_engine.models import attention
from visurf_engine.models.collate import Batching, collate
from visurf_engine.models.prompts import Prompts

GRID = (1, 4, 4)  # one image: 16 patches of 3 x 2 x 14 x 14 values, 4 merged tokens
PATCH_DIM = 3 * 2 * 14 * 14
SPEC = LossSpec(temperature=0.9, eps_low=0.2, eps_high=0.28, dual_clip=3.0, backend="torch", with_entropy=True)
OPTIM = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
MAX_NORM = 0.5
PADDED = Batching(pack=False, vision_once=False)


def tiny_vl_config(vocab: int = 301, tied: bool = False) -> Qwen2_5_VLConfig:
    """The ``tiny`` preset's shapes with an odd vocabulary (padding under TP); the vision and
    special tokens are the last ids."""
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4,
        tie_word_embeddings=tied,
    )


def tiny_vl_model(seed: int = 0, **config) -> Qwen2_5_VLForConditionalGeneration:
    """Random float32 model; every tensor (norms and biases too) gets noise, so layouts matter."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_vl_config(**config), attn_implementation=attention.NAME)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.float()


def random_prompts(model, g: torch.Generator, rows: int = 3) -> tuple[Prompts, list[list[int]]]:
    """``rows`` prompts (text, one image, text) and a completion each, random lengths and tokens."""
    config = model.config
    text = config.text_config.vocab_size - 4
    n_img = GRID[0] * GRID[1] * GRID[2] // 4

    def rand(n, hi=text):
        return torch.randint(hi, (n,), generator=g)

    ids, completions = [], []
    for _ in range(rows):
        ids.append(torch.cat([
            rand(int(rand(1, 4)) + 2), torch.tensor([config.vision_start_token_id]),
            torch.full((n_img,), config.image_token_id), torch.tensor([config.vision_end_token_id]), rand(int(rand(1, 5)) + 1),
        ]))  # fmt: skip
        completions.append(rand(int(rand(1, 6)) + 2).tolist())
    pixels = torch.randn(rows * GRID[0] * GRID[1] * GRID[2], PATCH_DIM, generator=g)
    prompts = Prompts(
        input_ids=ids, mm_token_type_ids=[(p == config.image_token_id).long() for p in ids],
        pixel_values=list(pixels.chunk(rows)), image_grid_thw=[torch.tensor(GRID)] * rows, images=[None] * rows,
    )  # fmt: skip
    return prompts, completions


def random_micro_batches(model, seed: int = 0, micro: int = 2, rows: int = 3, batching: Batching = PADDED) -> list[MicroBatch]:
    """``micro`` micro-batches (padded unless ``batching`` says otherwise) of ``rows`` (prompt with
    one image, completion) sequences of random lengths and tokens (``random_prompts``), advantages,
    weights and old log-probs, collated as the trainer collates them (``models.collate``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(micro):
        prompts, completions = random_prompts(model, g, rows)
        batch = collate(prompts, range(rows), completions, batching, rope_index=model.model.get_rope_index, pad_id=0,
                        device=torch.device("cpu"))  # fmt: skip
        n = int(batch.lengths.sum())
        per_seq = lambda v: torch.repeat_interleave(v, batch.lengths)  # noqa: E731
        out.append(MicroBatch(
            batch=batch,
            old_logp=None if m == 0 else -torch.rand(n, generator=g) * 6,  # on-policy, then off-policy (clipping)
            adv=per_seq(torch.randn(rows, generator=g)),
            w=per_seq(torch.rand(rows, generator=g) / (micro * rows)),
            objective=per_seq(torch.arange(rows) == m % rows).long(),
        ))  # fmt: skip
    return out


def hf_oracle(model, micro: list[MicroBatch]) -> dict:
    """Single-process reference: per-micro-batch losses, grads (HF names), grad norm, and
    the weights after the clipped AdamW step."""
    model.train()
    losses = []
    for x in micro:
        b = x.batch  # padded, an image per row: transformers' own multimodal forward
        hidden = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                             pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw, use_cache=False).last_hidden_state
        h = hidden[x.batch.positions[:, 0], x.batch.positions[:, 1]]
        loss, _ = fused_policy_loss(h, model.lm_head.weight, x.batch.targets, x.old_logp, x.adv, x.w, SPEC, x.objective)
        loss.backward()
        losses.append(loss.detach())
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **OPTIM)  # the learners' (learners.base.adamw)
    opt.step()
    return {"losses": torch.stack(losses), "grads": grads, "norm": float(norm), "weights": model.state_dict()}


def megatron_learner(model, tp: int, pp: int, dp, compute: torch.dtype = torch.float32):
    """A ``MegatronLearner`` over ``model`` (float32 master weights), its replica ``model`` itself
    cast to ``compute``, in the current process's megatron parallel state."""
    from visurf_engine.learners.megatron.convert import Layout
    from visurf_engine.learners.megatron.learner import MegatronLearner
    from visurf_engine.models.precision import Precision

    master = {k: v.clone() for k, v in model.state_dict().items()}
    policy = tiny_policy(model.to(compute), Precision(compute, compute))
    return MegatronLearner(policy, Layout.from_hf_config(model.config, tp, pp), SPEC, dp, weights=master, **OPTIM)


def parallel_worker(rank: int, world: int, port: int, out: str, tp: int, pp: int, tied: bool,
                    compute: torch.dtype = torch.float32, resume: bool = False) -> None:  # fmt: skip
    """One rank: load the tiny model into (tp, pp) shards, data parallel over ``world / (tp pp)``
    (data-parallel rank ``d`` takes micro-batches ``d, d + dp, ...``), one step on the random
    micro-batches; saves losses, local grads (megatron names), grad norm, and the exported HF
    weights. ``resume``: then a checkpoint (``out/ckpt``), a second learner from the base weights
    restored from it, and one more step of both on the same micro-batches (their exported weights:
    ``next`` and ``resumed``), then a step whose loss is NaN on data-parallel rank 0 (``nan_skipped``,
    ``after_nan``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from visurf_engine.parallel.world import World
    from visurf_engine.parallel.megatron import init_megatron

    dp = init_megatron(World(rank=rank, size=world), tp, pp, seed=0)
    model = tiny_vl_model(tied=tied)
    micro = random_micro_batches(model)[dp.rank :: dp.size]
    learner = megatron_learner(model, tp, pp, dp, compute)
    learner.set_lr(2 * OPTIM["lr"])  # reaches the param groups that megatron's optimizer steps with
    assert learner.lr == 2 * OPTIM["lr"] and {g["lr"] for g in learner.optimizer.optimizer.param_groups} == {learner.lr}
    learner.set_lr(OPTIM["lr"])
    results = learner.forward_backward(micro)
    grads = {k: p.main_grad.clone() for k, p in learner.module.named_parameters()}
    norm = learner.step(MAX_NORM).grad_norm
    exported = lambda lrn: {k: v.clone() for k, v in lrn.export_weights()}  # noqa: E731
    saved = {"losses": torch.stack([r[0] for r in results]), "grads": grads, "norm": norm, "weights": exported(learner)}
    if resume:
        (Path(out) / "ckpt").mkdir(exist_ok=True)
        learner.save_state(Path(out) / "ckpt", World(rank=rank, size=world))
        dist.barrier()  # a shard is restored from every data-parallel rank's file
        second = megatron_learner(tiny_vl_model(tied=tied), tp, pp, dp, compute)
        second.load_state(Path(out) / "ckpt", rank)
        saved["restored"] = exported(second)
        for lrn in (learner, second):
            lrn.forward_backward(micro)
            lrn.step(MAX_NORM)
        saved["next"], saved["resumed"] = exported(learner), exported(second)
        nan = float("nan")  # data-parallel rank 0's loss non-finite: no rank may step
        poisoned = [replace(x, adv=torch.full_like(x.adv, nan)) if dp.rank == 0 else x for x in micro]
        losses = learner.forward_backward(poisoned)
        update = learner.step(MAX_NORM, loss_finite=all(bool(torch.isfinite(loss)) for loss, _ in losses))
        saved["nan_skipped"], saved["after_nan"] = update.skipped, exported(learner)
    torch.save(saved, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def tiny_policy(model, precision=None):
    """``model`` as a ``Policy`` (with a throw-away tokenizer: the fixtures' batches carry their own ids)."""
    from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
    from visurf_engine.models.policy import Policy
    from visurf_engine.models.precision import Precision
    from visurf_engine.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(["a tokenizer for the policy wrapper; the micro-batches carry their own ids"])
    processor = ImageOnlyProcessor(image_processor_for(56 * 56), tokenizer, chat_template=tokenizer.chat_template)
    return Policy(model, processor, precision=precision or Precision())


def hf_learner_step(model, micro: list[MicroBatch]) -> dict:
    """The same step through the ``hf`` backend's learner (``HFLearner``): losses, grads (HF
    names), grad norm and the weights after its clipped AdamW step."""
    from visurf_engine.learners.hf import HFLearner
    from visurf_engine.parallel.world import World

    learner = HFLearner(tiny_policy(model), SPEC, World(), **OPTIM)
    model.train()
    losses = torch.stack([loss for loss, _ in learner.forward_backward(micro)])
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = learner.step(MAX_NORM).grad_norm
    return {"losses": losses, "grads": grads, "norm": norm, "weights": dict(learner.export_weights())}
