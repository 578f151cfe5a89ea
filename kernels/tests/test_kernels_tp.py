"""Vocab-parallel fused policy loss: TP=2 on gloo (CPU) against TP=1.

Two spawned processes each hold an (uneven) half of ``lm_weight`` and pass their
``vocab_start``; their loss, log-probs, entropy and clip flags must equal the one-process
full-vocabulary result, their ``d lm_weight`` shards concatenate to the full gradient, and
their ``d hidden`` partials sum to it (the caller's TP-region reduction). Both fused
backends run in the same pair of processes (Triton interpreted on CPU), through the public
API and with small tiles (several vocab tiles and row chunks per rank).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from visurf_kernels import fused_logprobs, fused_policy_loss

from kernel_testing import make_case, shard_bounds, tp_worker

WORLD = 2
CASE = {"seed": 2024, "n": 37, "h": 24, "v": 203, "dtype": torch.float32, "temperature": 0.8, "dual_clip": 3.0, "objective_frac": 0.6}
RUNS = {
    "torch": ("torch", None),
    "torch-tiled": ("torch", {"block_vocab": 32, "chunk_tokens": 16}),
    "triton": ("triton", None),
    "triton-tiled": (
        "triton",
        {"stats_block": (32, 32), "stat_block": 64, "dh_block": (32, 32, 32), "dw_block": (32, 32, 32), "chunk_tokens": 16},
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("tp")
    mp.start_processes(
        tp_worker, args=(WORLD, _free_port(), str(out), RUNS, CASE), nprocs=WORLD, start_method="spawn"
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("run", RUNS)
def test_tp2_equals_tp1(tp_results, run):
    case = make_case(**CASE)
    # TP=1 with the torch backend: the triton ranks are checked against it too.
    h = case.hidden.clone().requires_grad_()
    wt = case.lm_weight.clone().requires_grad_()
    loss, stats = fused_policy_loss(*case.args(h, wt, backend="torch"))
    loss.backward()
    logp, entropy = fused_logprobs(case.hidden, case.lm_weight, case.targets, case.spec.replace(backend="torch"))

    ranks = [r[run] for r in tp_results]
    close = {"rtol": 1e-5, "atol": 1e-6}
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), **close)
        torch.testing.assert_close(r["logp"], stats["logp"], **close)
        torch.testing.assert_close(r["entropy"], stats["entropy"], **close)
        assert torch.equal(r["clipped"], stats["clipped"])
        torch.testing.assert_close(r["nograd_logp"], logp, **close)
        torch.testing.assert_close(r["nograd_entropy"], entropy, **close)
    bounds = shard_bounds(case.lm_weight.shape[0], WORLD)
    assert [r["dw"].shape[0] for r in ranks] == [hi - lo for lo, hi in bounds]
    torch.testing.assert_close(torch.cat([r["dw"] for r in ranks]), wt.grad, **close)
    torch.testing.assert_close(sum(r["dh"] for r in ranks), h.grad, **close)
    assert not torch.allclose(ranks[0]["dh"], h.grad, **close)  # a partial, not the full gradient
