"""Telemetry: the phase timer's times and peak memory, the peak-memory probe, the NVML sampler's
windows, and the NVML handle of the torch device under ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import os
import sys
import time
import types

import numpy as np
import pytest
import torch

from visurf_engine.telemetry import NvmlSampler, PeakMemory, PhaseTimer, _Nvml


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


class FakeUuid:
    """torch's ``_CUuuid``: not a string; ``str`` gives the 8-4-4-4-12 hex form without a prefix."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


def test_nvml_handle_is_the_torch_devices_by_uuid_not_by_index(monkeypatch):
    physical = [f"{i:08x}-0000-4000-8000-00000000000{i}" for i in range(4)]  # NVML's GPUs 0-3
    handles = [object() for _ in physical]

    def by_uuid(uuid: str):
        if not uuid.startswith("GPU-") or uuid[4:] not in physical:
            raise RuntimeError(f"NVML_ERROR_NOT_FOUND: {uuid}")
        return handles[physical.index(uuid[4:])]

    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=by_uuid,
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=handles.index(h)),  # gpu/util: the index
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=0),
        nvmlDeviceGetPowerUsage=lambda h: 0,
        nvmlDeviceGetClockInfo=lambda h, clock: 0,
        NVML_CLOCK_SM=1,
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # torch's devices 0, 1 are physical 3, 1
    visible = [int(i) for i in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=FakeUuid(physical[visible[i]])))  # fmt: skip
    opened = _Nvml.open()
    assert opened is not None and opened.handle is handles[3] and opened.handle is not handles[0]
    assert opened.sample()["gpu/util"] == 3.0


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
