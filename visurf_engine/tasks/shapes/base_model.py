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
over 20 steps and a linear decay to 10%; ``save_base_model`` runs it and saves the result with
``save_pretrained``, so it is loaded like any real checkpoint.

The default config's base model ships with the package (``SHIPPED``, built by
``scripts/build_base_model.py`` on one thread): float reductions differ between CPUs and thread
counts, so a model built on each machine would differ from machine to machine, and post-training
amplifies that. Its ``manifest.json`` records the recipe (``recipe(cfg)``: every setting that
shapes the model), the SHA-256 of every file and where it was built; ``shipped_base_model``
returns it for a config of that recipe. Any other recipe is built on first use under
``<cache_dir>/shapes-base-<key>`` (key = hash of the recipe), written to a temporary directory
and renamed: ``cached_base_model`` only looks it up, ``build_base_model`` trains it when it is
missing.
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
from visurf_kernels import OBJECTIVES, LossSpec

from ...algo.members import build_members
from ...config import Config
from ...learners.base import make_micro_batch
from ...learners.hf import HFLearner
from ...models import attention
from ...models.hf import ImageOnlyProcessor, image_processor_for
from ...models.policy import Batching, Policy
from ...models.tiny import tiny_config, train_tokenizer
from ...parallel.world import World
from ...provenance import cpu_model, provenance
from ...rewards import get_reward
from . import generator
from .probe import make_probe_split

log = logging.getLogger(__name__)

POLICY_STYLE = "spaced"  # how the warm-started policy writes its answers
TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # the template's tags (kept whole with warmstart.atomic_tags)
VERSION = 2  # bump when the recipe changes, to invalidate caches
# The recipe's batches: padded rows, an image per row (the layout VERSION 2 was built with; the
# packed layout is the same math in another summation order, and would change the cached model).
WARMSTART_BATCHING = Batching(pack=False, vision_once=False, max_seqs=1 << 30)


# The base model shipped with the package: the default config's, with its manifest.
SHIPPED = Path(__file__).resolve().parent / "shipped_base_model"
MANIFEST = "manifest.json"


def recipe(cfg: Config) -> dict:
    """Every setting the warm-started base model of ``cfg`` depends on (the cache key hashes it,
    the shipped model's manifest records it); only the ``tiny`` preset has one."""
    if cfg.model.preset != "tiny":
        raise ValueError(f"model.preset: only 'tiny' is built in, got {cfg.model.preset!r}")
    ws = cfg.warmstart
    return {
        "version": VERSION,
        "preset": cfg.model.preset,
        "steps": ws.steps,
        "batch_size": ws.batch_size,
        "lr": ws.lr,
        "train_size": ws.train_size,
        "probe_share": ws.probe_share,
        "direct_share": ws.direct_share,
        "atomic_tags": ws.atomic_tags,
        "seed": cfg.data.seed,
    }


def _key(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()[:12]


def warmstart_target(row, spec, think: bool = True) -> str:
    """What the base model learns to write, in the policy style: the reasoning trace and the
    answer, or (``think=False``) the answer straight after an empty think slot."""
    if not think:
        return spec.render(row.solution, POLICY_STYLE)
    return generator.think_trace(row) + spec.answer(row.solution, POLICY_STYLE)


def probe_target(row) -> str:
    """The probe answer the base model learns: ``<answer>2</answer>`` / ``<answer>red</answer>``."""
    return f"<answer>{row.solution}</answer>"


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 (hex) of every file in ``directory`` but its manifest, by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}  # fmt: skip


