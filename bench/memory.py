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
planned / measured must lie in [0.85, 1.15], or the two differ by less than ``--slack-gib``
(0.1 GiB: the allocator's arenas, thread pools and other runtime state the plan does not model,
which only a toy case such as ``tiny-hf-1`` is small enough to notice).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(Path(__file__).resolve().parent)]

from results_file import ResultsFile  # noqa: E402

from visurf_engine.provenance import device_name, result_path  # noqa: E402

@dataclass(frozen=True)
class Case:
    preset: str
    backend: str
    ranks: int
    dtype: str  # master and compute dtype on CPU; master on CUDA (compute: auto = bf16)
    checkpointing: bool
    device: str = "cpu"
    offload: bool = False
    layers: int | None = None  # None: --layers (CPU) / the architecture's own (CUDA)

    def overrides(self, max_tokens: int) -> list[str]:
        compute = self.dtype if self.device == "cpu" else "auto"
        return [f"model.backend={self.backend}", f"model.dtype={self.dtype}", f"model.compute_dtype={compute}",
                f"train.activation_checkpointing={str(self.checkpointing).lower()}", "algo.kl_coef=0",
                f"fsdp.offload={str(self.offload).lower()}", f"train.max_tokens_per_micro_batch={max_tokens}",
                "train.progress=false"]  # fmt: skip


CASES = {
    # CPU, real widths, --layers decoder layers and --blocks vision blocks (7B in fp32 needs > 24 GiB here)
    "3b-hf-1": Case("qwen2.5-vl-3b", "hf", 1, "float32", False),
    "3b-hf-1-ac": Case("qwen2.5-vl-3b", "hf", 1, "float32", True),
    "3b-fsdp-2": Case("qwen2.5-vl-3b", "fsdp", 2, "float32", False),
    "3b-fsdp-2-ac": Case("qwen2.5-vl-3b", "fsdp", 2, "float32", True),
    "7b-hf-1-bf16": Case("qwen2.5-vl-7b", "hf", 1, "bfloat16", True),
    # CUDA (bench/gpu.sh): whole architectures on one GPU; 7B offloaded with half its layers (host memory)
    "3b-fsdp-1-gpu": Case("qwen2.5-vl-3b", "fsdp", 1, "float32", False, device="cuda"),
    "3b-fsdp-1-ac-gpu": Case("qwen2.5-vl-3b", "fsdp", 1, "float32", True, device="cuda"),
    "7b-fsdp-1-offload-gpu": Case("qwen2.5-vl-7b", "fsdp", 1, "float32", True, device="cuda", offload=True, layers=14),
    # the smoke case of bench/gpu.sh --dry-run (the tiny preset: seconds)
    "tiny-hf-1": Case("tiny", "hf", 1, "float32", False),
}


def rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes (``/proc/self/status``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def case_config(case: Case, max_tokens: int):
    from visurf_engine.config import load_config

    return load_config(None, case.overrides(max_tokens))


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
                            torch.randn(n_prompts), gold_objective=0).select(range(plan_work.sequences))  # fmt: skip
    weights = sequence_weights(members.lengths, "token-mean", num_seqs=len(members), num_tokens=int(members.lengths.sum()),
                               max_len=c)  # fmt: skip
    batching = Batching(max_tokens=1 << 30)  # the whole workload is one micro-batch
    x = make_micro_batch(policy, prompts, members, weights, batching)
    work = Workload(tokens=x.batch.input_ids.numel(), patches=int(x.batch.image_grid_thw.prod(dim=1).sum()),
                    completion_tokens=x.batch.targets.numel(), sequences=len(members))  # fmt: skip
    return x, work


