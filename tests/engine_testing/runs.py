"""Tiny end-to-end runs: the small settings, the reward they train on, and a run in a fresh
process (``python -m engine_testing.<script>`` with ``tests/`` on ``PYTHONPATH``; the scripts
run ``visurf_engine.train.main`` with a fault injected from outside the product)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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

SMALL = [
    "data.train_size=24", "data.eval_size=4",
    "warmstart.steps=3", "warmstart.batch_size=4", "warmstart.train_size=48",
    "rollout.n=3", "rollout.max_new_tokens=12", "rollout.eval_max_new_tokens=12",
    "train.batch_size=2", "train.micro_batch_size=3", "train.progress=false", "loss.backend=reference",
    "data.reward=grounding_varied",
]


def small_cfg(cache, out, *extra):
    return load_config(None, SMALL + [f"warmstart.cache_dir={cache}", f"train.output_dir={out}", *extra])


def run_script(module: str, *args: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m engine_testing.<module> args`` (under ``torch.distributed.run`` when ``nproc`` > 1)
    in a fresh process, one thread per process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else ["-m"]
    path = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, f"engine_testing.{module}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
