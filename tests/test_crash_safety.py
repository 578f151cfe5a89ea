"""A run killed with SIGKILL inside a checkpoint write and resumed ends with the weights of an
uninterrupted run, bit for bit, and logs every step once (``metrics.jsonl`` and TensorBoard);
checkpoint files are fsynced before the renames that publish them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine_testing.runs import SMALL, run_script
from visurf_engine import checkpoint as ckpt
from visurf_engine.learners import Learner
from visurf_engine.parallel.world import World
from visurf_engine.telemetry import lines_up_to

RUN = SMALL + ["train.steps=4", "train.save_every=1", "train.eval_every=2", "data.probe_size=0"]


def _args(cache, out, *extra):
    return [*RUN, f"warmstart.cache_dir={cache}", f"train.output_dir={out}", *extra]


def _train(cache, out, *extra):
    proc = run_script("train", *_args(cache, out, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _train(cache, out)
    return out


@pytest.mark.parametrize("where", ["files", "publish"])
def test_killed_in_checkpoint_write_resumes_exactly_and_logs_each_step_once(cache, uninterrupted, tmp_path, where):
    proc = run_script("train", f"--kill=3:{where}", *_args(cache, tmp_path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002"
    assert [m["step"] for m in _lines(tmp_path) if "loss" in m] == [1, 2, 3]  # step 3 was logged, not saved

    _train(cache, tmp_path, "train.resume=true")
    ref, got = load_file(str(uninterrupted / "checkpoints" / "step_000004" / "model.safetensors")), \
        load_file(str(tmp_path / "checkpoints" / "step_000004" / "model.safetensors"))  # fmt: skip
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    lines = _lines(tmp_path)
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in lines if "eval/giou" in m] == [0, 2, 4]
    # wall times and peak memory are the process's, the rest must be equal
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))} for m in ms]  # noqa: E731
    assert strip(lines) == strip(_lines(uninterrupted))  # the same lines, each once
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/giou")] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000004"]


def test_lines_up_to_drops_later_and_torn_lines():
    text = '{"step": 0}\n{"step": 1}\n{"step": 2, "x": 1}\n{"step": 2}\n{"step": 3}\n{"st'
    assert lines_up_to(text, 2) == ['{"step": 0}\n', '{"step": 1}\n', '{"step": 2, "x": 1}\n', '{"step": 2}\n']
    assert lines_up_to(text, 5) == lines_up_to(text, 3)  # the torn last line goes
    assert lines_up_to('{"step": 0}\n{"step": 1}', 1) == ['{"step": 0}\n']  # unterminated


class LinearLearner(Learner):
    """The default (whole-model) checkpoint format over a linear layer; nothing else is used."""

    def __init__(self):
        self.policy = SimpleNamespace(model=torch.nn.Linear(3, 2))
        self.optimizer = torch.optim.AdamW(self.policy.model.parameters())

    forward_backward = logprobs = clip_grads = zero_grads = export_weights = load_weights = None


def test_checkpoint_files_are_fsynced_before_the_renames_that_publish_them(tmp_path, monkeypatch):
    root, events = tmp_path.resolve(), []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    learner = LinearLearner()
    for step in (1, 2, 3):
        ckpt.save(root, step, learner, {"step": step}, World(), keep=2)
    synced = lambda until: {e[1] for e in events[:until] if e[0] == "fsync"}  # noqa: E731
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "replace"]
    assert [Path(dst).name for _, _, dst in renames] == ["step_000001", "latest", "step_000002", "latest", "step_000003", "latest"]
    files = ("model.safetensors", "optimizer.pt", "state.json", "rng_rank0.pt")
    for i, src, dst in renames:
        needed = {src} | ({f"{src}/{f}" for f in files} if Path(dst).name != "latest" else set())
        assert needed <= synced(i), (dst, needed - synced(i))
        assert next(e for e in events[i + 1 :] if e[0] == "fsync") == ("fsync", str(root)), "directory not fsynced after rename"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]  # keep=2


def test_fsdp_killed_in_a_sharded_checkpoint_write_resumes_exactly(cache, tmp_path):
    """``model.backend=fsdp`` on two gloo ranks: both killed in step 3's checkpoint (each rank's
    shards written, its RNG not), resumed from step 2, end with the uninterrupted run's weights
    bit for bit (both read back whole from their sharded checkpoints, ``export.read_weights``)."""
    from visurf_engine.export import read_weights

    fsdp = ["model.backend=fsdp", "train.eval_every=0"]
    full = tmp_path / "full"
    assert run_script("train", *_args(cache, full, *fsdp), nproc=2).returncode == 0
    proc = run_script("train", "--kill=3:files", *_args(cache, tmp_path / "cut", *fsdp), nproc=2)
    assert proc.returncode != 0 and (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_000002"
    assert run_script("train", *_args(cache, tmp_path / "cut", *fsdp, "train.resume=true"), nproc=2).returncode == 0
    ref, got = (read_weights(run / "checkpoints" / "step_000004") for run in (full, tmp_path / "cut"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [m["step"] for m in _lines(tmp_path / "cut") if "loss" in m] == [1, 2, 3, 4]
