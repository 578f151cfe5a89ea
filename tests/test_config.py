"""Config: YAML + key=value overrides, typed, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from visurf_engine.config import ConfigError, load_config


def test_defaults_are_the_embedded_visurf_run():
    cfg = load_config()
    assert cfg.algo.paradigm == "visurf" and cfg.data.task == "shapes" and cfg.model.path is None
    assert cfg.algo.align and cfg.algo.eliminate and cfg.algo.smooth


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  paradigm: rlvr\n  eps_high: 0.28\ntrain:\n  steps: 7\n  betas: [0.9, 0.95]\n")
    cfg = load_config(f, ["train.steps=9", "algo.dual_clip=3", "model.path=null", "train.lr=3e-4"])
    assert cfg.algo.paradigm == "rlvr" and cfg.algo.eps_high == 0.28
    assert cfg.train.steps == 9 and cfg.train.betas == (0.9, 0.95) and cfg.train.lr == 3e-4
    assert cfg.algo.dual_clip == 3.0 and isinstance(cfg.algo.dual_clip, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.paradigm=ppo", "algo.paradigm: 'ppo' is not one of"),
        ("algo.paradim=rlvr", "unknown config key 'algo.paradim'"),
        ("optim.lr=1", "unknown config key 'optim'"),
        ("train.steps=ten", "train.steps: expected int"),
        ("train.steps=1.5", "train.steps: expected int"),
        ("algo.smooth=1", "algo.smooth: expected bool"),
        ("train.steps=0", "train.steps: must be > 0"),
        ("algo.dual_clip=0.5", "algo.dual_clip: must be > 1"),
        ("train.betas=[0.9]", "train.betas: expected a list of 2"),
        ("algo=3", "algo: is a section"),
        ("train.lr", "expected key=value"),
        ("data.task=files", "data.train_path: required"),
        ("data.eval_split=0.1", "data.eval_split: a share in"),
        ("model.image_processor=fast", "model.image_processor: 'fast' is not one of native, hf"),
        ("rollout.backend=sglang", "rollout.backend: 'sglang' is not one of auto, hf, vllm"),
        ("rollout.vllm.dtype=fp8", "rollout.vllm.dtype: 'fp8' is not one of"),
        ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization: must be in (0, 1]"),
        ("rollout.vllm.enforce_eager=maybe", "rollout.vllm.enforce_eager: expected bool"),
        ("rollout.vllm.kv_cache_space_gib=0", "rollout.vllm.kv_cache_space_gib: must be > 0"),
        ("rollout.vllm.sleep_level=3", "rollout.vllm.sleep_level: 3 is not one of 1, 2"),
        ("rollout.hf.replica=1", "rollout.hf.replica: expected bool"),
        ("algo.rollout_correction=is", "algo.rollout_correction: 'is' is not one of none, tis"),
        ("algo.tis_cap=0", "algo.tis_cap: must be > 0"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace("]", r"\]")):
        load_config(None, [override])


def test_bad_yaml_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  n: four\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: rollout.n: expected int"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_vllm_section_and_the_tis_loss_spec():
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm.max_model_len=300", "algo.rollout_correction=tis",
                             "algo.tis_cap=3"])  # fmt: skip
    assert cfg.rollout.vllm.max_model_len == 300 and cfg.loss_spec().tis_cap == 3.0
    assert load_config().loss_spec().tis_cap is None  # the default loss is unchanged
    with pytest.raises(ConfigError, match=r"rollout.vllm.max_model_len: must exceed the generation budget \(48 tokens\)"):
        load_config(None, ["rollout.backend=vllm", "rollout.vllm.max_model_len=48"])
    load_config(None, ["rollout.vllm.max_model_len=48"])  # only checked when vLLM generates


def test_files_task_needs_an_eval_path_or_an_eval_split():
    files = ["data.task=files", "data.train_path=t.parquet"]
    with pytest.raises(ConfigError, match="data.eval_path: required when data.task=files, unless data.eval_split"):
        load_config(None, files)
    assert load_config(None, [*files, "data.eval_split=0.05"]).data.eval_split == 0.05
    assert load_config(None, [*files, "data.eval_path=e.parquet"]).data.eval_split is None
    for bad in ("data.eval_split=0", "data.eval_split=1.5", "data.eval_path=e.parquet"):
        with pytest.raises(ConfigError, match="data.eval_split: a share in"):
            load_config(None, [*files, "data.eval_split=0.05", bad] if bad.startswith("data.eval_path") else [*files, bad])


def test_sft_then_rlvr_split_must_fit():
    with pytest.raises(ConfigError, match="algo.sft_steps"):
        load_config(None, ["algo.paradigm=sft_then_rlvr", "train.steps=4", "algo.sft_steps=4"])


def test_every_shipped_config_loads():
    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        if path.name != "compare_shapes.yaml":  # a comparison file, read by visurf_engine.compare
            load_config(path)
