"""Benchmark of the update phase: padded rows vs packed sequences vs packed + vision once (+ shared prompts).

One ViSurf update (``HFLearner.forward_backward`` over the step's micro-batches, then
``step``) on B prompts x (G rollouts + the gold), with a realistic spread of completion
lengths (40% short direct answers, 60% reasoning traces up to the budget; the gold short),
each prompt one image. Four layouts of the same members, each in a fresh process (so its
peak memory is its own), measured side by side in one run:

  padded          right-padded rows, ``train.micro_batch_size`` sequences each, the vision
                  tower on every member's copy of its prompt image (the old path)
  packed          one packed row per micro-batch (``train.max_tokens_per_micro_batch``),
                  attention within each sequence; the vision tower still per member
  packed+vision   packed, and each prompt image through the vision tower once per forward
  packed+vision+shared  the trainer's default: packed+vision with each group's prompt once in
                  the row (``train.share_prompts``; a group of at most
                  ``collate.ONE_CALL_GROUP_TOKENS`` tokens attends in one masked call)

Reports the median seconds per update and the peak memory (CUDA: allocator peak; CPU: the
process's peak RSS above what it held before the first update), and each layout's ratio to
``padded``. CPU: the tiny preset's architecture (random init) with 336x336 images (144 image
tokens a prompt); GPU: random-init Qwen2.5-VL-3B (``models.presets``), bf16, 840x840 images
(900 image tokens). Target on GPU: packed+vision at G = 8 <= 1/2 of padded.

    python bench/update.py [--quick] [--groups 4 8] [--prompts 8] [--preset tiny|qwen2.5-vl-3b]

A layout that fails (out of memory, say) is recorded with its error (``"error": "OutOfMemoryError:
..."``) and the others still run. JSON (provenance and every measurement) under
``bench/results/update-<device>-<date>.json``, rewritten after every layout (``complete: false``
until the last; ``results_file``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_file import ResultsFile, error_line
from visurf_kernels import LossSpec

from visurf_engine.algo.members import build_members, sequence_weights
from visurf_engine.learners.base import make_micro_batch
from visurf_engine.learners.hf import HFLearner
from visurf_engine.models import attention
from visurf_engine.models.collate import Batching
from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
from visurf_engine.models.policy import Policy
from visurf_engine.models.presets import real_shape_config
from visurf_engine.models.tiny import SPECIAL_TOKENS, tiny_config, train_tokenizer
from visurf_engine.parallel.world import World
from visurf_engine.provenance import device_name

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = {
    "padded": Batching(pack=False, vision_once=False, max_seqs=16),
    "packed": Batching(pack=True, vision_once=False, max_tokens=8192),
    "packed+vision": Batching(pack=True, vision_once=True, max_tokens=8192),
    "packed+vision+shared": Batching(pack=True, vision_once=True, max_tokens=8192, share_prompts=True),
}


def completion_lengths(rng: np.random.Generator, g: int, budget: int) -> list[int]:
    """G rollout lengths (40% short direct answers, 60% reasoning up to the budget) and a short gold."""
    short = rng.integers(max(4, budget // 6), max(5, budget // 3), g)
    long = rng.integers(budget // 2, budget + 1, g)
    return [int(s if u < 0.4 else t) for s, t, u in zip(short, long, rng.random(g))] + [int(rng.integers(4, max(5, budget // 4)))]


def worker(layout: str, g: int, args) -> dict:
    """One layout's measurement in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokenizer = train_tokenizer(["Find the red circle. Think in <think></think>, then answer its bbox_2d."] * 4)
    config = tiny_config(tokenizer) if args.preset == "tiny" else real_shape_config(args.preset, tokenizer)
    from transformers import Qwen2_5_VLForConditionalGeneration

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:  # initialised where it runs: a 3B model in seconds on a GPU
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attention.NAME, dtype=dtype)
    processor = ImageOnlyProcessor(image_processor_for(args.image * args.image), tokenizer, chat_template=tokenizer.chat_template)
    policy = Policy(model, processor, device)
    images = [Image.fromarray(rng.integers(0, 256, (args.image, args.image, 3), dtype=np.uint8)) for _ in range(args.prompts)]
    prompts = policy.encode(["Find the red circle. Think in <think></think>, then answer its bbox_2d in <answer></answer>."]
                            * args.prompts, images)  # fmt: skip
    vocab = len(tokenizer)
    lengths = [completion_lengths(rng, g, args.budget) for _ in range(args.prompts)]
    tokens = [[rng.integers(len(SPECIAL_TOKENS), vocab, n).tolist() for n in group] for group in lengths]  # no vision ids
    members = build_members([t[:-1] for t in tokens], torch.randn(args.prompts, g), [t[-1] for t in tokens],
                            torch.randn(args.prompts), gold_objective=0)  # fmt: skip
    weights = sequence_weights(members.lengths, "token-mean", num_seqs=len(members),
                               num_tokens=int(members.lengths.sum()), max_len=args.budget)  # fmt: skip
    batching = LAYOUTS[layout]
    seq_tokens = (members.lengths + torch.tensor([len(prompts.input_ids[p]) for p in members.prompt.tolist()])).tolist()
    micro = [make_micro_batch(policy, prompts, members.select(r), weights[r.start : r.stop], batching)
             for r in batching.split(seq_tokens)]  # fmt: skip
    learner = HFLearner(policy, LossSpec(with_entropy=True), World(device=device), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for i in range(args.warmup + args.reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        learner.forward_backward(micro)
        learner.step(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated() - base_cuda) if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024)  # fmt: skip
    return {
        "layout": layout, "g": g, "s_per_update": statistics.median(times), "times": times, "peak_bytes": peak,
        "micro_batches": len(micro), "sequences": len(members), "completion_tokens": int(members.lengths.sum()),
        "tokens": int(sum(seq_tokens)), "padded_tokens": sum(x.batch.input_ids.numel() for x in micro),
        "vision_images": sum(int(x.batch.image_grid_thw.shape[0]) for x in micro),
    }  # fmt: skip


def run_worker(cmd: list[str], layout: str, g: int) -> dict:
    """One layout's row from its worker process; a failed worker's row holds its ``error`` (the
    exception it reported, or how it died) and the end of its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    try:
        row = json.loads(last)
    except json.JSONDecodeError:
        died = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit code {out.returncode}"
        row = {"layout": layout, "g": g, "error": f"worker died ({died}) without a result"}
    if "error" in row:
        row["stderr_tail"] = out.stderr[-3000:]
        print(f"{layout} G={g} failed: {row['error']}", file=sys.stderr)
    return row


def with_ratios(rows: list[dict]) -> None:
    """Each measured row's time and peak memory over its G's ``padded`` row (None while that row
    is missing or failed)."""
    for r in rows:
        if "error" in r:
            continue
        ref = next((x for x in rows if x["g"] == r["g"] and x["layout"] == "padded" and "error" not in x), None)
        r["time_vs_padded"] = r["s_per_update"] / ref["s_per_update"] if ref else None
        r["peak_vs_padded"] = r["peak_bytes"] / ref["peak_bytes"] if ref and ref["peak_bytes"] else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="tiny (CPU default) | qwen2.5-vl-3b (GPU default) | qwen2.5-vl-7b")
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="G values")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--image", type=int, default=None, help="image side in pixels (CPU 336, GPU 840)")
    ap.add_argument("--budget", type=int, default=None, help="completion budget in tokens (CPU 48, GPU 256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, G 2, 1 rep, 112 px (not for the record)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--g", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.preset = args.preset or ("qwen2.5-vl-3b" if gpu else "tiny")
    args.image = args.image or (840 if gpu else 336)
    args.budget = args.budget or (256 if gpu else 48)
    if args.quick:
        args.prompts, args.groups, args.reps, args.warmup, args.image = 2, [2], 1, 0, 112
    if args.worker:
        try:
            print(json.dumps(worker(args.worker, args.g, args)))
        except Exception as e:  # the parent records it; the traceback goes to stderr
            traceback.print_exc()
            print(json.dumps({"layout": args.worker, "g": args.g, "error": error_line(e)}))
            return 1
        return 0
    stamp = dt.datetime.now(dt.timezone.utc)
    tag = ("gpu" if gpu else "cpu") + ("-quick" if args.quick else "")
    out = ResultsFile(args.out or RESULTS / f"update-{tag}-{stamp:%Y%m%d-%H%M%S}.json")
    rows = []

    def write(complete: bool) -> Path:
        return out.write({"bench": "update", "preset": args.preset, "prompts": args.prompts, "image": args.image,
                          "budget": args.budget, "reps": args.reps, "results": rows}, complete)  # fmt: skip

    passthrough = ["--preset", args.preset, "--prompts", str(args.prompts), "--image", str(args.image),
                   "--budget", str(args.budget), "--reps", str(args.reps), "--warmup", str(args.warmup)]  # fmt: skip
    for g in args.groups:
        for layout in LAYOUTS:
            cmd = [sys.executable, __file__, "--worker", layout, "--g", str(g), *passthrough]
            rows.append(run_worker(cmd, layout, g))
            with_ratios(rows)
            write(complete=False)
    print(f"\n{device_name()}; preset {args.preset}, {args.prompts} prompts x (G + gold), {args.image}px images, "
          f"completion budget {args.budget}; median of {args.reps}")  # fmt: skip
    print(f"{'G':>3s} {'layout':20s} {'s/update':>9s} {'x padded':>9s} {'peak MB':>8s} {'x padded':>9s} "
          f"{'micro':>5s} {'row tokens':>10s} {'vision imgs':>11s}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['g']:3d} {r['layout']:20s} failed: {r['error']}")
            continue
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{r['g']:3d} {r['layout']:20s} {r['s_per_update']:9.3f} {ratio(r['time_vs_padded']):>9s} "
              f"{r['peak_bytes'] / 2**20:8.0f} {ratio(r['peak_vs_padded']):>9s} {r['micro_batches']:5d} "
              f"{r['padded_tokens']:10d} {r['vision_images']:11d}")  # fmt: skip
    print(f"\nwrote {write(complete=True)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
