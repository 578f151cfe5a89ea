"""The mixed-precision contract (``models.precision``): float32 master weights, the forward and the
fused loss's inputs in the compute dtype (bf16 on CUDA). On CPU, a bf16 compute dtype runs the
GPU's precision policy: the fused loss must receive 16-bit ``hidden`` and LM-head weight (its
bf16 kernel path, the one ``bench/kernels.py`` measures), while the parameters, their gradients
and the optimizer stay float32; the losses stay within bf16 error (2e-2 relative) of the fp32 run."""

from __future__ import annotations

import pytest
import torch

from engine_testing.learners import build, loss_input_dtypes, save_tiny, spawn, step_batches, train
from engine_testing.megatron import tiny_vl_model
from visurf_engine.models.precision import Precision
from visurf_engine.parallel.world import World

BF16 = torch.bfloat16


def test_auto_computes_in_bf16_on_cuda_and_fp32_on_cpu():
    assert Precision.of("float32", "auto", torch.device("cuda")) == Precision(torch.float32, BF16)
    assert Precision.of("float32", "auto", torch.device("cpu")) == Precision(torch.float32, torch.float32)
    assert Precision.of("bfloat16", "auto", torch.device("cuda")) == Precision(BF16, BF16)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_hf_learner_under_the_gpu_precision_policy_feeds_the_loss_bf16_and_keeps_fp32_masters(path, monkeypatch):
    ref = train(build("hf", path, World()), World())
    seen = loss_input_dtypes(monkeypatch)
    learner = build("hf", path, World(), compute="bfloat16")
    got = train(learner, World())
    assert seen and set(seen) == {(BF16, BF16)}
    assert {p.dtype for p in learner.policy.model.parameters()} == {torch.float32}
    learner.forward_backward(step_batches(tiny_vl_model(), 0)[:1])
    assert {p.grad.dtype for p in learner.policy.model.parameters()} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in learner.optimizer.state.values())
    for a, b in zip(got["losses"], ref["losses"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_fsdp_under_the_gpu_precision_policy_gathers_bf16_and_keeps_fp32_shards(path, tmp_path):
    ref = train(build("hf", path, World()), World())
    ranks = spawn(tmp_path, "fsdp", path, compute="bfloat16")
    for r, got in enumerate(ranks):
        assert got["loss_dtypes"] and set(got["loss_dtypes"]) == {(BF16, BF16)} and got["master"] == {torch.float32}
        for step, losses in enumerate(got["losses"]):  # rank r ran micro-batches r, r + 2, ...
            torch.testing.assert_close(losses, ref["losses"][step][r :: len(ranks)], rtol=2e-2, atol=2e-3)
