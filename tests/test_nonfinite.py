"""The non-finite guard: a step whose loss is NaN (a fault paradigm's NaN advantages on rank 0,
``engine_testing.runs``) is skipped on every rank, counted and logged, and the run goes on;
``train.max_skipped_steps`` consecutive skips stop it with the last checkpoint intact; the
learner's ``step`` skips on every rank when any rank's loss is non-finite."""

from __future__ import annotations

import json
import logging
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from engine_testing.runs import FAULT_PARADIGMS, SMALL, run_script, small_cfg
from visurf_engine.algo.paradigms import PARADIGMS
from visurf_engine.learners.base import Learner
from visurf_engine.parallel.world import World
from visurf_engine.nonfinite import NonFiniteError
from visurf_engine.trainer import Trainer

RUN = ["algo.paradigm=visurf_nan_at_2", "train.steps=3", "train.save_every=1", "train.keep_checkpoints=3",
       "data.probe_size=0"]  # fmt: skip


@pytest.fixture
def fault_paradigms(monkeypatch):
    """The fault paradigms, registered for one test."""
    for paradigm in FAULT_PARADIGMS:
        monkeypatch.setitem(PARADIGMS._items, paradigm.name, paradigm)


def _train_lines(out):
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def _assert_step_2_skipped_and_run_went_on(out):
    lines = _train_lines(out)
    assert [m["train/skipped_steps"] for m in lines] == [0, 1, 1]
    assert lines[1]["loss"] is None and lines[1]["grad_norm"] is None  # NaN, written as null
    assert all(lines[i]["loss"] is not None and lines[i]["grad_norm"] is not None for i in (0, 2))
    weights = [load_file(str(out / "checkpoints" / f"step_00000{s}" / "model.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # step 3 trained
    adam = [torch.load(out / "checkpoints" / f"step_00000{s}" / "optimizer.pt")["state"][0]["step"] for s in (1, 2, 3)]
    assert [float(x) for x in adam] == [1.0, 1.0, 2.0]  # nor did it touch the optimizer state


def test_nan_loss_step_is_skipped_counted_and_logged_on_one_rank(cache, tmp_path, caplog, fault_paradigms):
    with caplog.at_level(logging.WARNING, logger="visurf_engine.trainer"):
        Trainer(small_cfg(cache, tmp_path, *RUN)).run()
    _assert_step_2_skipped_and_run_went_on(tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if "optimizer step skipped" in r.getMessage()]
    assert warning.startswith("step 2: non-finite loss or grad norm (nan)") and "(1 in a row, 1 in the run)" in warning
    assert "members on rank 0: shapes-1234-" in warning and "#0, " in warning and "#2, " in warning and "#gold" in warning


def test_nan_loss_on_rank_0_is_skipped_by_both_ranks(cache, tmp_path):
    proc = run_script("train", *SMALL, *RUN, f"warmstart.cache_dir={cache}", f"train.output_dir={tmp_path}", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_step_2_skipped_and_run_went_on(tmp_path)
    for rank in (0, 1):  # rank 1's own loss was finite; it skipped all the same
        assert f"members on rank {rank}: " in proc.stderr


def test_consecutive_skips_stop_the_run_with_the_last_checkpoint_intact(cache, tmp_path, fault_paradigms):
    trainer = Trainer(small_cfg(cache, tmp_path, *RUN, "algo.paradigm=visurf_nan_from_2", "train.steps=6",
                                "train.max_skipped_steps=2"))  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"2 consecutive optimizer steps \(the last in step 3\) had a non-finite "
                       r"loss or grad norm \(train.max_skipped_steps=2\).*step_000002, is intact.*train.resume=true"):
        trainer.run()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002"
    assert [m["train/skipped_steps"] for m in _train_lines(tmp_path)] == [0, 1, 2]


class Toy(Learner):
    """The smallest learner: a linear layer, its grads reduced over the world."""

    def __init__(self, dp: World = World()):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.dp = dp

    def forward_backward(self, micro):
        loss = self.model(torch.ones(1, 4)).sum()
        loss.backward()
        if dist.is_initialized():
            for p in self.model.parameters():
                dist.all_reduce(p.grad)
        return [(loss.detach(), {})]

    def clip_grads(self, grad_clip):
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip))

    def zero_grads(self):
        self.optimizer.zero_grad(set_to_none=True)

    def export_weights(self):
        return self.model.named_parameters()

    def load_weights(self, named):
        raise NotImplementedError

    def logprobs(self, prompts, idx, completions, batching):
        raise NotImplementedError


def _step(toy: Toy, loss_finite: bool):
    before = [p.detach().clone() for p in toy.model.parameters()]
    toy.forward_backward([])
    update = toy.step(1.0, loss_finite=loss_finite)
    moved = any(not torch.equal(a, p) for a, p in zip(before, toy.model.parameters()))
    return update, moved, all(p.grad is None for p in toy.model.parameters())


def test_step_skips_on_a_non_finite_loss_and_zeroes_the_grads():
    toy = Toy()
    update, moved, zeroed = _step(toy, loss_finite=False)
    assert update.skipped and update.grad_norm > 0 and not moved and zeroed and not toy.optimizer.state
    update, moved, zeroed = _step(toy, loss_finite=True)
    assert not update.skipped and moved and zeroed


def _agree_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = [_step(Toy(World(rank=rank, size=2)), loss_finite=rank != 1)[:2]]  # only rank 1's loss is non-finite
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_agree_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        ((update, moved),) = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert update.skipped and not moved, rank
