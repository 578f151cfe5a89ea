"""The report of ``bench/throughput.py``: its measured steps aggregated, and the tables printed.

Per point (``summarise``): each phase's median, p25-p75, min, max and mean over the measured
steps (``other`` = the step less its phases), the step's, the peak memory per phase, tokens and
samples per second over the measured steps' total time (and the rollout phase's own decode rate),
the model FLOPs per step and the MFU, NVML means, and for a mixed schedule (``sft_then_rlvr``)
its mean and its SFT and RLVR steps apart. Across points: the paradigm costs and ratios beside
the paper's (``paradigm_summary``), the peers' ratios to the engine (``peer_summary``), and each
swept key's growth fits and PNG (``sweep_summary``, through ``scaling.py``); ``print_*`` prints
each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scaling import describe, fit_growth, plot_sweep

if TYPE_CHECKING:
    from throughput_worker import Worker

PHASES = ("encode", "rollout", "reward", "gold", "reference", "old_logprobs", "update", "sync")
PAPER_S_PER_STEP = {"rlvr": 22.7, "visurf": 22.9, "sft_then_rlvr": 31.7}  # ViSurf paper, Table 6
PAPER_RATIOS = {"visurf/rlvr": 1.009, "sft_then_rlvr/visurf": 1.38}


# -- the summaries ----------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    """Median, p25, p75, min, max and mean of ``values``."""
    v = np.asarray(values, dtype=float)
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "p25": float(p25), "p75": float(p75), "min": float(v.min()), "max": float(v.max()),
            "mean": float(v.mean())}  # fmt: skip


def summarise(w: Worker, peak_tflops: float | None) -> dict[str, Any]:
    """Per-phase statistics, throughput, memory and MFU of one point's measured steps."""
    recs = w.records
    present = [p for p in PHASES if any(f"time/{p}" in r for r in recs)]
    times = {p: [r.get(f"time/{p}", 0.0) for r in recs] for p in present}
    step = [r["time/step"] for r in recs]
    times["other"] = [s - sum(times[p][i] for p in present) for i, s in enumerate(step)]
    out: dict[str, Any] = {"phases": {p: _stats(v) for p, v in times.items()}, "step": _stats(step)}
    out["peak_gib"] = {p: max(r.get(f"mem/{p}", 0.0) for r in recs) for p in present}
    out["peak_gib"]["step"] = max(r.get("mem/step", 0.0) for r in recs)
    total = sum(step)
    sums = {k: sum(r.get(k, 0.0) for r in recs) for k in ("tokens/generated", "tokens/trained", "tokens/prompt",
                                                            "tokens/prefill", "seqs/trained", "tokens/padded")}  # fmt: skip
    rollout_time = sum(times.get("rollout", [0.0]))
    out["throughput"] = {
        "generated_tok_s": sums["tokens/generated"] / total,
        "rollout_decode_tok_s": sums["tokens/generated"] / rollout_time if rollout_time else None,
        "trained_tok_s": sums["tokens/trained"] / total,
        "samples_s": sums["seqs/trained"] / total,
        "per_step": {k: v / len(recs) for k, v in sums.items() if v},
    }
    n = w.info["flop_params"]
    flops = 6 * n * (sums["tokens/trained"] + sums["tokens/prompt"]) + 2 * n * (sums["tokens/generated"] + sums["tokens/prefill"])
    out["model_tflop_per_step"] = flops / len(recs) / 1e12
    out["mfu"] = flops / total / (peak_tflops * 1e12) if peak_tflops else None
    if any("gpu/util" in r for r in recs):
        out["nvml"] = {k: float(np.mean([r[k] for r in recs if k in r]))
                       for k in ("gpu/util", "gpu/power_w", "gpu/sm_clock_mhz")}  # fmt: skip
        out["nvml"]["gpu/mem_used_gib"] = max(r.get("gpu/mem_used_gib", 0.0) for r in recs)
    sft = [r["time/step"] for r in recs if r.get("phase/sft") == 1.0]
    if sft and len(sft) < len(recs):  # a mixed schedule (sft_then_rlvr)
        out["schedule_mean_s"] = float(np.mean(step))
        out["sft_steps"], out["rlvr_steps"] = _stats(sft), _stats([r["time/step"] for r in recs if r.get("phase/sft") != 1.0])
        out["sft_share"] = len(sft) / len(recs)
    return out


