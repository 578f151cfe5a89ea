"""The memory plan of a run: where each byte of one GPU's step lives, before the run starts.

    python -m visurf_engine.plan --config F [key=value ...] [--gpus 8] [--gpu-gib 80]

prints, per GPU, the bytes of every component of a step and the peak they add up to, and the
headroom on a ``--gpu-gib`` card; ``check`` (the trainer calls it at start on CUDA) refuses a
config that cannot fit, naming the settings that would. The model's parameters are counted
exactly (the architecture built on the meta device); activations follow the formulas below.

Components (``N``: parameters; ``b_m``, ``b_c``: bytes of the master / compute dtype; ``W``: GPUs):

- **weights, gradients, optimizer** (AdamW: two states): ``N b_m`` each, ``2 N b_m`` for the
  states, on every GPU with ``hf`` (DDP's gradients are views of its buckets: no second copy),
  ``/W`` with ``fsdp``; with ``fsdp.offload`` all three live in host memory (``host``).
- **gathered** (``fsdp``): the root unit (embeddings, LM head, final norm, the vision tower's
  patch embedding and merger) gathered in ``b_c`` for the whole forward and backward, and two
  block units in flight (the one computing and the one prefetched), with one unit's
  unsharded fp32 gradients before their reduce-scatter.
- **autocast copies** (``hf`` with ``b_c < b_m``): autocast casts every matmul weight once per
  forward and the cast copies are saved for the backward: ``N_matmul b_c``.
- **reference**: the KL reference, frozen, in ``b_c`` (``/W`` with ``fsdp``); 0 without KL.
- **rollout engine** (held through the step) and **rollout cache** (held while sampling: a
  working set of its own): vLLM's share (``gpu_memory_utilization`` of the card, weights and KV
  cache) is the cache when vLLM sleeps during the update (CUDA's default), else the engine; the
  HF replica's weights (``N b_replica``) are the engine and the KV cache of one 64-sequence
  generation chunk (sized in 256-token buckets) the cache. ``rollout.backend=auto`` is planned as
  the trainer resolves it on the plan's device (``rollout.auto``: on CUDA, vLLM when this
  environment can import it).
- **loss**: the fused loss's working set: the exp buffer of one row chunk ``[n, V]`` (bf16 for
  16-bit inputs; ``n = max(1024, N_tokens / 16)``), the fp32 ``dW`` accumulator ``[V, H]`` when
  the rows take more than one chunk, ``d hidden [N_tokens, H]``.
- **activations** of one micro-batch (``T`` = ``train.max_tokens_per_micro_batch`` tokens; the
  ``P`` patches of its images), what the backward keeps, per token and decoder layer, per
  patch and vision block (``kv``: KV heads x head dim; with autocast the residual stream and the
  norms stay fp32):
      text layer   b_c (9 H + 4 I + 3 kv) + (4 - b_c) 7 H
      vision block b_c (13.125 Hv + 4 Iv) + (4 - b_c) 3.2 Hv
      outside      4 (2 H) per token; 4 (1176 + 5 Hv) per patch (pixels, merger)
  With activation checkpointing each layer keeps its input (``4 H`` per token, ``b_c Hv`` per
  patch) and one layer at a time is recomputed in full during the backward, its activations and
  their gradients alive together (twice one layer's). These coefficients were measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on the real 3B widths (``bench/memory.py --saved``:
  fp32 and CPU bf16 autocast, within 1% of the formulas).
- **step working set**: none; the learners' AdamW is fused (``learners.base.adamw``, on CPU as on
  CUDA): no temporaries (torch's per-tensor loop would add one of the largest parameter's size).

``megatron`` (``parallel.tp x parallel.pp``, data parallel ``dp = W / (tp pp)``) is planned for
the fullest rank of the grid (``megatron_params``: its ``L / pp`` layers, each split over ``tp``
but for its two norms; the first stage adds the whole vision tower and a ``1/tp`` vocabulary
shard of the embedding, the last the final norm and a shard of the head; one rank holds both
when ``pp = 1``), ``N_r`` parameters:
- **weights** ``N_r b_c`` (the shard computes in the compute dtype), **gradients** ``4 N_r``
  (fp32 buffers), **optimizer**: the distributed optimizer's Adam moments and, beside 16-bit
  parameters, its fp32 main parameters (the master weights): ``12 N_r / dp`` (``8 N_r / dp``
  in fp32); **hf replica**: the whole model in ``b_c`` (rollouts, scoring, evaluation; the
  ``hf`` rollout engine generates with it); **reference**: whole, in ``b_c``.
- **activations**: the formulas above without autocast's fp32 copies (the parameters are in
  ``b_c``), a layer's ``I`` and ``kv`` terms split over ``tp`` (no sequence parallelism: its
  ``H`` terms are counted whole on every tensor rank, an upper bound); 1F1B keeps up to ``pp``
  micro-batches in flight on the first stage, which holds ``pp`` micro-batches of its layers
  and vision passes. Padded rows (no packing): ``train.micro_batch_size`` sequences. Not
  measured by ``bench/memory.py`` (hf and fsdp).
- **loss** over a ``1/tp`` vocabulary shard; **weight export** (a working set): the embedding
  gathered over the tensor group and converted, three ``[V, H]`` tensors in ``b_c``;
  **optimizer step**: torch's AdamW over the rank's slices (foreach on CUDA: one temporary of
  their size).

The peak is the persistent part (weights, gradients, optimizer, reference, rollout engine; the
hf replica) plus the largest working set of the step: the update (gathered, autocast copies,
loss, activations), the optimizer step, sampling (the rollout cache) or the weight export.
The gradients are persistent in a step of several micro-batches (the earlier ones' gradients are
alive through the next one's forward and loss; DDP's buckets always are): the plan of a run
assumes one. A step of one micro-batch without DDP (``accumulating=False``: ``bench/memory.py``'s)
allocates them only during its backward, after the loss's working set is gone and while the
activations are being freed: there the update's peak is the activations plus the larger of the
loss and the gradients. ``bench/memory.py`` checks the plan against measured peaks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import Config, ConfigError, config_from_mapping, load_config
from .rollout.auto import resolve

GIB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of an architecture; parameter counts are exact (meta model)."""

    hidden: int
    inter: int
    layers: int
    kv: int  # KV heads x head dim
    kv_heads: int
    vocab: int
    vis_hidden: int
    vis_inter: int
    vis_depth: int
    patch_dim: int  # values per patch (channels x temporal x patch^2)
    params: int  # all
    layer_params: int  # one decoder layer
    block_params: int  # one vision block
    root_params: int  # outside the layers and blocks (the FSDP root unit)
    embed_params: int  # input embedding (a lookup: no autocast copy)
    tied: bool

    @classmethod
    def of(cls, hf_config) -> Shape:
        from .models.hf import MODEL_CLASSES

        with torch.device("meta"):
            model = MODEL_CLASSES[hf_config.model_type]._from_config(hf_config)
        t, v = hf_config.text_config, hf_config.vision_config
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        inner = model.model
        layers, blocks = inner.language_model.layers, inner.visual.blocks
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        total = count(model)
        return cls(
            hidden=t.hidden_size, inter=t.intermediate_size, layers=len(layers), kv=t.num_key_value_heads * head_dim,
            kv_heads=t.num_key_value_heads,
            vocab=t.vocab_size, vis_hidden=v.hidden_size, vis_inter=v.intermediate_size, vis_depth=len(blocks),
            patch_dim=v.in_channels * v.temporal_patch_size * v.patch_size**2 if hasattr(v, "in_channels") else 3 * 2 * 14 * 14,
            params=total, layer_params=count(layers[0]), block_params=count(blocks[0]) if len(blocks) else 0,
            root_params=total - count(layers) - count(blocks), embed_params=inner.language_model.embed_tokens.weight.numel(),
            tied=model.lm_head.weight is inner.language_model.embed_tokens.weight,
        )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """One micro-batch of the update: tokens, patches, completion tokens (the loss's rows)."""

    tokens: int
    patches: int
    completion_tokens: int
    sequences: int


