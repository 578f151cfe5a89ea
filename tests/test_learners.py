"""The learner protocol: the same micro-batches through the ``hf`` learner (one process) and the
``megatron`` learner (TP=2, two gloo processes; TP=2 x DP=2 and PP=2 x DP=2, four) give the same losses,
gradients, grad norm and updated weights. float32; tolerances as in ``test_megatron_parallel``
(the backends sum in different orders: fused QKV, split heads, vocab-parallel softmax). The
megatron checkpoint (each rank's slice of the master weights) exports to the trained weights
and resumes bit for bit, in fp32 and with bf16 compute over fp32 master weights."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from engine_testing.megatron import OPTIM, hf_learner_step, hf_oracle, parallel_worker, random_micro_batches, tiny_vl_model  # noqa: E402
from visurf_engine.export import read_weights  # noqa: E402
from visurf_engine.learners.megatron.convert import Layout, megatron_to_hf  # noqa: E402

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-5  # max |g - g_ref| / max |g_ref|, per tensor
WEIGHT_ATOL = 1e-4  # 10% of one Adam step (lr 1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hf_learner_is_the_autograd_oracle():
    model = tiny_vl_model()
    got = hf_learner_step(model, random_micro_batches(model))
    model = tiny_vl_model()
    ref = hf_oracle(model, random_micro_batches(model))
    assert torch.equal(got["losses"], ref["losses"]) and got["norm"] == ref["norm"]
    assert all(torch.equal(got["grads"][k], g) for k, g in ref["grads"].items())
    assert all(torch.equal(got["weights"][k], w) for k, w in ref["weights"].items() if k in got["weights"])


def test_hf_and_megatron_learners_agree(tmp_path):
    tp = 2
    mp.start_processes(parallel_worker, args=(tp, _free_port(), str(tmp_path), tp, 1, False), nprocs=tp, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp)]
    model = tiny_vl_model()
    ref = hf_learner_step(model, random_micro_batches(model))
    for r in ranks:
        torch.testing.assert_close(r["losses"], ref["losses"], **LOSS_TOL)
        assert r["norm"] == pytest.approx(ref["norm"], rel=GRAD_RTOL)
        for k, w in ref["weights"].items():
            torch.testing.assert_close(r["weights"][k], w, rtol=0, atol=WEIGHT_ATOL, msg=k)
    grads = megatron_to_hf([r["grads"] for r in ranks], Layout.from_hf_config(model.config, tp, 1), 0)
    for k, g in ref["grads"].items():
        assert (grads[k] - g).abs().max() / g.abs().max() < GRAD_RTOL, k


def _spawn(tmp_path, world, tp, pp=1, tied=False, compute=torch.float32) -> list[dict]:
    mp.start_processes(parallel_worker, args=(world, _free_port(), str(tmp_path), tp, pp, tied, compute, True),
                       nprocs=world, start_method="spawn")  # fmt: skip
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _assert_resumes_exactly(r: dict) -> None:
    """The restored learner holds the written weights and takes the next step bit for bit; a
    non-finite loss on one data-parallel rank skips the step on every rank."""
    assert all(torch.equal(r["restored"][k], w) for k, w in r["weights"].items())
    assert all(torch.equal(r["resumed"][k], w) for k, w in r["next"].items())
    assert any(not torch.equal(r["next"][k], w) for k, w in r["weights"].items()), "the second step changed nothing"
    assert r["nan_skipped"] and all(torch.equal(r["after_nan"][k], w) for k, w in r["next"].items())


@pytest.mark.parametrize("tp,pp,tied", [(2, 1, False), (1, 2, True)], ids=["tp2xdp2", "pp2xdp2-tied"])
def test_megatron_data_parallel_agrees_with_hf_and_its_checkpoint_exports_and_resumes_exactly(tmp_path, tp, pp, tied):
    """DP=2 beside TP=2 or PP=2 (tied embeddings: the last stage's copy reduced with the first's):
    the distributed optimizer shards the main parameters and the Adam state over the two
    data-parallel ranks, each of which trains on one of the two micro-batches."""
    dp = 2
    ranks = _spawn(tmp_path, tp * pp * dp, tp, pp, tied)
    model = tiny_vl_model(tied=tied)
    ref = hf_learner_step(model, random_micro_batches(model))
    for rank, r in enumerate(ranks):  # rank = tp_rank + tp (dp_rank + dp pp_rank)
        d = rank // tp % dp
        torch.testing.assert_close(r["losses"], ref["losses"][d : d + 1], **LOSS_TOL)
        assert r["norm"] == pytest.approx(ref["norm"], rel=GRAD_RTOL)
        for k, w in ref["weights"].items():
            torch.testing.assert_close(r["weights"][k], w, rtol=0, atol=WEIGHT_ATOL, msg=k)
        _assert_resumes_exactly(r)
    exported = read_weights(tmp_path / "ckpt")
    assert set(exported) == set(ranks[0]["weights"])
    assert all(torch.equal(exported[k], w) for k, w in ranks[0]["weights"].items())


def test_megatron_bf16_compute_keeps_fp32_master_weights(tmp_path):
    """TP=1 x DP=2, bf16 parameters and replica over fp32 master weights (the distributed
    optimizer's main parameters, started from the fp32 checkpoint, not from its bf16 rounding):
    the checkpoint exports them in fp32, the replica is their bf16 rounding."""
    ranks = _spawn(tmp_path, 2, 1, compute=torch.bfloat16)
    start = tiny_vl_model().state_dict()
    master = read_weights(tmp_path / "ckpt")
    lr, wd = OPTIM["lr"], OPTIM["weight_decay"]
    for k, w in master.items():
        assert w.dtype == torch.float32
        # one Adam step moves a weight by at most lr (|m / sqrt(v)| <= 1) plus its decoupled decay
        assert ((w - start[k]).abs() <= lr * (1 + wd * start[k].abs()) + 1e-6).all(), k
    for r in ranks:
        assert all(w.dtype == torch.bfloat16 and torch.equal(master[k].to(torch.bfloat16), w) for k, w in r["weights"].items())
        _assert_resumes_exactly(r)
