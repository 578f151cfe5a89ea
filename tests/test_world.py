"""The collectives of a multi-GPU run: host tensors must never reach a NCCL-only process group.

On CUDA the world is ``backend_for(cuda)`` = ``"cpu:gloo,cuda:nccl"``; every collective of the
engine goes through ``parallel.world``, which checks that the group's backend serves the
tensor's device. A 2-rank gloo run whose device check sees the group as a GPU run's would
(``engine_testing.train --backend-config``) trains, evaluates and checkpoints under the fixed
config, and stops at its first collective, naming the fix, under a plain ``"nccl"`` group
(``cuda:nccl``), the configuration that crashed every multi-GPU run at step 1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine_testing.runs import SMALL, run_script
from visurf_engine.parallel import world

ENGINE = Path(world.__file__).resolve().parents[1]
TENSOR_COLLECTIVES = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_into_tensor|reduce_scatter|"
                                r"reduce_scatter_tensor|broadcast|reduce|gather|scatter|all_to_all|send|recv)\(")  # fmt: skip


def test_every_tensor_collective_of_the_engine_goes_through_the_checked_helpers():
    calls = [f"{p.relative_to(ENGINE)}:{i}" for p in sorted(ENGINE.rglob("*.py")) if p.name != "world.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if TENSOR_COLLECTIVES.search(line)]  # fmt: skip
    assert calls == []


def test_backend_configs_and_what_they_serve():
    assert world.backend_for(torch.device("cuda")) == "cpu:gloo,cuda:nccl"
    assert world.backend_for(torch.device("cpu")) == "gloo"
    assert world.served_by("cpu:gloo,cuda:nccl") == {"cpu", "cuda"} and world.served_by("cuda:nccl") == {"cuda"}


@pytest.mark.parametrize("config", ["cuda:nccl", "fixed"])
def test_a_two_rank_run_under_a_gpu_runs_backend(cache, tmp_path, config):
    config = world.backend_for(torch.device("cuda")) if config == "fixed" else config
    args = [*SMALL, f"warmstart.cache_dir={cache}", f"train.output_dir={tmp_path}", "train.steps=2", "train.save_every=2"]
    proc = run_script("train", f"--backend-config={config}", *args, nproc=2)
    if config == "cuda:nccl":
        assert proc.returncode != 0
        assert "CollectiveDeviceError: a collective on a cpu tensor" in proc.stderr
        assert "create the group with 'cpu:gloo,cuda:nccl'" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002"