def write_manifest(cfg: Config, directory: Path, final_nll: float) -> dict:
    """Write ``directory/manifest.json`` for the base model of ``cfg`` saved there: its recipe,
    final warm-start NLL (EMA), answer style, the SHA-256 of every file, and where it was built
    (``provenance``: command, commit, date, device, versions, threads; and the CPU, which trains
    it on any machine). Returns the manifest."""
    manifest = {
        "recipe": recipe(cfg),
        "final_nll_ema": final_nll,
        "policy_style": POLICY_STYLE,
        "files": file_digests(directory),
        "built_with": {**provenance(), "cpu": cpu_model()},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def shipped_manifest() -> dict | None:
    """The manifest of the base model shipped with the package; None if it is not installed."""
    path = SHIPPED / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_base_model(cfg: Config) -> Path | None:
    """``SHIPPED`` when ``cfg``'s recipe is the one the shipped base model was built with, else None."""
    manifest = shipped_manifest()
    return SHIPPED if manifest is not None and manifest["recipe"] == recipe(cfg) else None


def not_shipped_reason(cfg: Config) -> str:
    """Why ``cfg`` does not get the shipped base model: the recipe settings where it differs, as
    ``name: this config's (shipped)``, or that none is installed."""
    manifest = shipped_manifest()
    if manifest is None:
        return f"none is installed at {SHIPPED}"
    theirs = manifest["recipe"]
    return "recipe " + ", ".join(f"{k}: {v} ({theirs.get(k)})" for k, v in recipe(cfg).items() if theirs.get(k) != v)


def base_model_dir(cfg: Config) -> Path:
    """Where the warm-started base model of ``cfg`` is cached (built or not)."""
    return Path(cfg.warmstart.cache_dir) / f"shapes-base-{_key(cfg)}"


def cached_base_model(cfg: Config) -> Path | None:
    """The cached base model of ``cfg``, or None if it has not been built."""
    final = base_model_dir(cfg)
    return final if (final / "warmstart.json").is_file() else None


def save_base_model(cfg: Config, out: Path, *, progress: bool = True) -> float:
    """Warm-start the base model of ``cfg`` from scratch (tokenizer, random init, SFT) and save it
    into the new directory ``out`` (weights, model and generation config, processor, tokenizer);
    returns the final training NLL (EMA)."""
    spec = get_reward("grounding")
    ws = cfg.warmstart
    rows = generator.make_split(ws.train_size, seed=cfg.data.seed + 7919, absent_ratio=0.0)
    probe_rows = make_probe_split(ws.train_size, seed=cfg.data.seed + 7919)  # held-out probe: seed + 1
    direct = set(random.Random(cfg.data.seed).sample(range(len(rows)), round(len(rows) * ws.direct_share)))
    examples = [(r, warmstart_target(r, spec, think=i not in direct)) for i, r in enumerate(rows)]
    probes = [(r, probe_target(r)) for r in probe_rows]
    corpus = [r.problem for r, _ in examples + probes] + [t for _, t in examples + probes]
    corpus += [spec.answer(r.solution, s) for r in rows[:500] for s in spec.styles] + [spec.answer([], s) for s in spec.styles]
    tokenizer = train_tokenizer(corpus, atomic=TAGS if ws.atomic_tags else ())
    images = image_processor_for(generator.SIZE * generator.SIZE, kind=cfg.model.image_processor)
    processor = ImageOnlyProcessor(images, tokenizer, chat_template=tokenizer.chat_template)
    torch.manual_seed(cfg.data.seed)
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(tokenizer), attn_implementation=attention.NAME)
    policy = Policy(model, processor)
    learner = HFLearner(policy, LossSpec(backend=cfg.loss.backend), World(), lr=ws.lr, betas=(0.9, 0.999),
                        weight_decay=0.0)  # fmt: skip
    # the recipe's optimizer: torch's per-tensor AdamW, as VERSION 2 was built (the learners' fused one rounds differently)
    learner.optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.999), weight_decay=0.0)
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
                                gold_objective=OBJECTIVES.index("logprob"))  # fmt: skip
        weights = torch.full((len(members),), 1.0 / int(members.lengths.sum()))
        learner.set_lr(ws.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / ws.steps)))
        [(loss, _)] = learner.forward_backward([make_micro_batch(policy, prompts, members, weights, WARMSTART_BATCHING)])
        learner.step(1.0)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.set_postfix(nll=f"{loss_ema:.3f}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return loss_ema


def build_base_model(cfg: Config, *, progress: bool = True) -> Path:
    """Path of the cached warm-started tiny checkpoint of ``cfg``, training it first
    (``save_base_model``) if it is missing."""
    cached = cached_base_model(cfg)
    if cached is not None:
        return cached
    final = base_model_dir(cfg)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    loss_ema = save_base_model(cfg, tmp, progress=progress)
    (tmp / "warmstart.json").write_text(json.dumps({"final_nll_ema": loss_ema, "policy_style": POLICY_STYLE}))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return final
