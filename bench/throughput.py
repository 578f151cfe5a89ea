"""Throughput of the real trainer, phase by phase: ``python bench/throughput.py [--config F] [key=value ...]``.

What is measured, and how:

- **The real step.** Every measured *point* (the config; one paradigm; one value of a swept
  key; TRL's ``GRPOTrainer`` as a peer) runs in a worker process of its own, which builds its
  trainer once (``visurf_engine.trainer.Trainer`` on ``--config`` + ``key=value`` overrides, or
  ``trl_peer.TRLSide``) and then runs the steps the bench grants it, one at a time:
  ``trainer.step(i)``, the same call ``Trainer.run`` makes, without evaluation or checkpoints.
  ``--schedule interleaved`` (the default on CPU) grants them round-robin over the points, so
  the drift of a shared machine falls on every point alike; ``sequential`` (the default on
  CUDA, where only one model fits at a time) runs each point's steps in a row. Each point runs
  ``--warmup`` steps that are not counted, then ``--steps`` measured ones.
- **Per step**, from the trainer's own metrics (``telemetry.PhaseTimer``): the wall time and
  peak memory of each phase (``throughput_report.PHASES``: encode, rollout, reward, gold,
  reference = the KL reference's log-probs, old_logprobs, update, sync; ``other`` is the rest of
  the step: sampling rows, advantages, building members), with the device synchronized at each
  phase boundary on CUDA; peak memory is the CUDA allocator's peak of allocated bytes on a GPU
  and the peak resident set size (VmHWM) on CPU; and the step's tokens (``tokens/generated``:
  rollout completion tokens; ``tokens/trained``: every member's completion tokens, the gold's
  included; ``tokens/prompt``: the prompt tokens in front of each trained sequence).
- **Reported per point**: each phase's median and p25-p75 over the measured steps and its
  share of the step; generated and trained tokens per second and samples (trained sequences)
  per second, as totals over the measured steps' total time (and the rollout phase's own
  decode rate); the peak memory; on CUDA an MFU estimate: model FLOPs over step
  time and the device's bf16 peak, where model FLOPs = 6 N x (prompt + completion tokens of
  every trained sequence) + 2 N x (generated tokens + the prompt tokens each sampled sequence
  prefills), N = the language model's parameters without the input embedding (a lookup) and
  with the LM head (attention's quadratic term and the vision tower are left out), and the peak
  is a measured 8192^3 bf16 matmul unless ``--peak-tflops`` is given; NVML telemetry
  (utilisation, memory used, power, SM clock) sampled every 50 ms by a background thread
  (``telemetry.NvmlSampler``), absent without a GPU (said so).

Modes (one at a time; the default profiles the config alone):

- ``--paradigms sft,rlvr,visurf,sft_then_rlvr``: the same budget per paradigm in one run;
  step time and peak memory each; the ratios ViSurf/RLVR and SFT->RLVR/ViSurf beside the
  paper's (Table 6: 22.7 s RLVR, 22.9 s ViSurf, 31.7 s SFT->RLVR per step: 1.009 and 1.38).
  ``sft_then_rlvr`` runs its real schedule, SFT then RLVR, with the measured steps split as in
  a real run (``algo.sft_steps`` of ``train.steps``: half by default) and each stage's first
  ``--warmup`` steps not counted; its step time is the **mean over that schedule** (the
  engine's SFT->RLVR shares the step budget, so it costs less than RLVR per step). The paper's
  1.38 is larger than both of its SFT and RLVR costs, which a mean over one schedule cannot
  be; it can arise as *two-stage* accounting, a whole SFT stage run before an RL stage as long
  as the others' (31.7 - 22.7 = 9.0 s of SFT per RL step): reported as (SFT step + RLVR step)
  / ViSurf step from the same run.
- ``--peer trl``: TRL's ``GRPOTrainer`` on the same model and settings (``trl_peer.py``) beside
  the engine's ``rlvr`` paradigm (plain GRPO both, the engine's rollouts ``rollout.backend=hf``),
  and the engine with ``rollout.backend=vllm`` when the engine and this Python have it (else skipped, with the
  reason); seconds per step, tokens per second, the ratio.
- ``--sweep KEY=V1,V2,...`` (repeatable; e.g. ``rollout.n=4,8,16``,
  ``rollout.max_new_tokens=32,64,128``, ``train.batch_size=4,8,16``): step time and memory per
  phase at each value, the fitted growth per phase (``scaling.fit_growth``) and a PNG per key.

``--random-init tiny|qwen2.5-vl-3b|qwen2.5-vl-7b`` profiles a random-init model of that
architecture (``models.presets``; the task's tokenizer; images resized to ``--image-pixels``)
written to a temporary checkpoint and handed to every point as ``model.path``; without it the
points use the config's model (the embedded default: the warm-started tiny base model, built
once and cached). A random-init model never stops early, so every completion is
``rollout.max_new_tokens`` long.

Prints the tables and writes JSON (``provenance``: device, versions, commit, date, command;
every measured step) to ``bench/results/throughput-<mode>-<device>-<date>.json`` (and the
sweep's PNGs beside it); the file is first written whenever a point finishes or fails (the
points so far, ``complete: false``), so a run killed later keeps them. ``--quick`` is a smoke
run of any mode (a 3-step warm start, tiny batches, 1 + 2 steps; not for the record).

The code is in three modules by job: this one is the command (arguments, the points and their
schedules, granting the steps, the JSON); ``throughput_worker.py`` is a point's worker process
and the coordinator's handle on it; ``throughput_report.py`` aggregates the measured steps and
prints the tables.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside it, also when imported from elsewhere

from results_file import ResultsFile  # noqa: E402
from throughput_report import (  # noqa: E402
    paradigm_summary,
    peer_summary,
    point_records,
    print_matrix,
    print_paradigms,
    print_peer,
    print_point,
    print_sweeps,
    summarise,
    sweep_summary,
)
from throughput_worker import Point, Worker, worker_env  # noqa: E402

from visurf_engine.algo.paradigms import PARADIGMS  # noqa: E402
from visurf_engine.config import Config, ConfigError, load_config  # noqa: E402
from visurf_engine.provenance import device_name, result_path  # noqa: E402

QUICK = ["data.train_size=32", "data.eval_size=4", "data.probe_size=0", "warmstart.steps=3", "warmstart.batch_size=4",
         "warmstart.train_size=48", "rollout.n=2", "rollout.max_new_tokens=8", "train.batch_size=2"]  # fmt: skip


# -- what is measured --------------------------------------------------------------------------


def schedule(cfg: Config, steps: int, warmup: int) -> tuple[list[tuple[int, bool]], list[str]]:
    """The step indices of one point and the overrides they need (module docstring: ``sft_then_rlvr``)."""
    if cfg.algo.paradigm != "sft_then_rlvr":
        return [(i, i >= warmup) for i in range(warmup + steps)], [f"train.steps={warmup + steps}"]
    if steps < 2:
        raise ConfigError("sft_then_rlvr needs --steps >= 2 (its SFT and its RLVR steps are both measured)")
    split = cfg.algo.sft_steps / cfg.train.steps if cfg.algo.sft_steps >= 0 else 0.5
    n_sft = min(max(round(split * steps), 1), steps - 1)
    s = warmup + n_sft
    plan = [(i, i >= warmup) for i in range(s)] + [(s + i, i >= warmup) for i in range(warmup + steps - n_sft)]
    return plan, [f"algo.sft_steps={s}", f"train.steps={len(plan)}"]


def peer_unavailable(args, side: str) -> str | None:
    """Why a peer point cannot run here, or None."""
    if side == "trl":
        try:
            importlib.import_module("trl_peer")  # TRL, datasets and what they import
        except Exception as e:
            return f"TRL is not importable here ({type(e).__name__}: {e}); pip install -e '.[trl]'"
        return None
    try:
        load_config(args.config, args.overrides + ["rollout.backend=vllm"])
    except ConfigError as e:
        return f"this engine has no rollout.backend=vllm ({e})"
    python = args.vllm_python or sys.executable
    check = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, env=worker_env())
    if check.returncode:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return (f"vllm is not importable by {python} ({last}); --vllm-python names an environment that has it "
                "(scripts/setup_vllm_cpu.sh makes one)")  # fmt: skip
    return None


def make_points(args) -> tuple[list[Point], dict[str, str]]:
    skipped: dict[str, str] = {}
    if args.paradigms:
        points = [Point(p, "engine", [f"algo.paradigm={p}"]) for p in args.paradigms]
    elif args.peer:  # plain GRPO on both sides: no KL penalty (the default has one), one update per step
        grpo = ["algo.paradigm=rlvr", "algo.kl_coef=0"]
        points = [Point("engine", "engine", [*grpo, "rollout.backend=hf"])]  # not auto: the HF engine, whatever is installed
        for name, side, extra in (("engine+vllm", "engine", ["rollout.backend=vllm"]), ("trl", "trl", [])):
            reason = peer_unavailable(args, side)
            if reason:
                skipped[name] = reason
            else:
                python = args.vllm_python if name == "engine+vllm" else None
                points.append(Point(name, side, [*grpo, *extra], python=python))
    elif args.sweep:
        points = [Point(f"{key}={v}", "engine", [f"{key}={v}"]) for key, values in args.sweep for v in values]
    else:
        points = [Point("engine", "engine", [])]
    return points, skipped


def finish_points(points: list[Point], args, base: dict[str, Any], run_dir: Path) -> None:
    """Each point's schedule and its own output directory; a bad key or value stops here, named."""
    for p in points:
        cfg = load_config(base["config"], base["overrides"] + p.overrides)
        p.schedule, extra = schedule(cfg, args.steps, args.warmup)
        p.overrides += extra + [f"train.output_dir={run_dir / p.name.replace('/', '_')}"]
        load_config(base["config"], base["overrides"] + p.overrides)