def workload(cfg: Config, patches_per_image: int, prompt_text_tokens: int = 64) -> Workload:
    """The largest micro-batch ``cfg`` forms: packed, ``train.max_tokens_per_micro_batch`` tokens
    of sequences ``P + C`` long (``P``: the image's tokens, ``patches / 4``, and the text;
    ``C = rollout.max_new_tokens``), G + 1 members a prompt sharing one image (``vision_once``) and,
    with ``train.share_prompts``, one copy of the prompt in the row; padded (``train.pack=false``, and always with ``model.backend=megatron``), ``train.micro_batch_size``
    such sequences."""
    t, r = cfg.train, cfg.rollout
    prompt = patches_per_image // 4 + prompt_text_tokens
    seq = prompt + r.max_new_tokens
    pack = t.pack and cfg.model.backend != "megatron"
    seqs = max(1, t.max_tokens_per_micro_batch // seq) if pack else t.micro_batch_size
    prompts = min(seqs, math.ceil(seqs / (r.n + 1)) + 1) if t.vision_once else seqs
    tokens = prompts * prompt + seqs * r.max_new_tokens if pack and t.share_prompts else seqs * seq
    return Workload(tokens=tokens, patches=prompts * patches_per_image, completion_tokens=seqs * r.max_new_tokens,
                    sequences=seqs)  # fmt: skip


def activation_bytes(s: Shape, w: Workload, compute: int, checkpointing: bool) -> int:
    """What the backward keeps of one micro-batch (module docstring formulas)."""
    text = compute * (9 * s.hidden + 4 * s.inter + 3 * s.kv) + (4 - compute) * 7 * s.hidden
    vision = compute * (13.125 * s.vis_hidden + 4 * s.vis_inter) + (4 - compute) * 3.2 * s.vis_hidden
    outside = 4 * 2 * s.hidden * w.tokens + 4 * (s.patch_dim + 5 * s.vis_hidden) * w.patches
    if not checkpointing:
        return int(s.layers * text * w.tokens + s.vis_depth * vision * w.patches + outside)
    kept = s.layers * 4 * s.hidden * w.tokens + s.vis_depth * compute * s.vis_hidden * w.patches
    return int(kept + 2 * max(text * w.tokens, vision * w.patches) + outside)


def megatron_params(s: Shape, tp: int, pp: int) -> int:
    """Parameters of the fullest rank of a ``tp x pp`` megatron grid (module docstring)."""
    layer = (s.layer_params - 2 * s.hidden) // tp + 2 * s.hidden  # the two norms are whole on every tensor rank
    rows = -(-s.vocab // tp) * s.hidden  # one vocabulary shard (the vocabulary padded to a multiple of tp)
    vision = s.params - s.layers * s.layer_params - s.embed_params * (1 if s.tied else 2) - s.hidden
    first = vision + rows
    last = s.hidden + (rows if not s.tied or pp > 1 else 0)  # tied, pp > 1: the last stage's copy of the embedding
    return s.layers // pp * layer + (first + last if pp == 1 else max(first, last))


def megatron_activation_bytes(s: Shape, w: Workload, compute: int, tp: int, pp: int) -> int:
    """What the first stage's backward keeps of its micro-batches in flight (module docstring)."""
    text = compute * (9 * s.hidden + (4 * s.inter + 3 * s.kv) / tp)
    vision = compute * (13.125 * s.vis_hidden + 4 * s.vis_inter)
    outside = 4 * 2 * s.hidden * w.tokens + 4 * (s.patch_dim + 5 * s.vis_hidden) * w.patches
    return int(pp * (s.layers // pp * text * w.tokens + s.vis_depth * vision * w.patches + outside))


def loss_bytes(s: Shape, w: Workload, compute: int, device: str = "cuda", tp: int = 1) -> int:
    """The fused loss's working set (module docstring) over a ``1/tp`` vocabulary shard; on CPU
    the torch engine's: an fp32 buffer of ``max(256, N / 16)`` rows."""
    n, vocab = w.completion_tokens, -(-s.vocab // tp)
    chunk, buffer = (max(1024, -(-n // 16)), compute) if device == "cuda" else (max(256, -(-n // 16)), 4)
    chunk = min(n, chunk)
    accumulator = 4 * vocab * s.hidden if n > chunk else 0
    return chunk * vocab * buffer + accumulator + n * s.hidden * compute * 2


@dataclass
class Plan:
    """Bytes per GPU of each component; ``host``: what lives in host memory instead."""

    components: dict[str, int]
    persistent: tuple[str, ...]
    working: dict[str, tuple[str, ...]]  # name of a working set -> its components
    gpu_bytes: int | None = None
    host: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        base = sum(self.components[c] for c in self.persistent)
        return base + max(sum(self.components[c] for c in parts) for parts in self.working.values())

    @property
    def learner_peak(self) -> int:
        """The peak without the rollout engine (what the learner alone reaches: ``bench/memory.py``)."""
        base = sum(self.components[c] for c in self.persistent if c != "rollout engine")
        return base + max(sum(self.components[c] for c in self.working[k])
                          for k in ("update", "backward", "optimizer step") if k in self.working)  # fmt: skip

    @property
    def headroom(self) -> int | None:
        return None if self.gpu_bytes is None else self.gpu_bytes - self.peak

    def table(self) -> str:
        rows = [f"{name:22s} {self.components[name] / GIB:9.2f} GiB" for name in self.components]
        rows.append(f"{'peak':22s} {self.peak / GIB:9.2f} GiB  (persistent + the largest working set: "
                    f"{max(self.working, key=lambda k: sum(self.components[c] for c in self.working[k]))})")  # fmt: skip
        if self.gpu_bytes is not None:
            rows.append(f"{'headroom':22s} {self.headroom / GIB:9.2f} GiB  of {self.gpu_bytes / GIB:.0f} GiB")
        rows += [f"{'host: ' + k:22s} {v / GIB:9.2f} GiB" for k, v in self.host.items()]
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


def learner_sets(accumulating: bool, *, backend: str, gpus: int) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The persistent components and the working sets of an ``hf`` / ``fsdp`` step (module
    docstring): with ``accumulating`` (or DDP's buckets: ``hf`` on several GPUs) the gradients are
    persistent, else they join the backward's working set, which the loss's has left."""
    update = ("gathered", "autocast copies", "activations")
    sampling = ("rollout cache",)
    if accumulating or (backend == "hf" and gpus > 1):
        return ("weights", "gradients", "optimizer", "reference", "rollout engine"), {
            "update": (*update, "loss"), "sampling": sampling}
    return ("weights", "optimizer", "reference", "rollout engine"), {
        "update": (*update, "loss"), "backward": (*update, "gradients"), "sampling": sampling}


def plan(cfg: Config, shape: Shape, *, gpus: int, gpu_gib: float | None = None, patches_per_image: int = 1024,
         device: str = "cuda", work: Workload | None = None, accumulating: bool = True) -> Plan:  # fmt: skip
    """The plan of ``cfg`` for one of ``gpus`` GPUs (module docstring); ``work``: the micro-batch
    (default: the largest ``cfg`` forms, ``workload``); ``accumulating=False``: a step of that one
    micro-batch (its gradients appear in the backward; with ``hf`` on several GPUs DDP's buckets
    hold them throughout all the same)."""
    from .models.precision import Precision

    cfg = resolve(cfg, device, shape.params)[0]
    m = cfg.model
    p = Precision.of(m.dtype, m.compute_dtype, torch.device(device))
    bm, bc = p.master.itemsize, p.compute.itemsize
    s, w = shape, work or workload(cfg, patches_per_image)
    if m.backend == "megatron":
        return megatron_plan(cfg, s, w, bc, gpus=gpus, gpu_gib=gpu_gib, device=device)
    fsdp, mixed = m.backend == "fsdp", p.mixed
    shard = gpus if fsdp else 1
    offload = fsdp and cfg.fsdp.offload
    c: dict[str, int] = {}
    weights, grads, optim = s.params * bm // shard, s.params * bm // shard, 2 * s.params * bm // shard
    host = {}
    if offload:
        host = {"weights": weights, "gradients": grads, "optimizer": optim}
        weights = grads = optim = 0
    c["weights"], c["gradients"], c["optimizer"] = weights, grads, optim
    unit = max(s.layer_params, s.block_params)
    c["gathered"] = (s.root_params + 2 * unit) * bc + unit * 4 if fsdp else 0
    c["autocast copies"] = (s.params - (0 if s.tied else s.embed_params)) * bc if (mixed and not fsdp) else 0
    c["reference"] = (s.params * bc // shard) if cfg.algo.kl_coef > 0 else 0
    c["rollout engine"], c["rollout cache"] = rollout_bytes(cfg, s, w, gpu_gib, bc, device)
    c["loss"] = loss_bytes(s, w, bc, device)
    c["activations"] = activation_bytes(s, w, bc, cfg.train.activation_checkpointing)
    notes = [f"micro-batch: {w.tokens} tokens ({w.sequences} sequences), {w.patches} patches, "
             f"{w.completion_tokens} completion tokens"]  # fmt: skip
    persistent, working = learner_sets(accumulating, backend=m.backend, gpus=gpus)
    return Plan(
        components=c,
        persistent=persistent,
        working=working,
        gpu_bytes=int(gpu_gib * GIB) if gpu_gib else None,
        host=host,
        notes=notes,
    )


def megatron_plan(cfg: Config, s: Shape, w: Workload, bc: int, *, gpus: int, gpu_gib: float | None,
                  device: str) -> Plan:  # fmt: skip
    """``plan`` of ``model.backend=megatron`` (module docstring), compute dtype ``bc`` bytes."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if gpus % (tp * pp):
        raise ValueError(f"parallel.tp * parallel.pp = {tp * pp} must divide the {gpus} GPUs")
    dp, local = gpus // (tp * pp), megatron_params(s, tp, pp)
    main = 4 if bc < 4 else 0  # fp32 main parameters beside 16-bit ones
    c = {"weights": local * bc, "gradients": local * 4, "optimizer": local * (8 + main) // dp, "hf replica": s.params * bc,
         "reference": s.params * bc if cfg.algo.kl_coef > 0 else 0}  # fmt: skip
    c["rollout engine"], c["rollout cache"] = rollout_bytes(cfg, s, w, gpu_gib, bc, device)
    c["loss"] = loss_bytes(s, w, bc, device, tp)
    c["activations"] = megatron_activation_bytes(s, w, bc, tp, pp)
    c["weight export"] = 3 * (-(-s.vocab // tp) * tp) * s.hidden * bc
    largest = max(s.layer_params, s.block_params, s.embed_params)
    c["optimizer step"] = local * 4 // dp if device == "cuda" else largest * 4  # foreach on CUDA, single-tensor on CPU
    notes = [f"megatron: tp {tp} x pp {pp} x dp {dp}, {local / 1e9:.2f} B parameters on the fullest rank",
             f"micro-batch: {w.tokens} tokens ({w.sequences} padded sequences), {w.patches} patches, "
             f"{w.completion_tokens} completion tokens"]  # fmt: skip
    if cfg.train.activation_checkpointing:
        notes.append("train.activation_checkpointing is not available with model.backend=megatron (planned without)")
    return Plan(
        components=c,
        persistent=("weights", "gradients", "optimizer", "hf replica", "reference", "rollout engine"),
        working={"update": ("loss", "activations"), "optimizer step": ("optimizer step",), "sampling": ("rollout cache",),
                 "weight export": ("weight export",)},  # fmt: skip
        gpu_bytes=int(gpu_gib * GIB) if gpu_gib else None,
        notes=notes,
    )


def rollout_bytes(cfg: Config, s: Shape, w: Workload, gpu_gib: float | None, bc: int, device: str) -> tuple[int, int]:
    """The rollout engine's bytes on the GPU: (held through the step, held only while sampling)
    (module docstring)."""
    r = cfg.rollout
    if r.backend == "vllm":
        share = int(r.vllm.gpu_memory_utilization * (gpu_gib or 0) * GIB)
        sleeps = r.vllm.sleep if r.vllm.sleep is not None else device == "cuda"
        return (0, share) if sleeps else (share, 0)
    seq = w.tokens // max(1, w.sequences)
    chunk = 64  # HFRollout's sequences per generate call
    kv_cache = 2 * s.layers * s.kv * chunk * (-(-seq // 256) * 256) * bc
    replica = r.hf.replica if r.hf.replica is not None else cfg.model.backend == "fsdp"
    return (s.params * BYTES[r.hf.dtype] if replica else 0), kv_cache


def fixes(cfg: Config, shape: Shape, gpus: int, gpu_gib: float) -> list[str]:
    """Overrides that would make ``cfg`` fit, each alone (the first that does, in this order)."""
    options = []
    megatron = cfg.model.backend == "megatron"
    if megatron:
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        if shape.kv_heads % (2 * tp) == 0 and gpus % (2 * tp * pp) == 0:
            options.append([f"parallel.tp={2 * tp}"])
        if cfg.train.micro_batch_size > 1:
            options.append([f"train.micro_batch_size={cfg.train.micro_batch_size // 2}"])
    if cfg.model.backend != "fsdp":
        options.append(["model.backend=fsdp"] + (["rollout.hf.replica=true"] if cfg.rollout.backend == "hf" else []))
    if not cfg.train.activation_checkpointing and not megatron:
        options.append(["train.activation_checkpointing=true"])
    if cfg.model.backend == "fsdp" and not cfg.fsdp.offload:
        options.append(["fsdp.offload=true"])
    if cfg.train.max_tokens_per_micro_batch > 2048 and not megatron:  # megatron trains padded rows
        options.append([f"train.max_tokens_per_micro_batch={cfg.train.max_tokens_per_micro_batch // 4}"])
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm.gpu_memory_utilization > 0.2:
        options.append(["rollout.vllm.gpu_memory_utilization=0.2"])
    found, combined = [], []
    for opt in options:
        combined += opt
        for candidate in (opt, list(combined)):
            if plan(config_from_mapping(cfg.to_dict(), candidate), shape, gpus=gpus, gpu_gib=gpu_gib).headroom >= 0:
                found.append(" ".join(candidate))
                break
        if found:
            break
    return found


class DoesNotFit(RuntimeError):
    """The plan's peak exceeds the GPU's memory."""


def check(cfg: Config, shape: Shape, gpus: int, gpu_gib: float) -> Plan:
    """The plan, or ``DoesNotFit`` naming the settings that would fit."""
    cfg = resolve(cfg, "cuda", shape.params)[0]
    p = plan(cfg, shape, gpus=gpus, gpu_gib=gpu_gib)
    if p.headroom < 0:
        found = fixes(cfg, shape, gpus, gpu_gib)
        raise DoesNotFit(
            f"this config needs {p.peak / GIB:.1f} GiB per GPU, the GPU has {gpu_gib:.1f} GiB "
            f"(python -m visurf_engine.plan shows where each byte goes):\n{p.table()}\n"
            + (f"it fits with: {found[0]}" if found else "no single setting fixes it: use more GPUs, a smaller "
               "model, or fewer tokens per micro-batch")  # fmt: skip
            + " (train.memory_check=false starts it anyway)"
        )
    return p


def check_memory(cfg: Config, model_dir: str | Path, gpus: int, device: torch.device) -> Plan:
    """``check`` of ``cfg`` over the checkpoint at ``model_dir`` on ``gpus`` of ``device``'s kind
    (its total memory); the trainer's start-up check on CUDA."""
    from transformers import AutoConfig

    gib = torch.cuda.get_device_properties(device).total_memory / GIB
    return check(cfg, Shape.of(AutoConfig.from_pretrained(model_dir)), gpus, gib)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig

    parser = argparse.ArgumentParser(prog="visurf_engine.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--model-config", help="a config.json / checkpoint dir (default: model.path)")
    parser.add_argument("--preset", choices=("qwen2.5-vl-3b", "qwen2.5-vl-7b"),
                        help="the architecture of a built-in preset instead (no checkpoint needed)")
    parser.add_argument("--patches", type=int, default=1024, help="vision patches per image (14 px each side)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    preset = args.preset or (None if (args.model_config or cfg.model.path) else cfg.model.preset)
    if preset is None:
        source = args.model_config or cfg.model.path
        if not Path(source).exists():
            print(f"{source}: no such checkpoint here; give --model-config DIR or --preset NAME", file=sys.stderr)
            return 2
        hf_config = AutoConfig.from_pretrained(source)
    else:
        from .models.presets import real_shape_config
        from .models.tiny import train_tokenizer

        hf_config = real_shape_config(preset, train_tokenizer(["plan"]))
    shape = Shape.of(hf_config)
    cfg, reason = resolve(cfg, "cuda", shape.params)
    if reason:
        print(f"rollout.backend=auto planned as {cfg.rollout.backend} ({reason})", file=sys.stderr)
    p = plan(cfg, shape, gpus=args.gpus, gpu_gib=args.gpu_gib, patches_per_image=args.patches)
    if args.json:
        print(json.dumps({"shape": asdict(shape), "components": p.components, "peak": p.peak, "headroom": p.headroom,
                          "host": p.host}, indent=1))  # fmt: skip
    else:
        print(f"{cfg.model.backend} on {args.gpus} x {args.gpu_gib:.0f} GiB, {shape.params / 1e9:.2f} B parameters")
        print(p.table())
        if p.headroom < 0:
            found = fixes(cfg, shape, args.gpus, args.gpu_gib)
            print("does not fit" + (f"; it fits with: {found[0]}" if found else ""))
    return 0 if p.headroom >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
