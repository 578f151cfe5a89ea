"""The embedded default's base model, built once and cached as a local checkpoint.

Like the paper's Qwen2.5-VL on gRefCOCO, the base model can ground objects but has never
answered "no object": it is the ``tiny`` preset warm-started by SFT on *present-object*
shapes queries only, with the answer in the policy's own style (``spaced`` JSON, where the
dataset writes ``compact``: what ViSurf's *align* control is about). Like a real VLM, it
can answer either way: a share ``warmstart.direct_share`` of the targets answers straight
after an empty think slot (the gold's own template), the rest after a short reasoning trace.
A reasoning-only base (``direct_share: 0``) relies on its trace to localise, and imitating
trace-less golds then erodes it: measured, ViSurf's entropy rose 0.06 -> 0.3-1.2 in 60
steps and one seed in three collapsed (parse rate 0.32), and SFT fell from bbox_acc 0.76 to
0.31. A share ``warmstart.probe_share`` of every batch is the forgetting probe's task
(count / colour questions, ``<answer>2</answer>``), a skill the base model has and
post-training never sees, so evaluating it before and after measures forgetting.

The warm start is an SFT run through the same learner as post-training (``HFLearner``: gold
members with advantage 1, the ``-A log pi`` loss, token-mean weights), with a linear warmup
over 20 steps and a linear decay to 10%. The result is saved with ``save_pretrained`` under
``<cache_dir>/shapes-base-<key>`` (key = hash of every setting that shapes it), written to a
temporary directory and renamed, and then loaded like any real checkpoint. ``cached_base_model``
only looks it up; ``build_base_model`` trains it when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm
from visurf_kernels import LossSpec

from ...algo.members import build_members
from ...config import Config
from ...learners.base import make_micro_batch
from ...learners.hf import HFLearner
from ...models import attention
from ...models.hf import ImageOnlyProcessor, image_processor_for
from ...models.policy import Batching, Policy
from ...models.tiny import tiny_config, train_tokenizer
from ...parallel.world import World
from ...rewards import get_reward
from . import generator
from .probe import make_probe_split

log = logging.getLogger(__name__)

POLICY_STYLE = "spaced"  # how the warm-started policy writes its answers
VERSION = 2  # bump when the recipe changes, to invalidate caches
# The recipe's batches: padded rows, an image per row (the layout VERSION 2 was built with; the
# packed layout is the same math in another summation order, and would change the cached model).
WARMSTART_BATCHING = Batching(pack=False, vision_once=False, max_seqs=1 << 30)


def _key(cfg: Config) -> str:
    ws = cfg.warmstart
    recipe = {
        "version": VERSION,
        "preset": cfg.model.preset,
        "steps": ws.steps,
        "batch_size": ws.batch_size,
        "lr": ws.lr,
        "train_size": ws.train_size,
        "probe_share": ws.probe_share,
        "direct_share": ws.direct_share,
        "seed": cfg.data.seed,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def warmstart_target(row, spec, think: bool = True) -> str:
    """What the base model learns to write, in the policy style: the reasoning trace and the
    answer, or (``think=False``) the answer straight after an empty think slot."""
    if not think:
        return spec.render(row.solution, POLICY_STYLE)
    return generator.think_trace(row) + spec.answer(row.solution, POLICY_STYLE)


def probe_target(row) -> str:
    """The probe answer the base model learns: ``<answer>2</answer>`` / ``<answer>red</answer>``."""
    return f"<answer>{row.solution}</answer>"


def base_model_dir(cfg: Config) -> Path:
    """Where the warm-started base model of ``cfg`` is cached (built or not)."""
    if cfg.model.preset != "tiny":
        raise ValueError(f"model.preset: only 'tiny' is built in, got {cfg.model.preset!r}")
    return Path(cfg.warmstart.cache_dir) / f"shapes-base-{_key(cfg)}"


def cached_base_model(cfg: Config) -> Path | None:
    """The cached base model of ``cfg``, or None if it has not been built."""
    final = base_model_dir(cfg)
    return final if (final / "warmstart.json").is_file() else None


def build_base_model(cfg: Config, *, progress: bool = True) -> Path:
    """Path of the cached warm-started tiny checkpoint, training it first if it is missing."""
    cached = cached_base_model(cfg)
    if cached is not None:
        return cached
    final = base_model_dir(cfg)
    root = final.parent
    spec = get_reward("grounding")
    ws = cfg.warmstart
    rows = generator.make_split(ws.train_size, seed=cfg.data.seed + 7919, absent_ratio=0.0)
    probe_rows = make_probe_split(ws.train_size, seed=cfg.data.seed + 7919)  # held-out probe: seed + 1
    direct = set(random.Random(cfg.data.seed).sample(range(len(rows)), round(len(rows) * ws.direct_share)))
    examples = [(r, warmstart_target(r, spec, think=i not in direct)) for i, r in enumerate(rows)]
    probes = [(r, probe_target(r)) for r in probe_rows]
    corpus = [r.problem for r, _ in examples + probes] + [t for _, t in examples + probes]
    corpus += [spec.answer(r.solution, s) for r in rows[:500] for s in spec.styles] + [spec.answer([], s) for s in spec.styles]
    tokenizer = train_tokenizer(corpus)
    images = image_processor_for(generator.SIZE * generator.SIZE, kind=cfg.model.image_processor)
    processor = ImageOnlyProcessor(images, tokenizer, chat_template=tokenizer.chat_template)
    torch.manual_seed(cfg.data.seed)
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(tokenizer), attn_implementation=attention.NAME)
    policy = Policy(model, processor)
    learner = HFLearner(policy, LossSpec(backend=cfg.loss.backend), World(), lr=ws.lr, betas=(0.9, 0.999),
                        weight_decay=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.data.seed)
    model.train()
    bar = tqdm(range(ws.steps), desc="warm start (positive-only SFT)", disable=not progress, dynamic_ncols=True)
    loss_ema = None
    n_probe = round(ws.batch_size * ws.probe_share)
    for step in bar:
        batch = [examples[i] for i in torch.randint(len(examples), (ws.batch_size - n_probe,), generator=gen).tolist()]
        batch += [probes[i] for i in torch.randint(len(probes), (n_probe,), generator=gen).tolist()]
        prompts = policy.encode([r.problem for r, _ in batch], [r.image for r, _ in batch])
        members = build_members(None, None, [policy.encode_text(t) for _, t in batch], torch.ones(len(batch)),
                                gold_logprob_loss=True)  # fmt: skip
        weights = torch.full((len(members),), 1.0 / int(members.lengths.sum()))
        learner.set_lr(ws.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / ws.steps)))
        [(loss, _)] = learner.forward_backward([make_micro_batch(policy, prompts, members, weights, WARMSTART_BATCHING)])
        learner.step(1.0)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.set_postfix(nll=f"{loss_ema:.3f}")
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(json.dumps({"final_nll_ema": loss_ema, "policy_style": POLICY_STYLE}))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return final
