"""The memory plan against measurement: ``python bench/memory.py [--cases ...] [--out F]``.

Each *case* (an architecture at its real widths with few layers, a backend, a rank count, a
precision, activation checkpointing on or off) builds a random-init checkpoint of that
architecture with ``--layers`` decoder layers and ``--blocks`` vision blocks (the real hidden
sizes, heads, vocabulary and vision width), then runs, in fresh processes (one per rank, gloo),
the learner the trainer would build (``learners.build_learner``) on one micro-batch of the
plan's workload (``plan.workload``: ``G + 1`` members per prompt, images of ``--image`` pixels a
side, completions of ``rollout.max_new_tokens``) for two optimizer steps. Measured: the peak
resident set size of the process (VmHWM, reset through ``/proc/self/clear_refs`` after the
imports and the batch are ready) minus the resident size at that moment, per rank; planned:
``visurf_engine.plan.plan`` for the same config, workload and rank count on CPU (the weights,
gradients, optimizer, gathered units, loss and activations: everything a step adds). The ratio
planned / measured must lie in [0.85, 1.15].

With ``--saved`` it prints instead what the backward keeps of one decoder layer and one vision
block, per token / patch, in fp32 and under bf16 autocast (``saved_tensors_hooks``, parameters
excluded): where the plan's activation coefficients come from.

Results: ``bench/results/memory-cpu-<date>.json`` (``provenance``, every case's components and
ratio), written after each case.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

from results_file import ResultsFile  # noqa: E402

from visurf_engine.provenance import device_name, result_path  # noqa: E402

CASES = {  # name: (preset, backend, ranks, master/compute dtype, activation checkpointing)
    "3b-hf-1": ("qwen2.5-vl-3b", "hf", 1, "float32", False),
    "3b-hf-1-ac": ("qwen2.5-vl-3b", "hf", 1, "float32", True),
    "3b-fsdp-2": ("qwen2.5-vl-3b", "fsdp", 2, "float32", False),
    "3b-fsdp-2-ac": ("qwen2.5-vl-3b", "fsdp", 2, "float32", True),
    "7b-hf-1-bf16": ("qwen2.5-vl-7b", "hf", 1, "bfloat16", True),  # fp32 at 7B widths needs > 24 GiB here
}


def rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes (``/proc/self/status``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def case_config(preset, backend, dtype, checkpointing, extra=()):
    from visurf_engine.config import load_config

    return load_config(None, [f"model.backend={backend}", f"model.dtype={dtype}", f"model.compute_dtype={dtype}",
                              f"train.activation_checkpointing={str(checkpointing).lower()}", "algo.kl_coef=0",
                              "loss.backend=torch", "train.progress=false", *extra])  # fmt: skip


def micro_batch(policy, cfg, image: int, seed: int):
    """One micro-batch of the plan's workload: prompts of one random image each, ``G + 1``
    members a prompt with completions of ``rollout.max_new_tokens`` random tokens."""
    import numpy as np
    from PIL import Image

    from visurf_engine.algo.members import build_members, sequence_weights
    from visurf_engine.learners import make_micro_batch
    from visurf_engine.models.policy import Batching
    from visurf_engine.plan import Workload, workload

    rng = np.random.default_rng(seed)
    patches = (image // 14) ** 2
    plan_work = workload(cfg, patches)
    g, c = cfg.rollout.n, cfg.rollout.max_new_tokens
    n_prompts = -(-plan_work.sequences // (g + 1))
    images = [Image.fromarray(rng.integers(0, 256, (image, image, 3), dtype=np.uint8)) for _ in range(n_prompts)]
    prompts = policy.encode(["Find the red circle and answer with its bbox_2d."] * n_prompts, images)
    vocab = len(policy.tokenizer)
    tokens = [[rng.integers(10, vocab, c).tolist() for _ in range(g)] for _ in range(n_prompts)]
    members = build_members(tokens, torch.randn(n_prompts, g), [rng.integers(10, vocab, c).tolist()] * n_prompts,
                            torch.randn(n_prompts), gold_logprob_loss=False).select(range(plan_work.sequences))  # fmt: skip
    weights = sequence_weights(members.lengths, "token-mean", num_seqs=len(members), num_tokens=int(members.lengths.sum()),
                               max_len=c)  # fmt: skip
    batching = Batching(max_tokens=1 << 30)  # the whole workload is one micro-batch
    x = make_micro_batch(policy, prompts, members, weights, batching)
    work = Workload(tokens=x.batch.input_ids.numel(), patches=int(x.batch.image_grid_thw.prod(dim=1).sum()),
                    completion_tokens=x.batch.targets.numel(), sequences=len(members))  # fmt: skip
    return x, work


def measure(rank: int, world: int, port: int, name: str, path: str, image: int, out: str) -> None:
    """One rank of a case: reset the peak, build the learner, two steps; writes its numbers."""
    import torch.distributed as dist

    from visurf_engine.learners import build_learner
    from visurf_engine.models.hf import load_processor
    from visurf_engine.models.policy import Policy
    from visurf_engine.models.precision import Precision
    from visurf_engine.parallel.world import World

    torch.set_num_threads(1)
    preset, backend, ranks, dtype, checkpointing = CASES[name]
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = case_config(preset, backend, dtype, checkpointing)
    processor = load_processor(path)
    precision = Precision.of(cfg.model.dtype, cfg.model.compute_dtype, torch.device("cpu"))
    from visurf_engine.models.hf import model_class

    config = model_class(path).config_class.from_pretrained(path)
    with torch.device("meta"):
        shell = model_class(path)._from_config(config)  # collation needs get_rope_index only
    x, work = micro_batch(Policy(shell, processor), cfg, image, seed=rank)
    before, _ = rss()
    reset_peak()
    learner = build_learner(cfg, path, processor, precision, cfg.loss_spec().replace(backend="torch"),
                            World(rank=rank, size=world))  # fmt: skip
    loaded, _ = rss()
    learner.policy.model.train()
    for _ in range(2):
        learner.forward_backward([x])
        learner.step(1.0)
    _, peak = rss()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"before": before, "loaded": loaded, "peak": peak,
                                                         "work": asdict(work)}))  # fmt: skip
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(name: str, args, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    from visurf_engine.models.hf import model_class
    from visurf_engine.models.presets import save_random_checkpoint
    from visurf_engine.models.tiny import train_tokenizer
    from visurf_engine.plan import Shape, Workload, plan

    preset, backend, ranks, dtype, checkpointing = CASES[name]
    path = tmp / f"{preset}-{dtype}"
    if not path.exists():
        tokenizer = train_tokenizer(["Find the red circle and answer with its bbox_2d."] * 8)
        save_random_checkpoint(preset, path, tokenizer, pixels=args.image**2, dtype=getattr(torch, dtype),
                               layers=args.layers, blocks=args.blocks)  # fmt: skip
    out = tmp / name
    out.mkdir()
    mp.start_processes(measure, args=(ranks, free_port(), name, str(path), args.image, str(out)), nprocs=ranks,
                       start_method="spawn")  # fmt: skip
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    shape = Shape.of(model_class(path).config_class.from_pretrained(path))
    work = Workload(**per_rank[0]["work"])
    p = plan(case_config(preset, backend, dtype, checkpointing), shape, gpus=ranks, device="cpu", work=work)
    measured = max(r["peak"] - r["before"] for r in per_rank)
    return {"case": name, "preset": preset, "backend": backend, "ranks": ranks, "dtype": dtype,
            "activation_checkpointing": checkpointing, "layers": args.layers, "blocks": args.blocks, "image": args.image,
            "workload": asdict(work), "planned": p.peak, "measured": measured, "ratio": p.peak / measured,
            "components": p.components, "weights_measured": max(r["loaded"] - r["before"] for r in per_rank),
            "per_rank": per_rank}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--image", type=int, default=448, help="pixels a side (1024 patches at 448)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    if bad := [n for n in names if n not in CASES]:
        parser.error(f"unknown cases {bad}; choose of {sorted(CASES)}")
    results = ResultsFile(Path(args.out) if args.out else result_path("memory", device_name()))
    rows: list[dict] = []
    print(f"{'case':16s} {'planned GiB':>12s} {'measured GiB':>13s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory(prefix="visurf-memory-") as tmp:
        for name in names:
            row = run_case(name, args, Path(tmp))
            rows.append(row)
            results.write({"cases": rows}, complete=name == names[-1])
            print(f"{name:16s} {row['planned'] / 2**30:12.2f} {row['measured'] / 2**30:13.2f} {row['ratio']:6.3f}")
    bad = [r["case"] for r in rows if not 0.85 <= r["ratio"] <= 1.15]
    print("planned within 15% of measured" if not bad else f"outside 15%: {bad}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
