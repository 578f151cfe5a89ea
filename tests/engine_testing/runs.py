"""Tiny end-to-end runs shared by the training tests: the settings, their reward, test paradigms
that inject faults, and runs in fresh processes.

``SMALL``: overrides that make a run of the embedded task take seconds (a 3-step warm start,
2 prompts x 3 rollouts of 12 tokens, the reference loss), scored by ``grounding_varied``
(``VariedGrounding``, registered on import): rollouts of a barely trained model then still
differ in reward, so every RL step has a gradient. ``torchrun`` runs the training CLI on two
gloo ranks; ``run_script`` runs ``python -m engine_testing.<script>`` (``tests/`` on
``PYTHONPATH``; ``engine_testing.train`` runs ``visurf_engine.train.main``); ``step_metrics``
reads a run's per-step metrics.

Fault paradigms (``FAULT_PARADIGMS``: ViSurf, except that rank 0's advantages are NaN in the
steps named, so its loss and, after the all-reduce, every rank's gradients are non-finite):
``visurf_nan_at_2`` (step 2 only), ``visurf_nan_from_2`` (step 2 on). Registered only where a
run needs them (``register_fault_paradigms``), so the suite's registry stays the product's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from visurf_engine.algo.paradigms import PARADIGMS, VISURF, Paradigm, register_paradigm
from visurf_engine.config import load_config
from visurf_engine.rewards import REWARDS, GroundingReward, register

TESTS = Path(__file__).resolve().parents[1]


class VariedGrounding(GroundingReward):
    """Grounding whose non-repeat component is replaced by a length score, so rollouts of a
    barely trained model still differ in reward and every RL step has a gradient."""

    name = "grounding_varied"

    def score(self, completion, solution):
        return super().score(completion, solution) | {"non_repeat": min(1.0, len(completion) / 100)}


if VariedGrounding.name not in REWARDS:
    register(VariedGrounding())


def _nan_on_rank0(rewards, **kw):
    rollout, gold = VISURF.advantages(rewards, **kw)
    if not dist.is_initialized() or dist.get_rank() == 0:
        rollout, gold = torch.full_like(rollout, float("nan")), torch.full_like(gold, float("nan"))
    return rollout, gold


NAN_PHASE = replace(VISURF, name="visurf_nan", advantages=_nan_on_rank0)
FAULT_PARADIGMS = (
    Paradigm("visurf_nan_at_2", lambda step, sft_steps: NAN_PHASE if step == 1 else VISURF),
    Paradigm("visurf_nan_from_2", lambda step, sft_steps: NAN_PHASE if step >= 1 else VISURF),
)


def register_fault_paradigms() -> None:
    for paradigm in FAULT_PARADIGMS:
        if paradigm.name not in PARADIGMS:
            register_paradigm(paradigm)


SMALL = [
    "data.train_size=24", "data.eval_size=4",
    "warmstart.steps=3", "warmstart.batch_size=4", "warmstart.train_size=48",
    "rollout.n=3", "rollout.max_new_tokens=12", "rollout.eval_max_new_tokens=12",
    "train.batch_size=2", "train.micro_batch_size=3", "train.progress=false", "loss.backend=reference",
    "data.reward=grounding_varied",
]  # fmt: skip


def small_cfg(cache, out, *extra):
    return load_config(None, SMALL + [f"warmstart.cache_dir={cache}", f"train.output_dir={out}", *extra])


def step_metrics(out: Path) -> list[dict]:
    """The per-step lines of ``out/metrics.jsonl`` (those with a loss), in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def torchrun(args: list[str], out: Path, *extra: str, nproc: int = 2, timeout: int = 300, env: dict | None = None) -> str:
    """``torchrun -m visurf_engine.train`` on ``nproc`` gloo ranks with ``args`` (any
    ``train.output_dir`` replaced by ``out``) and ``extra``; its stdout (fails on a non-zero exit)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "visurf_engine.train"]
    cmd += [a for a in args if not a.startswith("train.output_dir=")] + [f"train.output_dir={out}", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_script(module: str, *args: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m engine_testing.<module> args`` (under ``torch.distributed.run`` when ``nproc`` > 1)
    in a fresh process, one thread per process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else ["-m"]
    path = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, f"engine_testing.{module}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