def point_records(workers: dict[str, Worker], peak_tflops: float | None) -> list[dict[str, Any]]:
    """The JSON of each finished point: its overrides (without the run directory), info, summary and steps."""
    return [{"name": n, "side": w.point.side, "overrides": w.point.overrides[:-1], "info": w.info,
             "summary": summarise(w, peak_tflops), "steps": w.records} for n, w in workers.items()]  # fmt: skip


def step_cost(s: dict[str, Any]) -> float:
    """A point's seconds per step: the median, or for a mixed schedule its mean (``throughput.py``'s docstring)."""
    return s.get("schedule_mean_s", s["step"]["median"])


def paired_ratio(a: Worker, b: Worker) -> dict[str, float] | None:
    """Median and p25-p75 of step-by-step ratios a/b (the k-th measured steps of both, run side by side)."""
    if len(a.records) != len(b.records) or not a.records:
        return None
    return _stats([x["time/step"] / y["time/step"] for x, y in zip(a.records, b.records)])


def paradigm_summary(workers: dict[str, Worker], summary: dict[str, Any]) -> dict[str, Any]:
    """``--paradigms``: each paradigm's seconds per step and peak memory, and the ratios beside the paper's."""
    cost = {p: step_cost(s) for p, s in summary.items()}
    out: dict[str, Any] = {"s_per_step": cost, "peak_gib": {p: s["peak_gib"]["step"] for p, s in summary.items()},
                           "paper_s_per_step": PAPER_S_PER_STEP, "ratios": {}}  # fmt: skip
    if {"visurf", "rlvr"} <= set(cost):
        out["ratios"]["visurf/rlvr"] = {"ours": cost["visurf"] / cost["rlvr"], "paper": PAPER_RATIOS["visurf/rlvr"],
                                        "paired": paired_ratio(workers["visurf"], workers["rlvr"])}  # fmt: skip
    if {"sft_then_rlvr", "visurf"} <= set(cost):
        s = summary["sft_then_rlvr"]
        r = {"ours": cost["sft_then_rlvr"] / cost["visurf"], "paper": PAPER_RATIOS["sft_then_rlvr/visurf"],
             "sft_share": s.get("sft_share")}  # fmt: skip
        if "sft_steps" in s:
            r["two_stage"] = (s["sft_steps"]["median"] + s["rlvr_steps"]["median"]) / cost["visurf"]
            r["sft_over_rlvr_step"] = s["sft_steps"]["median"] / s["rlvr_steps"]["median"]
            r["paper_sft_over_rlvr_step_two_stage"] = (31.7 - 22.7) / 22.7
        out["ratios"]["sft_then_rlvr/visurf"] = r
    return out


def peer_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``--peer``: each peer's seconds per step over the engine's, and the engine's tokens per second over its."""
    ours = summary["engine"]
    out = {}
    for name, s in summary.items():
        if name != "engine":
            out[name] = {"s_per_step_ratio": s["step"]["median"] / ours["step"]["median"],
                         "generated_tok_s_ratio": ours["throughput"]["generated_tok_s"] / s["throughput"]["generated_tok_s"],
                         "trained_tok_s_ratio": ours["throughput"]["trained_tok_s"] / s["throughput"]["trained_tok_s"]}  # fmt: skip
    return out


