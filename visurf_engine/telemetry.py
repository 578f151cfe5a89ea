"""Metrics: one JSON object per step in ``metrics.jsonl`` plus TensorBoard scalars, GPU
telemetry (utilisation, memory, power) from NVML when a GPU is present, and the wall time
of a step's phases (``PhaseTimer``).

Crash safety: the lines of ``metrics.jsonl`` have non-decreasing steps, and a checkpoint of
step N is written after every line of steps <= N and before any line of a later step
(``Trainer.run``). A run resumed from it (``resume_step=N``) therefore keeps exactly the
lines of steps <= N (a killed run's later lines, and a line torn by the kill, are dropped,
the file replaced atomically) and opens TensorBoard with ``purge_step=N + 1``, which hides
the killed run's events of later steps: every step is logged once in both. ``sync`` makes
the lines logged so far durable; the trainer calls it before each checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .durable import write_atomic


class MetricsLogger:
    """Writes ``{"step": s, **metrics}`` lines and TensorBoard scalars (rank 0 only).

    ``resume_step=None`` starts new files; ``resume_step=N`` continues the run of a checkpoint
    of step N (module docstring).
    """

    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            write_atomic(self.path, "".join(lines_up_to(self.path.read_text(), resume_step)))
        self._file = open(self.path, "w" if resume_step is None else "a")
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        self._tb = SummaryWriter(str(output_dir / "tensorboard"), **purge)
        self._nvml = _Nvml.open()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = metrics | (self._nvml.sample() if self._nvml else {})
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def sync(self) -> None:
        """Make every line and scalar logged so far durable."""
        if self.enabled:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._tb.close()


def lines_up_to(text: str, step: int) -> list[str]:
    """The leading lines of a ``metrics.jsonl`` text whose step is <= ``step`` (each with its
    newline); the first later, unterminated or unreadable line ends them."""
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            if not line.endswith("\n") or json.loads(line)["step"] > step:
                break
        except (ValueError, KeyError, TypeError):
            break
        kept.append(line)
    return kept


class _Nvml:
    """NVML sampling of the local GPU (nvidia-ml-py); absent without a driver."""

    def __init__(self, pynvml, handle):
        self.nvml, self.handle = pynvml, handle

    @classmethod
    def open(cls) -> "_Nvml | None":
        import torch

        if not torch.cuda.is_available():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device()))
        except Exception:  # no NVML library or driver: telemetry is optional
            return None

    def sample(self) -> dict[str, float]:
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {
            "gpu/util": float(util.gpu),
            "gpu/mem_used_gib": mem.used / 2**30,
            "gpu/power_w": self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
        }


class PhaseTimer:
    """Wall time per named phase of a step: ``time/<phase>`` (summed over repeats) and ``time/step``."""

    def __init__(self):
        self.times, self.t0 = {}, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return self.times | {"time/step": time.perf_counter() - self.t0}