def write_random_model(cfg: Config, preset: str, pixels: int, path: Path) -> Path:
    """A random-init ``preset`` with a tokenizer trained on the task's text (``presets.save_random_checkpoint``)."""
    from visurf_engine.models.presets import save_random_checkpoint
    from visurf_engine.models.tiny import train_tokenizer
    from visurf_engine.rewards import get_reward
    from visurf_engine.tasks import load_task

    spec = get_reward(cfg.data.reward)
    rows = load_task(cfg, spec).train[:500]
    tokenizer = train_tokenizer([r.problem for r in rows] + [spec.render(r.solution, s) for r in rows for s in spec.styles])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = save_random_checkpoint(preset, path, tokenizer, pixels=pixels, device=device)
    if device == "cuda":  # give the workers the memory the initialisation held
        gc.collect()
        torch.cuda.empty_cache()
    return path


def measure_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an n^3 matmul on random data (median of ``reps`` after 3 warm-ups): the MFU's peak."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(3 + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / float(np.median(times)) / 1e12


def run_points(points: list[Point], base: dict[str, Any], interleaved: bool,
               on_point=lambda done, failed: None) -> tuple[dict[str, Worker], dict[str, str]]:  # fmt: skip
    """Start the workers, grant their steps (round-robin, or one point after another), stop them.
    A point that fails is dropped with its error (the others go on); ``on_point(finished, failed)``
    is called whenever a point finishes or fails; returns (finished, failed)."""
    done: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    bar = tqdm(total=sum(len(p.schedule) for p in points), desc="steps", dynamic_ncols=True, disable=not sys.stderr.isatty())
    for group in [points] if interleaved else [[p] for p in points]:
        workers: list[Worker] = []
        for p in group:
            bar.set_description(f"building {p.name}")
            try:
                workers.append(Worker(p, base))
            except RuntimeError as e:
                failed[p.name] = str(e)
                on_point(done, failed)
        while workers:
            for w in list(workers):
                try:
                    if w.remaining:
                        bar.set_description(w.point.name)
                        w.step()
                        bar.update()
                    else:
                        w.close()
                        done[w.point.name] = w
                        workers.remove(w)
                        on_point(done, failed)
                except RuntimeError as e:
                    failed[w.point.name] = str(e)
                    w.process.kill()
                    workers.remove(w)
                    on_point(done, failed)
    bar.close()
    return done, failed


