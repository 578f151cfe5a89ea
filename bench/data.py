"""Benchmark of the data loader at scale: start-up time and memory on a synthetic parquet of
640x480 JPEGs, at 10k and 100k rows (the size of gRefCOCO / VisionReasoner training sets).

For each size N a parquet file is written (row groups of 100 rows, as Hugging Face datasets
writes image data; JPEG quality 90 of smooth random scenes, ~60 KiB each, 256 distinct images
cycled; a grounding problem and a JSON solution per row). Then, in a fresh process per size
(so one size's peak does not carry into the next), ``tasks.load_task`` loads it as
``data.task=files`` with ``data.eval_split=0.01`` and ``data.eval_size=200`` (every row
validated by fields, parsed solution and image header; the 200 evaluation images decoded
once), and the first training batch of 8 prompts is drawn and decoded (``fetch_rows``).

Reported per size: start-up (load_task) and first-batch seconds, rows/s of the scan, RSS
before loading (imports), after start-up and at peak (``ru_maxrss``), and the growth of peak
RSS from the smallest to the largest size. Targets: start-up < 60 s at 100k rows, peak RSS
< 2 GB and independent of N. The file is read just after being written (warm page cache);
the page cache is the kernel's, not the process's RSS.

    OMP_NUM_THREADS=1 python3 bench/data.py [--sizes 10000 100000] [--dir /tmp/visurf-bench-data] [--keep]
Writes JSON (provenance, every measurement) to ``bench/results/data-<host>-<date>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, DISTINCT, GROUP = 640, 480, 256, 100


def _jpeg(rng: np.random.Generator) -> bytes:
    """A smooth random scene (upsampled 20x15 noise plus fine noise), JPEG quality 90."""
    coarse = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-6, 7, (HEIGHT, WIDTH, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_parquet(path: Path, n: int) -> dict:
    """``n`` rows in groups of ``GROUP``, streamed (one group in memory); the file's figures."""
    rng = np.random.default_rng(0)
    images = [_jpeg(rng) for _ in range(DISTINCT)]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("problem", pa.string()), ("solution", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, GROUP):
            ids = range(start, min(start + GROUP, n))
            boxes = [[int(v) for v in sorted(rng.integers(0, WIDTH, 2))] + [int(v) for v in sorted(rng.integers(0, HEIGHT, 2))]
                     for _ in ids]  # fmt: skip
            writer.write_table(pa.table({
                "id": [f"row-{i}" for i in ids],
                "image": [images[i % DISTINCT] for i in ids],
                "problem": [f"Please find the object number {i % 97} in the image and output its bounding box." for i in ids],
                "solution": [json.dumps([{"bbox_2d": [b[0], b[2], b[1], b[3]]}]) for b in boxes],
            }, schema=schema))  # fmt: skip
    return {"rows": n, "file_gib": path.stat().st_size / 2**30, "mean_image_kib": float(np.mean([len(b) for b in images])) / 1024}


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def measure(path: Path) -> dict:
    """In this (fresh) process: load_task on ``path`` and the first batch; times and RSS."""
    from visurf_engine.config import load_config
    from visurf_engine.data import PromptSampler, fetch_rows
    from visurf_engine.rewards import get_reward
    from visurf_engine.tasks import load_task

    cfg = load_config(None, ["data.task=files", f"data.train_path={path}", "data.eval_split=0.01", "data.eval_size=200"])
    spec = get_reward(cfg.data.reward)
    rss_imports = _rss_mib()
    t0 = time.perf_counter()
    task = load_task(cfg, spec)
    startup = time.perf_counter() - t0
    rss_loaded = _rss_mib()
    sampler = PromptSampler(len(task.train), 0)
    t0 = time.perf_counter()
    rows, bad = fetch_rows(task.train, sampler.next(8), "error", lambda slot, attempt: 0)
    first_batch = time.perf_counter() - t0
    assert len(rows) == 8 and not bad and rows[0].image.size == (WIDTH, HEIGHT)
    return {
        "train_rows": len(task.train), "eval_rows": len(task.eval), "startup_s": startup, "first_batch_s": first_batch,
        "rss_imports_mib": rss_imports, "rss_after_startup_mib": rss_loaded, "rss_after_batch_mib": _rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/visurf-bench-data"), help="where the parquet files go")
    ap.add_argument("--keep", action="store_true", help="keep the parquet files")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the fresh process of one size
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/data-<host>-<date>.json)")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0

    from visurf_engine.provenance import result_path, write_result

    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in args.sizes:
            path = args.dir / f"synthetic-{n}.parquet"
            t0 = time.perf_counter()
            row = write_parquet(path, n) | {"write_s": time.perf_counter() - t0}
            proc = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True, check=True)
            row |= json.loads(proc.stdout.strip().splitlines()[-1])
            row["scan_rows_per_s"] = n / row["startup_s"]
            results.append(row)
            print(f"{n:>7d} rows ({row['file_gib']:.2f} GiB): start-up {row['startup_s']:6.1f} s "
                  f"({row['scan_rows_per_s']:,.0f} rows/s), first batch {row['first_batch_s']:.2f} s; RSS imports "
                  f"{row['rss_imports_mib']:.0f} MiB, after start-up {row['rss_after_startup_mib']:.0f} MiB, "
                  f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    growth = results[-1]["peak_rss_mib"] - results[0]["peak_rss_mib"]
    print(f"peak RSS growth {results[0]['rows']} -> {results[-1]['rows']} rows: {growth:+.0f} MiB")
    out = args.out or result_path("data", "cpu")
    payload = {
        "bench": "data",
        "targets": {"startup_s_at_100k": 60, "peak_rss_mib": 2048, "rss": "independent of the row count"},
        "image": {"width": WIDTH, "height": HEIGHT, "format": "JPEG q90", "distinct": DISTINCT, "row_group_rows": GROUP},
        "peak_rss_growth_mib": growth,
        "results": results,
    }
    out = write_result(out, payload)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
