"""Benchmark of the Qwen2-VL image pipeline: native (``csrc/``) vs Hugging Face's PIL processor.

Both take the same batch of PIL images (random RGB, fixed seed) to ``pixel_values`` and
``image_grid_thw`` (``processor(images, return_tensors="pt")``, default pixel budget: 840x840
keeps its size, 3,600 patches; 1280x960 and 2048x1536 are resized to 1148x840, 4,920 patches),
at 840x840, 1280x960 and 2048x1536, on 1 and 2 threads (``torch.set_num_threads``: the native
pipeline's OpenMP threads; HF's processor is single-threaded whatever the setting, measured at
both anyway). Each measurement is the median over ``--reps`` calls of the whole batch, reported
as ms per image and images per second; the outputs are checked equal first.

Targets: native >= 4x HF on one thread at 1280x960; native scaling linear in threads.

Prints a table and writes JSON (device, versions, compiler, git commit, date, command, every
measurement) to ``bench/results/image_pipeline-<host>-<date>.json``. Run on a quiet machine:
    OMP_NUM_THREADS=2 python3 bench/image_pipeline.py            (--quick: a smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visurf_engine.models import image_processor as ip
from visurf_engine.provenance import cpu_model, result_path, write_result

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(840, 840), (1280, 960), (2048, 1536)]  # (width, height)


def _time(processor, images: list[Image.Image], threads: int, reps: int) -> float:
    """Median seconds per call over ``reps`` calls (after one warm-up), on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        processor(images, return_tensors="pt")
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            processor(images, return_tensors="pt")
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="images per processor call")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 reps (figures not for the record)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/image_pipeline-<host>-<date>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.reps = 2, 2
    if ip._native is None:
        print(f"the native pipeline is not built ({ip._NATIVE_ERROR}): pip install -e . with a C++17 compiler")
        return 1

    hf, native = Qwen2VLImageProcessorPil(), ip.NativeQwen2VLImageProcessor()
    rng = np.random.default_rng(0)
    rows = []
    for w, h in SIZES:
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.batch)]
        ours, ref = native(images, return_tensors="pt"), hf(images, return_tensors="pt")
        assert torch.equal(ours["pixel_values"], ref["pixel_values"]) and torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
        patches = int(ref["image_grid_thw"][0].prod())
        for threads in args.threads:
            row = {"size": f"{w}x{h}", "patches_per_image": patches, "threads": threads, "batch": args.batch}
            for name, processor in (("hf", hf), ("native", native)):
                ms = 1e3 * _time(processor, images, threads, args.reps) / args.batch
                row[f"{name}_ms_per_image"], row[f"{name}_images_per_s"] = ms, 1e3 / ms
            row["speedup"] = row["hf_ms_per_image"] / row["native_ms_per_image"]
            rows.append(row)
    for row in rows:
        one = next(r for r in rows if r["size"] == row["size"] and r["threads"] == args.threads[0])
        row["native_scaling"] = one["native_ms_per_image"] / row["native_ms_per_image"]

    print(f"\n{cpu_model()}; batch {args.batch}, median of {args.reps}; HF's processor is single-threaded")
    print(f"{'size':>10s} {'thr':>3s} {'HF ms/img':>10s} {'HF img/s':>9s} {'native ms/img':>14s} {'native img/s':>13s} "
          f"{'speedup':>8s} {'scaling':>8s}")  # fmt: skip
    for r in rows:
        print(f"{r['size']:>10s} {r['threads']:3d} {r['hf_ms_per_image']:10.2f} {r['hf_images_per_s']:9.1f} "
              f"{r['native_ms_per_image']:14.2f} {r['native_images_per_s']:13.1f} {r['speedup']:7.2f}x "
              f"{r['native_scaling']:7.2f}x")  # fmt: skip

    out = args.out or result_path("image_pipeline", "cpu-quick" if args.quick else "cpu")
    payload = {
        "bench": "image_pipeline",
        "native_build": {"compiler": ip._native.compiler, "openmp": ip._native.openmp},
        "mode": "quick" if args.quick else "full",
        "results": rows,
    }
    out = write_result(out, payload)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