# -- the command ----------------------------------------------------------------------------


def _sweep_arg(text: str) -> tuple[str, list]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: expected KEY=V1,V2,... (e.g. rollout.n=4,8,16)")
    import yaml

    parsed = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    if len(parsed) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed):
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: needs two or more numeric values")
    return key, parsed


def _paradigms_arg(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PARADIGMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--paradigms: unknown {', '.join(bad) or '(none)'}; registered: {', '.join(PARADIGMS)}")
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every point (e.g. rollout.n=8)")
    ap.add_argument("--config", help="YAML config (default: the embedded default)")
    ap.add_argument("--steps", type=int, help="measured steps per point (default 8; --quick: 2)")
    ap.add_argument("--warmup", type=int, help="steps per point run first and not counted (default 2; --quick: 1)")
    ap.add_argument("--paradigms", type=_paradigms_arg, help="e.g. sft,rlvr,visurf,sft_then_rlvr")
    ap.add_argument("--peer", choices=["trl"], help="TRL's GRPOTrainer beside the engine's rlvr")
    ap.add_argument("--sweep", type=_sweep_arg, action="append", help="KEY=V1,V2,... (repeatable)")
    ap.add_argument("--schedule", choices=["auto", "interleaved", "sequential"], default="auto",
                    help="auto: interleaved on CPU, sequential on CUDA")  # fmt: skip
    ap.add_argument("--random-init", choices=["tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b"],
                    help="profile a random-init model of this architecture instead of the config's model")  # fmt: skip
    ap.add_argument("--image-pixels", type=int, default=None,
                    help="with --random-init: pixels every image is resized to (default: 84x84 tiny, 448x448 otherwise)")  # fmt: skip
    ap.add_argument("--vllm-python", help="with --peer: the interpreter of the rollout.backend=vllm point (a vLLM "
                    "environment, e.g. .venv-vllm/bin/python; default: this one)")
    ap.add_argument("--peak-tflops", type=float, help="the MFU's peak (default on CUDA: a measured bf16 matmul)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny settings, 1 warm-up + 2 measured steps")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/throughput-<mode>-<device>-<date>.json)")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.paradigms, args.peer, args.sweep))) > 1:
        ap.error("choose one mode: --paradigms, --peer or --sweep")
    args.steps = args.steps if args.steps is not None else 2 if args.quick else 8
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    if args.quick:
        args.overrides = QUICK + args.overrides
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    if args.image_pixels is not None and not args.random_init:
        ap.error("--image-pixels needs --random-init")
    args.mode = "paradigms" if args.paradigms else "peer" if args.peer else "sweep" if args.sweep else "profile"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    run_dir = Path(tempfile.mkdtemp(prefix="visurf-throughput-"))
    base = {"config": args.config, "overrides": list(args.overrides)}
    try:
        try:  # every point's config and schedule first: a bad key or value stops here, named
            cfg = load_config(args.config, args.overrides)
            points, skipped = make_points(args)
            finish_points(points, args, base, run_dir)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        if args.random_init:
            pixels = args.image_pixels or (84 * 84 if args.random_init == "tiny" else 448 * 448)
            path = write_random_model(cfg, args.random_init, pixels, run_dir / "model")
            model_note = f"random-init {args.random_init}, images at {pixels} pixels"
        else:
            from visurf_engine.tasks import prepare_base_model

            path = prepare_base_model(cfg, progress=sys.stderr.isatty())
            model_note = str(path) if cfg.model.path else "the embedded warm-started base model (tiny)"
        base["overrides"].append(f"model.path={path}")
        for name, reason in skipped.items():
            print(f"skipping {name}: {reason}")
        peak = args.peak_tflops or (measure_matmul_tflops() if cuda else None)
        interleaved = args.schedule == "interleaved" or args.schedule == "auto" and not cuda
        tag = ("cpu" if not cuda else torch.cuda.get_device_name().lower().replace(" ", "-")) + ("-quick" if args.quick else "")
        out = ResultsFile(args.out or result_path(f"throughput-{args.mode}", tag))
        payload: dict[str, Any] = {"bench": "throughput", "mode": args.mode, "model": model_note, "config": args.config,
                                   "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
                                   "schedule": "interleaved" if interleaved else "sequential", "peak_tflops": peak,
                                   "skipped": skipped}  # fmt: skip

        def write_partial(done: dict[str, Worker], failed: dict[str, str]) -> None:
            """The points finished so far (a run killed later keeps them); the cross-point summaries come at the end."""
            out.write(payload | {"failed": failed, "points": point_records(done, peak)}, complete=False)

        workers, failed = run_points(points, base, interleaved, write_partial)
        summary = {name: summarise(w, peak) for name, w in workers.items()}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    for name, error in failed.items():
        print(f"\nFAILED {name}:\n{error}", file=sys.stderr)
    if not workers:
        return 1

    print(f"\n{device_name()}; model: {model_note}; {args.warmup} warm-up + {args.steps} measured steps per point, "
          f"{'interleaved' if interleaved else 'sequential'}; overrides: {' '.join(args.overrides) or '-'}")  # fmt: skip
    if peak:
        print(f"MFU peak: {peak:.0f} TFLOP/s bf16 ({'given' if args.peak_tflops else 'measured 8192^3 matmul'})")
    if len(points) <= 3 and args.mode != "sweep":
        for name, s in summary.items():
            print_point(name, s, workers[name].info, len(workers[name].records))
    if len(points) > 1:
        print_matrix(summary)
    payload["failed"] = failed
    if args.mode == "paradigms":
        payload["paradigms"] = paradigm_summary(workers, summary)
        print_paradigms(payload["paradigms"])
    elif args.mode == "peer" and "engine" in summary and len(summary) > 1:
        payload["peer"] = peer_summary(summary)
        print_peer(payload["peer"])
    elif args.mode == "sweep":
        payload["sweeps"] = sweep_summary(args.sweep, summary, out.path.with_suffix(""), f"{device_name()}; {model_note}")
        print_sweeps(payload["sweeps"], out.path.parent)
    payload["points"] = point_records(workers, peak)
    print(f"\nwrote {out.write(payload, complete=True)}")
    if failed:
        print(f"failed: {', '.join(failed)} (above; the JSON holds the points that finished)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