def measure(rank: int, world: int, port: int, name: str, path: str, args: dict, out: str) -> None:
    """One rank of a case: reset the peak, build the learner, two steps; writes its numbers
    (CPU: resident set size; CUDA: the allocator's peak of allocated bytes; and the step times)."""
    import time

    import torch.distributed as dist

    from visurf_engine.learners import build_learner
    from visurf_engine.models.hf import load_processor, model_class
    from visurf_engine.models.policy import Policy
    from visurf_engine.models.precision import Precision
    from visurf_engine.parallel.world import World, backend_for

    torch.set_num_threads(1)
    case = CASES[name]
    device = torch.device("cuda", rank) if case.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend_for(device), rank=rank, world_size=world)
    cfg = case_config(case, args["max_tokens"])
    processor = load_processor(path)
    precision = Precision.of(cfg.model.dtype, cfg.model.compute_dtype, device)
    config = model_class(path).config_class.from_pretrained(path)
    with torch.device("meta"):
        shell = model_class(path)._from_config(config)  # collation needs get_rope_index only
    x, work = micro_batch(Policy(shell, processor, device), cfg, args["image"], seed=rank)
    before, _ = rss()
    reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    learner = build_learner(cfg, path, processor, precision, cfg.loss_spec().replace(backend="auto"),
                            World(rank=rank, size=world, device=device))  # fmt: skip
    loaded = torch.cuda.memory_allocated() if device.type == "cuda" else rss()[0]
    learner.policy.model.train()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        learner.forward_backward([x])
        learner.step(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss()[1]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"before": before, "loaded": loaded, "peak": peak,
                                                         "step_s": times, "work": asdict(work)}))  # fmt: skip
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

    case = CASES[name]
    gpu = case.device == "cuda"
    layers, blocks = (case.layers, None) if gpu else (case.layers or args.layers, args.blocks)
    if case.preset == "tiny":
        layers = blocks = None
    dtype = "bfloat16" if gpu else case.dtype  # the checkpoint's dtype (a real one's)
    path = tmp / f"{case.preset}-{dtype}-{layers}-{blocks}"
    if not path.exists():
        tokenizer = train_tokenizer(["Find the red circle and answer with its bbox_2d."] * 8)
        save_random_checkpoint(case.preset, path, tokenizer, pixels=args.image**2, dtype=getattr(torch, dtype),
                               device="cuda" if gpu else "cpu", layers=layers, blocks=blocks)  # fmt: skip
    out = tmp / name
    out.mkdir()
    settings = {"max_tokens": args.max_tokens, "image": args.image}
    mp.start_processes(measure, args=(case.ranks, free_port(), name, str(path), settings, str(out)),
                       nprocs=case.ranks, start_method="spawn")  # fmt: skip
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(case.ranks)]
    shape = Shape.of(model_class(path).config_class.from_pretrained(path))
    work = Workload(**per_rank[0]["work"])
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else None
    p = plan(case_config(case, args.max_tokens), shape, gpus=case.ranks, gpu_gib=gib, device=case.device, work=work,
             accumulating=False)  # one micro-batch a step  # fmt: skip
    measured, planned = max(r["peak"] - r["before"] for r in per_rank), p.learner_peak  # no rollout engine runs here
    return {"case": name, **asdict(case), "layers": layers, "blocks": blocks, "image": args.image,
            "max_tokens": args.max_tokens, "workload": asdict(work), "planned": planned, "measured": measured,
            "ratio": planned / measured, "components": p.components, "host": p.host,
            "weights_measured": max(r["loaded"] - r["before"] for r in per_rank),
            "step_s": [r["step_s"] for r in per_rank], "per_rank": per_rank}  # fmt: skip


def saved_per_unit(preset: str, compute: str, tokens: int = 300, image: int = 224) -> dict[str, float]:
    """Bytes the backward keeps per token of one decoder layer and per patch of one vision block
    (``saved_tensors_hooks``, parameters and T-independent tensors such as autocast's weight
    copies excluded by differencing two sequence lengths / image sizes)."""
    import numpy as np
    from PIL import Image

    from visurf_engine.models import attention
    from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
    from visurf_engine.models.policy import Batching, Policy
    from visurf_engine.models.precision import Precision
    from visurf_engine.models.presets import real_shape_config
    from visurf_engine.models.tiny import train_tokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = train_tokenizer(["Find the red circle."] * 4)
    model = Qwen2_5_VLForConditionalGeneration._from_config(real_shape_config(preset, tok, layers=1, blocks=1),
                                                           attn_implementation=attention.NAME)  # fmt: skip
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}

    def saved(n_tokens: int, px: int) -> dict[str, int]:
        proc = ImageOnlyProcessor(image_processor_for(px * px), tok, chat_template=tok.chat_template)
        policy = Policy(model, proc, precision=Precision.of("float32", compute, torch.device("cpu")))
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (px, px, 3), dtype=np.uint8))
        prompts = policy.encode(["Find the red circle."], [img])
        batch = policy.collate(prompts, [0], [list(range(20, 20 + n_tokens))], Batching())
        where, seen = ["root"], {"layer": {}, "block": {}, "root": {}}
        hooks = [m.register_forward_pre_hook(lambda m, *a, k=k: where.append(k)) for k, m in
                 (("layer", model.model.language_model.layers[0]), ("block", model.model.visual.blocks[0]))]
        hooks += [m.register_forward_hook(lambda *a: where.pop() and None) for m in
                  (model.model.language_model.layers[0], model.model.visual.blocks[0])]

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[where[-1]][st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), policy.autocast():
            policy.head_inputs(batch)
        for h in hooks:
            h.remove()
        return {k: sum(v.values()) for k, v in seen.items()} | {"tokens": batch.input_ids.numel(),
                                                              "patches": int(batch.image_grid_thw.prod())}  # fmt: skip

    a, b, c = saved(tokens, image), saved(2 * tokens, image), saved(tokens, 2 * image)
    return {"layer_per_token": (b["layer"] - a["layer"]) / (b["tokens"] - a["tokens"]),
            "block_per_patch": (c["block"] - a["block"]) / (c["patches"] - a["patches"])}  # fmt: skip


