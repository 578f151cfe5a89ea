"""Telemetry: the phase timer's times and peak memory, the peak-memory probe, and the NVML sampler's windows."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from visurf_engine.telemetry import NvmlSampler, PeakMemory, PhaseTimer


def test_phase_timer_times_and_peaks_each_phase():
    timer = PhaseTimer()
    with timer("a"):
        time.sleep(0.02)
    with timer("b"):
        block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        del block
    with timer("a"):
        time.sleep(0.01)
    m = timer.metrics()
    assert m["time/a"] >= 0.03 and m["time/b"] > 0 and m["time/step"] >= m["time/a"] + m["time/b"]
    assert set(m) == {"time/a", "time/b", "time/step", "mem/a", "mem/b", "mem/step"}
    assert m["mem/step"] == max(m["mem/a"], m["mem/b"]) > 0
    if timer.memory.kind == "rss":  # the peak is per phase: b held 64 MiB more than a did
        assert m["mem/b"] - m["mem/a"] > 0.05


def test_peak_memory_reset_forgets_a_freed_peak():
    probe = PeakMemory()
    if probe.kind != "rss":
        pytest.skip(f"peak RSS cannot be reset here ({probe.kind})")
    block = np.ones(128 << 20, dtype=np.uint8)
    high = probe.peak()
    del block
    probe.reset()
    assert probe.peak() < high - (64 << 20)


class FakeNvml:
    def __init__(self):
        self.n = 0

    def sample(self):
        self.n += 1
        return {"gpu/util": 50.0, "gpu/mem_used_gib": float(self.n), "gpu/power_w": 100.0, "gpu/sm_clock_mhz": 1980.0}


def test_nvml_sampler_windows():
    sampler = NvmlSampler(FakeNvml(), interval=0.001)
    try:
        time.sleep(0.05)
        first = sampler.window()
        second = sampler.window()
    finally:
        sampler.close()
    assert first["gpu/samples"] >= 2 and first["gpu/util"] == 50.0 and first["gpu/sm_clock_mhz"] == 1980.0
    assert first["gpu/mem_used_gib"] == first["gpu/samples"]  # the peak of 1, 2, ..., n
    assert second["gpu/samples"] < first["gpu/samples"]  # a window holds only its own samples


@pytest.mark.cuda
def test_phase_timer_on_cuda_synchronizes_and_reads_the_allocator_peak():
    device = torch.device("cuda")
    timer = PhaseTimer(device)
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB, held through both phases
    with timer("big"):
        y = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # 1 GiB, freed at the end of the phase
        del y
    with timer("work"):
        a = torch.randn(4096, 4096, device=device)
        for _ in range(20):
            a = a @ a / 64  # queued kernels: the phase's time must include them
    m = timer.metrics()
    del x, a
    assert timer.memory.kind == "cuda_allocated"
    assert m["mem/big"] >= 1.25 and 0.25 <= m["mem/work"] < 1.0
    assert m["time/work"] > 0.001
