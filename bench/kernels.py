"""Benchmark of the fused LM-head policy loss: forward + backward time and peak memory.

Methods, all timed in the same run on the same inputs:
  triton  our Triton kernels              (``fused_policy_loss(backend="triton")``)
  torch   our chunked torch backend        (``backend="torch"``)
  eager   eager torch, materialised logits (``backend="reference"``: fp32 [N, V] logits)
  liger   Liger-Kernel ``LigerFusedLinearGRPOLoss``, same clip settings, no KL
          (skipped with the reason printed when liger_kernel is not installed)
  floor   the three bare GEMMs: Z = x W^T, dZ W, dZ^T x (Z reused as dZ)

Two input precisions, each row labelled with its own (``inputs``):
  bf16 inputs                  hidden and lm_head weight in bf16 (every method above)
  fp32 inputs (trainer today)  hidden and weight in fp32 under bf16 autocast, as the trainer
                               calls the loss on CUDA today (fp32 master weights; the final
                               norm's output is fp32): the triton backend runs its fp32
                               kernels, 3xTF32 (``tf32x3``). Ours and the floor only; the
                               floor's GEMMs run under the same autocast, i.e. in bf16, so
                               ``/floor`` is the cost over the bf16 GEMMs. On CPU the trainer
                               uses no autocast, and neither does this row.

GPU (default when CUDA is available): Qwen2.5-VL-7B (H 3584, V 152064) and 3B (H 2048,
V 151936) heads, N in {16384, 4096} (in that order: the target's row first). Targets (H100,
bf16 inputs): triton <= 1.25x floor at 7B N=16384; >= 1.5x faster than Liger at equal or
lower peak memory; peak memory above inputs + outputs + grads <= 10 % of the [N, V] logits
(column ``extra/logits``; our fp32 accumulator of d lm_weight counts as a gradient there,
see ``triton_policy_loss``).

CPU (``--quick``, automatic without CUDA): small shapes, torch / eager / floor only, so the
script always runs (< 1 minute); Triton's interpreter is no benchmark.

A method that fails on a row (out of memory, a kernel that cannot launch) is recorded with its
error and the others go on. Prints a table and writes JSON (device, versions, date, every
measurement) to ``bench/results/kernels-<device>-<date>.json`` after every measured row
(``complete: false`` until the last; ``results_file``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from pathlib import Path

import torch
from results_file import ResultsFile, error_line

from visurf_kernels import LossSpec, fused_logprobs, fused_policy_loss

from visurf_engine.provenance import device_name, result_path

GPU_SHAPES = {"qwen2.5-vl-7b": (3584, 152064), "qwen2.5-vl-3b": (2048, 151936)}
CPU_SHAPES = {"cpu-small": (256, 8192)}
EPS_LOW, EPS_HIGH = 0.2, 0.28
BF16, FP32 = "bf16 inputs", "fp32 inputs (trainer today)"


def make_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden, generator=g, device=device, dtype=torch.float32) * (3.0 / math.sqrt(hidden))).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    backend = "triton" if device.type == "cuda" else "torch"
    logp, _ = fused_logprobs(h, weight, targets, LossSpec(backend=backend))
    old_logp = logp + 0.2 * torch.randn(n, generator=g, device=device)  # ratios around 1, some clipped
    adv = torch.randn(n, generator=g, device=device)
    w = torch.full((n,), 1.0 / n, device=device)
    return {"hidden": h, "weight": weight, "targets": targets, "old_logp": old_logp, "adv": adv, "w": w}


def _ours(backend: str):
    def run(x: dict):
        spec = LossSpec(eps_low=EPS_LOW, eps_high=EPS_HIGH, backend=backend)
        loss, _ = fused_policy_loss(x["hidden"], x["weight"], x["targets"], x["old_logp"], x["adv"], x["w"], spec)
        loss.backward()

    return run


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        return None, f"liger_kernel not installed ({exc})"
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="bnpo")
    seq = 1024  # Liger takes [B, T, H] and per-sequence advantages

    def run(x: dict):
        n, hdim = x["hidden"].shape
        b = n // seq
        out = loss_fn(
            x["hidden"].view(b, seq, hdim),
            x["weight"],
            x["targets"].view(b, seq),
            torch.ones(b, seq, device=x["hidden"].device),
            x["adv"].view(b, seq)[:, 0].contiguous(),
            old_per_token_logps=x["old_logp"].view(b, seq),
        )
        (out[0] if isinstance(out, tuple) else out).backward()

    return run, None


def _floor(x: dict):
    with torch.no_grad():
        h, weight = x["hidden"], x["weight"]
        z = h @ weight.T
        z @ weight
        z.T @ h


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, x: dict, device: torch.device, reps: int, warmup: int) -> dict:
    """Median wall time (ms) of ``fn(x)`` and its peak memory above the inputs (CUDA only)."""
    for p in (x["hidden"], x["weight"]):
        p.requires_grad_(fn is not _floor)
    times, peak = [], None
    for i in range(warmup + reps):
        x["hidden"].grad = x["weight"].grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        fn(x)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            if device.type == "cuda":
                peak = max(peak or 0, torch.cuda.max_memory_allocated(device) - base)
    x["hidden"].grad = x["weight"].grad = None
    return {"ms": statistics.median(times), "peak_bytes": peak}


def group_summary(sel: dict[str, dict], ours: str, ours_bf16: dict | None) -> dict:
    """The ratios of one (inputs, shape, N) group: ours over the floor, Liger and eager over ours,
    and for the fp32 inputs ours over ours with bf16 inputs; a ratio whose rows failed is left out."""
    ms = {name: r["ms"] for name, r in sel.items() if r["ms"] is not None}
    line = {}
    if ours in ms and "floor" in ms:
        line[f"{ours}/floor"] = ms[ours] / ms["floor"]
    for other in ("liger", "eager"):
        if other in ms and ours in ms:
            line[f"{other}/{ours}"] = ms[other] / ms[ours]
    if ours_bf16 is not None and ours_bf16["ms"] is not None and ours in ms:
        line[f"{ours}/{ours} bf16 inputs"] = ms[ours] / ours_bf16["ms"]
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU shapes (automatic without CUDA)")
    ap.add_argument("--tokens", type=int, nargs="+", help="N values (default: 16384 4096 on GPU, 1024 256 on CPU)")
    ap.add_argument("--shapes", nargs="+", help=f"subset of {list(GPU_SHAPES)}")
    ap.add_argument("--inputs", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"],
                    help="input precisions: bf16, fp32 (the trainer's today)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/kernels-<device>-<date>.json)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    if quick:
        shapes, tokens, reps, warmup = CPU_SHAPES, args.tokens or [1024, 256], args.reps or 3, 1
    else:
        shapes = {k: GPU_SHAPES[k] for k in (args.shapes or GPU_SHAPES)}
        tokens, reps, warmup = args.tokens or [16384, 4096], args.reps or 5, 2
    ours = "triton" if device.type == "cuda" else "torch"
    methods = {ours: _ours(ours)}
    skipped = {}
    if device.type == "cuda":
        methods["torch"] = _ours("torch")
    else:
        skipped["triton"] = "no CUDA device (the Triton interpreter is not a benchmark)"
    methods |= {"eager": _ours("reference"), "floor": _floor}
    if device.type == "cuda":
        liger, reason = _liger()
        if liger is None:
            skipped["liger"] = reason
        else:
            methods["liger"] = liger
    else:
        skipped["liger"] = "no CUDA device"
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    # inputs label -> (dtype, the context each measurement runs in, methods); the trainer's fp32 path runs under
    # autocast on CUDA (module docstring)
    precisions = {BF16: (torch.bfloat16, contextlib.nullcontext, methods),
                  FP32: (torch.float32, autocast, {k: methods[k] for k in (ours, "floor")})}  # fmt: skip
    precisions = {k: v for k, v in precisions.items() if k.split()[0] in args.inputs}

    dev_name = device_name()
    tag = "cpu-quick" if quick and device.type == "cpu" else dev_name.lower().replace(" ", "-")
    out = ResultsFile(args.out or result_path("kernels", tag))
    rows, summary = [], []

    def write(complete: bool) -> Path:
        return out.write({"bench": "kernels", "mode": "quick" if quick else "full", "reps": reps, "skipped": skipped,
                          "results": rows, "summary": summary}, complete)  # fmt: skip

    for shape, (hdim, vocab) in shapes.items():
        for n in tokens:
            for inputs, (dtype, context, group) in precisions.items():
                x = make_inputs(n, hdim, vocab, dtype, device)
                elem = x["hidden"].element_size()
                logits_bytes = n * vocab * elem
                grads_bytes = (n * hdim + vocab * hdim) * elem
                for name, fn in group.items():
                    try:
                        with context():
                            r = measure(fn, x, device, reps, warmup)
                    except Exception as e:  # out of memory, a kernel that cannot launch: recorded, the rest goes on
                        r = {"ms": None, "peak_bytes": None, "error": error_line(e)}
                        x["hidden"].grad = x["weight"].grad = None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    r.update(inputs=inputs, dtype=str(dtype), shape=shape, hidden=hdim, vocab=vocab, n=n, method=name)
                    if r["peak_bytes"] is not None and name != "floor":
                        r["extra_over_logits"] = (r["peak_bytes"] - grads_bytes) / logits_bytes
                    if name in ("triton", "torch"):  # multi-chunk runs hold d lm_weight in fp32 (V x H x 4 B)
                        r["fp32_dw_acc_over_logits"] = vocab * hdim * 4 / logits_bytes
                    rows.append(r)
                    write(complete=False)
                del x
                sel = {r["method"]: r for r in rows if (r["inputs"], r["shape"], r["n"]) == (inputs, shape, n)}
                bf16 = next((r for r in rows if (r["inputs"], r["shape"], r["n"], r["method"]) == (BF16, shape, n, ours)), None)
                summary.append({"inputs": inputs, "shape": shape, "n": n,
                                **group_summary(sel, ours, bf16 if inputs == FP32 else None)})  # fmt: skip
                write(complete=False)

    print(f"\ndevice: {dev_name}; fwd+bwd median of {reps}; ours = {ours}")
    print(f"{'inputs':28s} {'shape':15s} {'N':>6s} {'method':7s} {'ms':>10s} {'/floor':>7s} {'peak MB':>9s} {'extra/logits':>12s}")
    for inputs in precisions:
        for shape in shapes:
            for n in tokens:
                sel = {r["method"]: r for r in rows if (r["inputs"], r["shape"], r["n"]) == (inputs, shape, n)}
                floor_ms = sel["floor"]["ms"]
                for name, r in sel.items():
                    ms = f"{r['ms']:.2f}" if r["ms"] is not None else r["error"].split(":")[0]
                    ratio = f"{r['ms'] / floor_ms:.2f}x" if r["ms"] is not None and floor_ms else "-"
                    peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") is not None else "n/a"
                    extra = f"{100 * r['extra_over_logits']:.1f}%" if "extra_over_logits" in r else "n/a"
                    print(f"{inputs:28s} {shape:15s} {n:6d} {name:7s} {ms:>10s} {ratio:>7s} {peak:>9s} {extra:>12s}")
    for r in rows:
        if r["ms"] is None:
            print(f"failed: {r['inputs']} {r['shape']} N={r['n']} {r['method']}: {r['error']}")
    if device.type == "cuda":
        print("extra/logits: peak above inputs, minus the gradients in the input dtype, over the [N, V] logits;")
        print("  for triton/torch it includes the fp32 d lm_weight accumulator (JSON: fp32_dw_acc_over_logits)")
    print("\nratios:")
    for line in summary:
        print("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))
    print(f"\nwrote {write(complete=True)}")
    return 1 if any(r["ms"] is None for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
