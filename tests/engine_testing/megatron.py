"""Test fixtures for the megatron backend: a tiny random Qwen2.5-VL, random micro-batches with an
image each, the single-process HF oracle, and the worker that spawned ranks run
(``tests/test_megatron_parallel.py``; spawned processes import it through ``tests/`` on
``sys.path``, see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
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
    opt = torch.optim.AdamW(model.parameters(), **OPTIM)
    opt.step()
    return {"losses": torch.stack(losses), "grads": grads, "norm": float(norm), "weights": model.state_dict()}


def parallel_worker(rank: int, world: int, port: int, out: str, tp: int, pp: int, tied: bool) -> None:
    """One rank: load the tiny model into (tp, pp) shards, one step on the random micro-batches;
    saves losses, local grads (megatron names), grad norm, and the exported HF weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from visurf_engine.learners.megatron.convert import Layout
    from visurf_engine.learners.megatron.learner import MegatronLearner
    from visurf_engine.parallel.world import World
    from visurf_engine.parallel.megatron import init_megatron

    dp = init_megatron(World(rank=rank, size=world), tp, pp, seed=0)
    model = tiny_vl_model(tied=tied)
    learner = MegatronLearner(tiny_policy(model), Layout.from_hf_config(model.config, tp, pp), SPEC, dp, **OPTIM)
    results = learner.forward_backward(random_micro_batches(model))
    grads = {k: p.main_grad.clone() for k, p in learner.module.named_parameters()}
    norm = learner.step(MAX_NORM).grad_norm
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, value in learner.export_weights():
            state[name].copy_(value)
    torch.save(
        {"losses": torch.stack([r[0] for r in results]), "grads": grads, "norm": norm, "weights": model.state_dict()},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def tiny_policy(model):
    """``model`` as a ``Policy`` (with a throw-away tokenizer: the fixtures' batches carry their own ids)."""
    from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
    from visurf_engine.models.policy import Policy
    from visurf_engine.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(["a tokenizer for the policy wrapper; the micro-batches carry their own ids"])
    return Policy(model, ImageOnlyProcessor(image_processor_for(56 * 56), tokenizer, chat_template=tokenizer.chat_template))


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