def sweep_summary(sweeps: list[tuple[str, list]], summary: dict[str, Any], plot_stem: Path, title: str) -> dict[str, Any]:
    """``--sweep``: per swept key, time and peak memory per phase at each value, their fitted growth and the PNG."""
    out = {}
    for key, values in sweeps:
        values = [v for v in values if f"{key}={v}" in summary]  # a failed point is left out
        pts = [summary[f"{key}={v}"] for v in values]
        xs = [float(v) for v in values]
        names = [p for p in (*PHASES, "other") if any(p in s["phases"] for s in pts)]
        times = {p: [s["phases"].get(p, {}).get("median", 0.0) for s in pts] for p in names}
        times["step"] = [s["step"]["median"] for s in pts]
        memory = {p: [s["peak_gib"].get(p) for s in pts] for p in [*names, "step"] if p != "other"}
        png = plot_sweep(plot_stem.with_name(f"{plot_stem.name}-{key}.png"), key, xs, times, memory, title)
        out[key] = {"values": values, "time_s": times, "peak_gib": memory, "png": png.name,
                    "fit_time": {p: fit_growth(xs, y) for p, y in times.items()},
                    "fit_memory": {p: fit_growth(xs, y) for p, y in memory.items() if all(v is not None for v in y)}}  # fmt: skip
    return out


# -- printing ---------------------------------------------------------------------------------


def print_point(name: str, s: dict[str, Any], info: dict[str, Any], n_steps: int) -> None:
    """One point's phase table, throughput, FLOPs / MFU and NVML telemetry."""
    mem_kind = {"cuda_allocated": "CUDA allocator peak", "rss": "peak RSS", "rss_lifetime": "peak RSS (process lifetime)"}
    print(f"\n{name}: {n_steps} measured steps; rollout {info['rollout_backend']}, packed {info['pack']}, "
          f"vision once {info['vision_once']}, loss {info['loss_backend']}; memory: {mem_kind[info['memory_kind']]}")  # fmt: skip
    step = s["step"]["median"]
    print(f"  {'phase':13s} {'median s':>10s} {'p25-p75 s':>17s} {'share':>7s} {'peak GiB':>9s}")
    for p, st in s["phases"].items():
        peak = s["peak_gib"].get(p)
        print(f"  {p:13s} {st['median']:10.4f} {st['p25']:8.4f}-{st['p75']:<8.4f} {100 * st['median'] / step:6.1f}% "
              f"{'-' if peak is None else f'{peak:.2f}':>9s}")  # fmt: skip
    st = s["step"]
    print(f"  {'step':13s} {st['median']:10.4f} {st['p25']:8.4f}-{st['p75']:<8.4f} {100.0:6.1f}% {s['peak_gib']['step']:9.2f}")
    if "schedule_mean_s" in s:
        print(f"  schedule mean {s['schedule_mean_s']:.4f} s/step ({100 * s['sft_share']:.0f}% SFT steps: median "
              f"{s['sft_steps']['median']:.4f} s; RLVR steps: median {s['rlvr_steps']['median']:.4f} s)")  # fmt: skip
    t = s["throughput"]
    decode = f" (rollout phase: {t['rollout_decode_tok_s']:.0f} tok/s)" if t["rollout_decode_tok_s"] else ""
    print(f"  generated {t['generated_tok_s']:.0f} tok/s{decode}; trained {t['trained_tok_s']:.0f} tok/s; "
          f"{t['samples_s']:.2f} samples/s")
    print("  per step: " + ", ".join(f"{k} {v:.0f}" for k, v in t["per_step"].items()))
    mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a (no CUDA device)"
    print(f"  model FLOPs {s['model_tflop_per_step']:.3g} TFLOP/step (N = {info['flop_params'] / 1e6:.1f}M); MFU {mfu}")
    if "nvml" in s:
        g = s["nvml"]
        print(f"  NVML: util {g['gpu/util']:.0f}%, power {g['gpu/power_w']:.0f} W, SM clock {g['gpu/sm_clock_mhz']:.0f} MHz, "
              f"memory used {g['gpu/mem_used_gib']:.1f} GiB (device)")  # fmt: skip
    else:
        print("  NVML telemetry: absent (" + ("no CUDA device" if not torch.cuda.is_available() else "nvidia-ml-py / NVML missing") + ")")


