"""Tiny end-to-end runs shared by the training tests: the settings, their reward, and torchrun.

``SMALL``: overrides that make a run of the embedded task take seconds (a 3-step warm start,
2 prompts x 3 rollouts of 12 tokens, the reference loss), scored by ``grounding_varied``
(``VariedGrounding``, registered on import): rollouts of a barely trained model then still
differ in reward, so every RL step has a gradient. ``torchrun`` runs the training CLI on two
gloo ranks; ``step_metrics`` reads a run's per-step metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from visurf_engine.rewards import REWARDS, GroundingReward, register


class VariedGrounding(GroundingReward):
    """Grounding whose non-repeat component is replaced by a length score."""

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
]  # fmt: skip


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
