"""ViSurf end to end with ``rollout.backend=vllm`` on the tiny preset (CPU, real vLLM).

A few steps in one process (finite loss, weights changed, the rollout/trainer mismatch logged,
checkpoint, and a resume that reproduces the uninterrupted run bit for bit); the TIS correction
on the same rollouts; the same run under torchrun on two gloo ranks (data parallel, one engine
per rank through vLLM's external launcher); and under ``model.backend=megatron parallel.tp=2``,
where the vLLM engines are fed from the gathered HF-named weights and the run follows the
single-process one step for step. Runs only where vLLM is installed (``VISURF_REQUIRE_VLLM=1``:
fails instead of skipping).
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_testing import require_vllm

require_vllm()

from engine_testing.runs import SMALL, step_metrics, torchrun  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from visurf_engine.config import load_config  # noqa: E402
from visurf_engine.rollout.vllm import VLLMRollout  # noqa: E402
from visurf_engine.tasks import prepare_base_model  # noqa: E402
from visurf_engine.trainer import Trainer  # noqa: E402

# the stock reward: torchrun's ranks do not see rewards registered by the tests
VLLM = [
    "rollout.backend=vllm", "rollout.vllm.max_model_len=256", "rollout.vllm.kv_cache_space_gib=0.25",
    "loss.backend=torch", "train.lr=1e-4", "data.probe_size=0", "data.reward=grounding",
]  # fmt: skip
# The trainer scores log softmax(z / T) over the whole vocabulary, vLLM the distribution it sampled
# from, with the 4 vision tokens suppressed: they differ by log(1 - p_suppressed), about 4 / 512
# on a barely trained tiny model (float32 kernels agree to ~1e-6: test_rollout_vllm.py).
MISMATCH = 0.05
METRIC_RTOL = 1e-4  # megatron vs hf, float32: see test_megatron_e2e.py


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vllm-base")
    args = SMALL + VLLM + [f"warmstart.cache_dir={cache}"]
    prepare_base_model(load_config(None, args))
    return args


def run(args, out, *extra) -> Trainer:
    trainer = Trainer(load_config(None, args + [f"train.output_dir={out}", *extra]))
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    """Three ViSurf steps in this process, with the weights before and after."""
    out = tmp_path_factory.mktemp("vllm-run")
    trainer = Trainer(load_config(None, args + [f"train.output_dir={out}", "train.steps=3", "train.save_every=3"]))
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    trainer.run()
    return out, trainer, before, {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}


def test_visurf_steps_train_log_the_mismatch_and_checkpoint(reference):
    out, trainer, before, after = reference
    assert isinstance(trainer.rollout, VLLMRollout)
    steps = step_metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["reward/rollout_mean"] > 0
        assert 0 < m["mismatch/logp_abs"] < MISMATCH and 0 <= m["mismatch/kl"] < MISMATCH**2
        assert "mismatch/tis_truncated" not in m
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    saved = load_file(str(out / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_resume_reproduces_the_uninterrupted_run(args, reference, tmp_path):
    """Stopped after step 2 and resumed (a new engine over the checkpoint, synced from the resumed
    weights), the run ends with exactly the uninterrupted run's weights."""
    run(args, tmp_path, "train.steps=2", "train.save_every=2")
    resumed = run(args, tmp_path, "train.steps=3", "train.save_every=3", "train.resume=true")
    assert resumed.start_step == 2
    after = reference[3]
    assert all(torch.equal(after[k], v) for k, v in resumed.policy.model.state_dict().items())
    assert [m["step"] for m in step_metrics(tmp_path)] == [1, 2, 3]


def test_tis_reweights_the_same_rollouts(args, reference, tmp_path):
    """The first step's rollouts are the plain run's; their ratios pi_old / pi_rollout sit just
    below 1 (the suppressed vision tokens): a cap at the typical ratio truncates some of them."""
    plain = step_metrics(reference[0])[0]
    cap = math.exp(-plain["mismatch/logp_abs"])
    run(args, tmp_path, "train.steps=1", "algo.rollout_correction=tis", f"algo.tis_cap={cap}")
    tis = step_metrics(tmp_path)[0]
    assert tis["reward/rollout_mean"] == plain["reward/rollout_mean"]  # same rollouts
    assert tis["mismatch/logp_abs"] == plain["mismatch/logp_abs"]
    assert 0 < tis["mismatch/tis_truncated"] < 1
    assert tis["loss"] != plain["loss"] and math.isfinite(tis["loss"])


def test_torchrun_two_ranks_train_checkpoint_and_resume(args, tmp_path):
    stdout = torchrun(args, tmp_path, "train.steps=2", "train.save_every=2")
    assert "| metric | base | final |" in stdout
    torchrun(args, tmp_path, "train.steps=3", "train.save_every=3", "train.resume=true")
    steps = step_metrics(tmp_path)
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["mismatch/logp_abs"] < MISMATCH for m in steps)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"


def test_megatron_tp2_feeds_vllm_and_follows_the_single_process_run(args, reference, tmp_path):
    pytest.importorskip("megatron.core")
    torchrun(args, tmp_path, "train.steps=3", "train.save_every=3", "model.backend=megatron", "parallel.tp=2")
    ref, got = step_metrics(reference[0]), step_metrics(tmp_path)
    assert [m["step"] for m in got] == [1, 2, 3]
    for r, g in zip(ref, got):
        for key in ("loss", "grad_norm", "entropy", "reward/rollout_mean", "reward/gold", "mismatch/logp_abs"):
            assert g[key] == pytest.approx(r[key], rel=METRIC_RTOL, abs=1e-6), (g["step"], key)
    from visurf_engine.export import read_weights

    saved = read_weights(tmp_path / "checkpoints" / "step_000003")  # every rank's master-weight slice, joined
    for k, w in reference[3].items():
        torch.testing.assert_close(saved[k], w, rtol=0, atol=3e-5, msg=k)


def test_fsdp_shards_feed_vllm_as_ddp_does(args, tmp_path):
    """Two ranks of ``model.backend=fsdp`` sync their shards into each rank's vLLM engine (layer by
    layer, ``SyncPlan.stream``) and follow the same two ranks under torch DDP, whose whole modules
    feed vLLM: each step's loss, grad norm, rewards and rollout/trainer mismatch (the post-sync
    engine's log-probs against the trainer's) agree to float32 tolerance."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(args, ddp, "train.steps=3", "train.save_every=3")
    torchrun(args, fsdp, "train.steps=3", "train.save_every=3", "model.backend=fsdp")
    want, got = step_metrics(ddp), step_metrics(fsdp)
    assert [m["step"] for m in got] == [1, 2, 3]
    for r, g in zip(want, got):
        for key in ("loss", "grad_norm", "reward/rollout_mean", "reward/gold", "mismatch/logp_abs"):
            assert g[key] == pytest.approx(r[key], rel=METRIC_RTOL, abs=1e-6), (g["step"], key)