def print_matrix(summary: dict[str, Any]) -> None:
    """One row per point: seconds per step, each phase, peak memory, tokens per second."""
    names = [p for p in (*PHASES, "other") if any(p in s["phases"] for s in summary.values())]
    width = max(12, *(len(n) for n in summary))
    print(f"\nper point: s/step and each phase's median (a mixed schedule: means), peak memory, throughput")
    print(f"{'point':{width}s} {'s/step':>8s} " + " ".join(f"{p[:8]:>8s}" for p in names)
          + f" {'peak GiB':>8s} {'gen tok/s':>9s} {'train tok/s':>11s}")  # fmt: skip
    for name, s in summary.items():
        stat = "mean" if "schedule_mean_s" in s else "median"  # a mixed schedule: means, as its s/step
        cells = " ".join(f"{s['phases'][p][stat]:8.4f}" if p in s["phases"] else f"{'-':>8s}" for p in names)
        t = s["throughput"]
        print(f"{name:{width}s} {step_cost(s):8.4f} {cells} {s['peak_gib']['step']:8.2f} {t['generated_tok_s']:9.0f} "
              f"{t['trained_tok_s']:11.0f}")  # fmt: skip


def print_paradigms(ps: dict[str, Any]) -> None:
    """The paradigm cost table and the ratios against the paper's (``paradigm_summary``)."""
    print("\nparadigm cost (same budget per paradigm; sft_then_rlvr: the mean over its schedule)")
    print(f"  {'paradigm':14s} {'s/step':>8s} {'peak GiB':>9s} {'x visurf':>9s} {'paper s/step':>13s}")
    vis = ps["s_per_step"].get("visurf")
    for p, c in ps["s_per_step"].items():
        paper = PAPER_S_PER_STEP.get(p)
        print(f"  {p:14s} {c:8.4f} {ps['peak_gib'][p]:9.2f} {f'{c / vis:.3f}' if vis else '-':>9s} "
              f"{f'{paper:.1f}' if paper else '-':>13s}")  # fmt: skip
    r = ps["ratios"]
    if "visurf/rlvr" in r:
        x = r["visurf/rlvr"]
        paired = f" (step-by-step: median {x['paired']['median']:.3f}, p25-p75 {x['paired']['p25']:.3f}-{x['paired']['p75']:.3f})" if x["paired"] else ""
        print(f"  ViSurf / RLVR: {x['ours']:.3f}{paired}; paper 1.009 (target <= 1.01)")
    if "sft_then_rlvr/visurf" in r:
        x = r["sft_then_rlvr/visurf"]
        print(f"  SFT->RLVR / ViSurf: {x['ours']:.3f} (shared budget, {100 * (x['sft_share'] or 0):.0f}% SFT steps); paper 1.38")
        if "two_stage" in x:
            print(f"  two-stage accounting (an SFT step added to every RLVR step): {x['two_stage']:.3f}; our SFT step = "
                  f"{x['sft_over_rlvr_step']:.2f} RLVR steps, the paper's 1.38 implies {x['paper_sft_over_rlvr_step_two_stage']:.2f}")  # fmt: skip


def print_peer(pr: dict[str, Any]) -> None:
    """The peers' ratios to the engine (``peer_summary``)."""
    print("\nside by side (plain GRPO both; ratios > 1: the engine is faster)")
    for name, x in pr.items():
        print(f"  {name}: s/step {name} / engine = {x['s_per_step_ratio']:.2f}; generated tok/s engine / {name} = "
              f"{x['generated_tok_s_ratio']:.2f}; trained tok/s engine / {name} = {x['trained_tok_s_ratio']:.2f}")  # fmt: skip
    if "trl" in pr:
        print("  (GPU target: >= 3x TRL's throughput)")


def print_sweeps(sw: dict[str, Any], out_dir: Path) -> None:
    """Each swept key's fitted growth of time per phase and of the step's peak memory (``sweep_summary``)."""
    for key, s in sw.items():
        print(f"\ngrowth with {key} = {', '.join(map(str, s['values']))} (plot: {out_dir / s['png']})")
        for p, fit in s["fit_time"].items():
            print(f"  time {p:13s} {describe(fit)}")
        for p, fit in s["fit_memory"].items():
            if p == "step":
                print(f"  peak memory     {describe(fit)}")

