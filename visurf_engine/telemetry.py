"""Metrics: one JSON object per step in ``metrics.jsonl`` plus TensorBoard scalars, GPU
telemetry (utilisation, memory, power, SM clock) from NVML when a GPU is present (one sample
per logged step, or ``NvmlSampler``'s background thread), and the wall time and peak memory of
a step's phases (``PhaseTimer``, ``PeakMemory``).

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
import resource
import threading
import time
from pathlib import Path
from typing import Any

import torch

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
        """The current torch device's NVML handle, found by its UUID: NVML numbers every GPU of the
        machine, torch only the visible ones (``CUDA_VISIBLE_DEVICES=3`` makes physical GPU 3
        torch's device 0), so the two indices differ. torch writes the UUID as
        ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``, NVML as ``GPU-`` followed by the same."""
        if not torch.cuda.is_available():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}"))
        except Exception:  # no NVML library or driver: telemetry is optional
            return None

    def sample(self) -> dict[str, float]:
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {
            "gpu/util": float(util.gpu),
            "gpu/mem_used_gib": mem.used / 2**30,
            "gpu/power_w": self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
            "gpu/sm_clock_mhz": float(self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)),
        }


class NvmlSampler:
    """``_Nvml`` sampled every ``interval`` seconds by a daemon thread, so that a long phase is
    seen throughout and not only at its end. ``window()`` summarises the samples taken since
    its previous call: mean utilisation (%), power (W) and SM clock (MHz), peak memory used
    (GiB, the whole device's, as NVML reports it), and the sample count."""

    def __init__(self, nvml: _Nvml, interval: float = 0.05):
        self.nvml, self.interval = nvml, interval
        self._samples: list[dict[str, float]] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, interval: float = 0.05) -> "NvmlSampler | None":
        """A running sampler, or None without a GPU or NVML."""
        nvml = _Nvml.open()
        return cls(nvml, interval) if nvml is not None else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sample = self.nvml.sample()
            with self._lock:
                self._samples.append(sample)

    def window(self) -> dict[str, float]:
        with self._lock:
            samples, self._samples = self._samples, []
        if not samples:
            return {"gpu/samples": 0.0}
        out = {k: sum(s[k] for s in samples) / len(samples) for k in ("gpu/util", "gpu/power_w", "gpu/sm_clock_mhz")}
        return out | {"gpu/mem_used_gib": max(s["gpu/mem_used_gib"] for s in samples), "gpu/samples": float(len(samples))}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _vm_hwm() -> int | None:
    """This process's peak resident set size in bytes (Linux ``VmHWM``), or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            line = next((x for x in f if x.startswith("VmHWM:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def _reset_vm_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (``5`` into ``/proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """This process's peak memory (bytes) since the last ``reset()``, by ``kind``:

    - ``cuda_allocated`` on a CUDA device: the caching allocator's peak of allocated bytes
      (``torch.cuda.max_memory_allocated``; what the allocator reserved beyond it is not counted);
    - ``rss`` elsewhere: the peak resident set size (``VmHWM``, reset through
      ``/proc/self/clear_refs``), i.e. everything the process holds: weights, optimizer state,
      activations, the Python heap;
    - ``rss_lifetime`` where that file cannot be written: the process's lifetime peak
      (``getrusage``), which ``reset`` cannot lower.
    """

    def __init__(self, device: torch.device | None = None):
        self.device = device if device is not None and device.type == "cuda" else None
        self.kind = "cuda_allocated" if self.device is not None else ("rss" if _reset_vm_hwm() else "rss_lifetime")

    def reset(self) -> None:
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            _reset_vm_hwm()

    def peak(self) -> int:
        if self.device is not None:
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _vm_hwm() if self.kind == "rss" else None
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseTimer:
    """Wall time and peak memory per named phase of a step:

    - ``time/<phase>``: seconds, summed over repeats of the phase; ``time/step``: since the timer
      was made;
    - ``mem/<phase>``: GiB, the process's peak during the phase (``PeakMemory``: CUDA allocator
      peak on a CUDA ``device``, peak RSS otherwise), the largest over repeats; ``mem/step``: the
      largest over the step's phases (work between phases is not covered).

    On a CUDA ``device`` the device is synchronized at each phase's start and end, so that a
    phase's time is that of its own kernels (the host would otherwise run ahead of queued work
    and bill it to a later phase).
    """

    def __init__(self, device: torch.device | None = None):
        self.memory = PeakMemory(device)
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.t0 = time.perf_counter()

    def _sync(self) -> None:
        if self.memory.device is not None:
            torch.cuda.synchronize(self.memory.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        self.memory.reset()
        start = time.perf_counter()
        yield
        self._sync()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start
        self.peaks[name] = max(self.peaks.get(name, 0), self.memory.peak())

    def metrics(self) -> dict[str, float]:
        self._sync()
        mem = {f"mem/{k}": v / 2**30 for k, v in self.peaks.items()}
        if self.peaks:
            mem["mem/step"] = max(self.peaks.values()) / 2**30
        return self.times | mem | {"time/step": time.perf_counter() - self.t0}
