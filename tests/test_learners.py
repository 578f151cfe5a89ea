"""The learner protocol: the same micro-batches through the ``hf`` learner (one process) and the
``megatron`` learner (TP=2, two gloo processes) give the same losses, gradients, grad norm and
updated weights. float32; tolerances as in ``test_megatron_parallel`` (the backends sum in
different orders: fused QKV, split heads, vocab-parallel softmax)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from engine_testing.megatron import hf_learner_step, hf_oracle, parallel_worker, random_micro_batches, tiny_vl_model  # noqa: E402
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
