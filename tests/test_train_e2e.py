"""End to end on the tiny preset: every paradigm runs a few steps, resume is bit-exact, and a
trainer is built on a prepared base model without training anything itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from engine_testing.runs import SMALL, small_cfg

from visurf_engine.learners import HFLearner
from visurf_engine.tasks import prepare_base_model
from visurf_engine.train import main
from visurf_engine.trainer import Trainer


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf", "sft_then_rlvr", "luffy", "chord", "dft", "hpt",
                                      "visurf-gold_loss=dft"])  # fmt: skip
def test_paradigm_runs_and_writes_metrics_and_checkpoint(paradigm, cache, tmp_path):
    paradigm, *extra = paradigm.split("-")
    extra = [f"algo.{e}" for e in extra] + (["algo.hpt_threshold=0.5"] if paradigm == "hpt" else [])
    cfg = small_cfg(cache, tmp_path, f"algo.paradigm={paradigm}", "train.steps=2", "train.save_every=1", *extra)
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    results = trainer.run()
    after = trainer.policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2]
    assert all(math.isfinite(l["loss"]) and math.isfinite(l["grad_norm"]) for l in steps)
    if paradigm in ("rlvr", "visurf"):
        assert all("reward/rollout_mean" in l and "entropy" in l for l in steps)
    if paradigm == "visurf":
        assert all({"reward/gold", "adv/gold", "gold/smooth_rate"} <= set(l) for l in steps)
    if paradigm == "sft_then_rlvr":
        assert [l["phase/sft"] for l in steps] == [1.0, 0.0]
    for l in steps:  # token counts and per-phase time / peak memory (bench/throughput.py reads them)
        sft = l["phase/sft"] == 1.0 or paradigm in ("sft", "dft")
        assert (l["tokens/generated"] == 0) == sft
        assert (l["members/gold"] == 0) == (paradigm == "rlvr" or paradigm == "sft_then_rlvr" and not l["phase/sft"])
        if paradigm != "hpt":  # hpt trains the rollouts or the gold of each prompt
            assert (l["tokens/trained"] > l["tokens/generated"]) == (l["members/gold"] > 0)
    if paradigm == "chord":
        assert [round(l["loss/sft_scale"], 4) for l in steps] == [0.9, round(0.9 - 0.85 / 200, 4)]
        assert l["tokens/prompt"] > 0 and l["mem/step"] >= l["mem/update"] > 0 and "time/update" in l
        assert ("time/rollout" in l) != sft
    assert {"giou", "n_acc", "bbox_acc"} <= set(results["final"]) and set(results["base"]) == set(results["final"])
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000002"
    saved = load_file(str(ckpts / "step_000002" / "model.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert (tmp_path / "tensorboard").is_dir()


def test_updates_per_step_time_their_old_logprob_pass(cache, tmp_path):
    trainer = Trainer(small_cfg(cache, tmp_path, "algo.paradigm=visurf", "algo.updates_per_step=2", "train.steps=1"))
    trainer.policy.model.train()
    m = trainer.step(0)
    assert m["time/old_logprobs"] > 0 and m["mem/old_logprobs"] > 0 and math.isfinite(m["loss"])


def test_resume_is_bit_exact(cache, tmp_path):
    full = Trainer(small_cfg(cache, tmp_path / "full", "train.steps=4", "train.save_every=2"))
    full.run()
    first = Trainer(small_cfg(cache, tmp_path / "split", "train.steps=2"))
    first.run()
    second = Trainer(small_cfg(cache, tmp_path / "split", "train.steps=4", "train.save_every=2", "train.resume=true"))
    assert second.start_step == 2
    second.run()
    a, b = full.policy.model.state_dict(), second.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], first.policy.model.state_dict()[k]) for k in a)  # steps 3-4 did train


def test_existing_run_is_not_overwritten(cache, tmp_path):
    Trainer(small_cfg(cache, tmp_path, "train.steps=1")).run()
    with pytest.raises(FileExistsError, match="train.resume=true"):
        Trainer(small_cfg(cache, tmp_path, "train.steps=1"))


def test_cli_prints_table_and_rejects_bad_keys(cache, tmp_path, capsys):
    args = SMALL + [f"warmstart.cache_dir={cache}", f"train.output_dir={tmp_path}", "train.steps=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| metric | base | final |" in out and "| n_acc |" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["final"]["parse_rate"] >= 0 and saved["wall_s"] > 0 and saved["base_model_s"] >= 0
    assert saved["provenance"]["commit"] is None or len(saved["provenance"]["commit"]) == 40
    assert main(["algo.paradigmm=sft"]) == 2
    assert "unknown config key 'algo.paradigmm'" in capsys.readouterr().err


def test_trainer_on_a_prepared_base_model_trains_nothing(cache, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(HFLearner, "step", lambda self, clip: steps.append(clip) or 0.0)
    trainer = Trainer(small_cfg(cache, tmp_path, "train.steps=1"))
    assert steps == [] and trainer.start_step == 0
    assert not (tmp_path / "checkpoints").exists()


def test_train_threads_sets_torch_threads(cache, tmp_path):
    """``train.threads`` is the run's torch thread count; null leaves torch's as it is."""
    threads = torch.get_num_threads()
    try:
        Trainer(small_cfg(cache, tmp_path / "a", "train.threads=1"))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        Trainer(small_cfg(cache, tmp_path / "b"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_trainer_without_a_base_model_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_base_model"):
        Trainer(small_cfg(tmp_path / "empty-cache", tmp_path / "run"))


def test_kl_penalty_against_the_frozen_base_model(cache, tmp_path):
    from visurf_engine.models.hf import load_pretrained

    cfg = small_cfg(cache, tmp_path, "train.steps=2", "algo.kl_coef=0.1", "algo.kl_estimator=k3")
    trainer = Trainer(cfg)
    base = load_pretrained(prepare_base_model(cfg))[0].state_dict()
    trainer.run()
    steps = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert all(math.isfinite(s["kl"]) and s["kl"] >= 0 for s in steps) and "time/reference" in steps[0]
    ref, pol = trainer.reference.model.state_dict(), trainer.policy.model.state_dict()
    assert set(ref) == set(base) and all(torch.equal(ref[k], base[k]) for k in base)  # the reference stayed the base model
    assert any(not torch.equal(pol[k], ref[k]) for k in ref)  # while the policy trained
    assert Trainer(small_cfg(cache, tmp_path / "nokl", "train.steps=1", "algo.kl_coef=0")).reference is None  # no reference pass