def print_saved() -> None:
    """``--saved``: the measured coefficients beside the plan's formulas, for both presets and dtypes."""
    from visurf_engine.models.presets import real_shape_config
    from visurf_engine.models.tiny import train_tokenizer
    from visurf_engine.plan import Shape, Workload, activation_bytes

    print(f"{'preset':14s} {'compute':9s} {'layer B/token':>14s} {'plan':>9s} {'block B/patch':>14s} {'plan':>9s}")
    for preset in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        shape = Shape.of(real_shape_config(preset, train_tokenizer(["x"]), layers=1, blocks=1))
        for compute, b in (("float32", 4), ("bfloat16", 2)):
            got = saved_per_unit(preset, compute)
            one = lambda t, p: activation_bytes(shape, Workload(t, p, 0, 1), b, False)  # noqa: E731
            print(f"{preset:14s} {compute:9s} {got['layer_per_token']:14.0f} {one(1, 0) - 4 * 2 * shape.hidden:9.0f} "
                  f"{got['block_per_patch']:14.0f} {one(0, 1) - 4 * (shape.patch_dim + 5 * shape.vis_hidden):9.0f}")


def replan(path: Path) -> list[dict]:
    """Recompute ``planned`` and ``ratio`` of a results file's cases from their recorded components
    (the measurements untouched) with today's ``plan.learner_sets``, and record that in the file."""
    from visurf_engine.plan import Plan, learner_sets
    from visurf_engine.provenance import provenance

    data = json.loads(path.read_text())
    for row in data["cases"]:
        sets = learner_sets(False, backend=row["backend"], gpus=row["ranks"])  # one micro-batch a step
        row["planned"] = Plan(row["components"], *sets).learner_peak
        row["ratio"] = row["planned"] / row["measured"]
    data.setdefault("replanned", []).append(provenance())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return data["cases"]


def within_plan(row: dict, slack_gib: float) -> bool:
    """Whether a case's plan holds: planned / measured in [0.85, 1.15], or |planned - measured| < slack."""
    return 0.85 <= row["ratio"] <= 1.15 or abs(row["planned"] - row["measured"]) < slack_gib * 2**30


def verdict(rows: list[dict], slack_gib: float) -> int:
    """Print whether every case's plan holds (``within_plan``); the exit code: 1 if one does not."""
    bad = [r["case"] for r in rows if not within_plan(r, slack_gib)]
    print(f"planned within 15% (or {slack_gib} GiB) of measured" if not bad else f"outside 15% and {slack_gib} GiB: {bad}")
    return 0 if not bad else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--image", type=int, default=448, help="pixels a side (1024 patches at 448)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="train.max_tokens_per_micro_batch of the workload")
    parser.add_argument("--slack-gib", type=float, default=0.1,
                        help="a case passes when planned/measured is in [0.85, 1.15] or they differ by less than this")
    parser.add_argument("--out")
    parser.add_argument("--saved", action="store_true", help="print the measured activation coefficients instead")
    parser.add_argument("--replan", metavar="RESULTS", help="measure nothing: recompute the plan of a results file's cases")
    args = parser.parse_args(argv)
    if args.saved:
        print_saved()
        return 0
    if args.replan:
        rows = replan(Path(args.replan))
        for row in rows:
            print(f"{row['case']:22s} {row['planned'] / 2**30:12.2f} {row['measured'] / 2**30:13.2f} {row['ratio']:6.3f}")
        return verdict(rows, args.slack_gib)
    names = args.cases.split(",")
    if bad := [n for n in names if n not in CASES]:
        parser.error(f"unknown cases {bad}; choose of {sorted(CASES)}")
    if any(CASES[n].device == "cuda" for n in names) and not torch.cuda.is_available():
        parser.error("the *-gpu cases need a CUDA device")
    results = ResultsFile(Path(args.out) if args.out else result_path("memory", device_name()))
    rows: list[dict] = []
    print(f"{'case':22s} {'planned GiB':>12s} {'measured GiB':>13s} {'ratio':>6s} {'step s':>7s}")
    with tempfile.TemporaryDirectory(prefix="visurf-memory-") as tmp:
        for name in names:
            row = run_case(name, args, Path(tmp))
            rows.append(row)
            results.write({"cases": rows}, complete=name == names[-1])
            print(f"{name:22s} {row['planned'] / 2**30:12.2f} {row['measured'] / 2**30:13.2f} {row['ratio']:6.3f} "
                  f"{max(r[-1] for r in row['step_s']):7.2f}")
    return verdict(rows, args.slack_gib)


if __name__ == "__main__":
    sys.exit(main())
