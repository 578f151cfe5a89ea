"""The comparison driver end to end on a two-step budget: every configuration of
``configs/compare_shapes.yaml`` with one seed, the report and results page, skip, resume,
and refusal of a run directory that holds another config. Runs are made cheap with the
tiny settings of ``engine_testing.runs``."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from visurf_engine.config import ConfigError

# Imported lazily, by the fixtures below: ``visurf_engine.compare`` and ``engine_testing.runs`` import
# transformers, which imports Triton, and a Triton imported while this module is collected
# (before test_kernels_triton.py sets TRITON_INTERPRET=1) cannot run its interpreted kernels.


@pytest.fixture(scope="module")
def compare():
    return importlib.import_module("visurf_engine.compare")


@pytest.fixture(scope="module")
def small():
    """``engine_testing.runs.SMALL``: the tiny run settings (importing it registers their reward)."""
    return importlib.import_module("engine_testing.runs").SMALL


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("base-cache"))


REPO_PLAN = Path(__file__).resolve().parent.parent / "configs" / "compare_shapes.yaml"
FIVE_SEEDS = ["sft", "rlvr", "sft_then_rlvr", "visurf", "luffy", "chord", "dft", "hpt", "visurf_gold_dft"]
THREE_SEEDS = ["rlvr_kl", "sft_then_rlvr_kl", "visurf_kl", "visurf_no_align", "visurf_no_eliminate", "visurf_no_smooth"]
CONFIGS = FIVE_SEEDS + THREE_SEEDS  # the paper's paradigms and the single-stage family get 5 seeds; KL and ablations 3


@pytest.fixture(scope="module")
def cli(small, cache):
    def args(out, *extra):
        """The repo's comparison with one seed, two steps and the tiny settings, reporting into ``out``."""
        return [
            "--config", str(REPO_PLAN), "--seeds", "0", "--output-dir", str(out / "runs"),
            "--docs", str(out / "docs" / "results.md"), *small, f"warmstart.cache_dir={cache}",
            "train.steps=2", "train.eval_every=1", "train.save_every=1", "data.probe_size=4", *extra,
        ]
    return args


@pytest.fixture(scope="module")
def compared(compare, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert compare.main(cli(out)) == 0
    return out


def test_every_configuration_runs_and_is_reported(compared):
    runs = compared / "runs"
    assert sorted(p.name for p in runs.iterdir() if p.name != "report") == sorted(CONFIGS)
    for name in CONFIGS:
        result = json.loads((runs / name / "seed0" / "result.json").read_text())
        assert result["name"] == name and result["seed"] == 0 and result["steps"] == 2 and result["resumed_from_step"] == 0
        assert {"giou", "n_acc", "bbox_acc", "probe_acc", "probe_acc/count"} <= set(result["final"])
        assert result["base"] == json.loads((runs / "visurf" / "seed0" / "result.json").read_text())["base"]  # one base model
        assert result["wall_s"] > 0 and result["config"]["train"]["seed"] == 0
        evals = [json.loads(l) for l in (runs / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals if "eval/probe_acc" in e] == [0, 1, 2]  # base, eval_every, final
    ablations = {n: json.loads((runs / n / "seed0" / "result.json").read_text())["config"]["algo"] for n in CONFIGS}
    assert ablations["visurf_no_align"]["align"] is False and ablations["visurf"]["align"] is True
    assert ablations["visurf_no_smooth"]["smooth"] is False and ablations["visurf_no_eliminate"]["eliminate"] is False
    assert ablations["sft_then_rlvr"]["paradigm"] == "sft_then_rlvr"
    assert ablations["visurf_gold_dft"]["gold_loss"] == "dft" and ablations["luffy"]["paradigm"] == "luffy"

    report = json.loads((runs / "report" / "results.json").read_text())
    assert list(report["summary"]["configs"]) == CONFIGS
    visurf = json.loads((runs / "visurf" / "seed0" / "result.json").read_text())
    assert report["summary"]["configs"]["visurf"]["giou"]["mean"] == pytest.approx(visurf["final"]["giou"])
    assert report["summary"]["configs"]["visurf"]["giou"]["std"] is None  # one seed
    assert report["provenance"]["command"].startswith("python -m visurf_engine.compare --config ")
    def session(prov):  # the provenance without the torch threads (a run's are its train.threads)
        return {k: v for k, v in prov.items() if k != "threads"}

    assert session(visurf["provenance"]) == session(report["provenance"])  # the session that trained it
    assert visurf["provenance"]["threads"]["torch"] == visurf["config"]["train"]["threads"] == 1  # the plan's one thread
    for figure in report["figures"].values():
        with Image.open(figure) as im:
            assert im.format == "PNG" and min(im.size) >= 400
    table = (runs / "report" / "results.md").read_text()
    assert all(f"| {n} |" in table for n in CONFIGS)
    page = (compared / "docs" / "results.md").read_text()
    assert "## Reading" in page and "| visurf_no_smooth |" in page
    assert (compared / "docs" / "results" / "training_curves.png").is_file()


def test_finished_runs_are_skipped(compare, cli, compared, monkeypatch):
    monkeypatch.setattr(compare, "Trainer", None)  # any training attempt would fail
    stamps = {p: p.stat().st_mtime_ns for p in (compared / "runs").glob("*/seed0/result.json")}
    assert compare.main(cli(compared)) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (compared / "runs").glob("*/seed0/result.json")}
    assert compare.main(cli(compared, "--report-only", "--runs", "visurf,rlvr")) == 0
    report = json.loads((compared / "runs" / "report" / "results.json").read_text())
    assert list(report["summary"]["configs"]) == ["rlvr", "visurf"]


def test_a_config_change_is_refused(compare, cli, compared, capsys):
    assert compare.main(cli(compared, "--runs", "rlvr", "train.lr=0.5")) == 2
    err = capsys.readouterr().err
    assert "run rlvr (seed 0)" in err and "different config (train.lr)" in err


def test_a_setting_added_since_a_run_is_not_a_difference(compare):
    """A result made before a setting existed (or after one was removed) still matches; a changed value does not."""
    want = {"train": {"lr": 0.1, "threads": None}, "data": {"seed": 1}}
    assert compare.differences(want, {"train": {"lr": 0.1}, "data": {"seed": 1, "gone": 2}}) == []
    assert compare.differences(want, {"train": {"lr": 0.2, "threads": 2}}) == ["train.lr", "train.threads"]


def test_an_interrupted_run_resumes(compare, cli, tmp_path, monkeypatch):
    Trainer = compare.Trainer
    real_step = Trainer.step

    def crash_on_second(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "step", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        compare.main(cli(tmp_path, "--runs", "visurf", "--no-docs"))
    run = tmp_path / "runs" / "visurf" / "seed0"
    assert (run / "checkpoints" / "latest").read_text() == "step_000001" and not (run / "result.json").exists()
    monkeypatch.setattr(Trainer, "step", real_step)
    assert compare.main(cli(tmp_path, "--runs", "visurf", "--no-docs")) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from_step"] == 1 and math.isfinite(result["final"]["giou"])
    assert not (tmp_path / "docs").exists()


def test_bad_comparison_files(compare, tmp_path):
    def plan(body):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    with pytest.raises(ConfigError, match="compare.colour"):
        compare.load_plan(plan({"compare": {"runs": {"a": []}, "colour": 1}}))
    with pytest.raises(ConfigError, match="compare.seeds"):
        compare.load_plan(plan({"compare": {"runs": {"a": []}, "seeds": [1, 1]}}))
    with pytest.raises(ConfigError, match="not a valid run name"):
        compare.load_plan(plan({"compare": {"runs": {"a/b": []}}}))
    with pytest.raises(ConfigError, match=r"compare.runs.a.seeds"):
        compare.load_plan(plan({"compare": {"runs": {"a": {"overrides": [], "seeds": []}}}}))
    with pytest.raises(ConfigError, match=r"compare.runs.a: expected keys overrides"):
        compare.load_plan(plan({"compare": {"runs": {"a": {"seeds": [0]}}}}))
    own = compare.load_plan(plan({"compare": {"seeds": [0, 1, 2], "runs": {"a": [], "b": {"overrides": [], "seeds": [1, 2]}}}}))
    assert [(j.name, j.seed) for j in compare.make_jobs(own)] == [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    own.only_seeds([2])
    assert [(j.name, j.seed) for j in compare.make_jobs(own)] == [("a", 2), ("b", 2)]
    p = compare.load_plan(plan({"compare": {"runs": {"a": ["algo.paradigmm=sft"]}}}))
    with pytest.raises(ConfigError, match=r"run a \(seed 0\).*algo.paradigmm"):
        compare.make_jobs(p)
    assert compare.main(["--config", str(plan({"compare": {"runs": {"a": []}}})), "--runs", "b"]) == 2
    own_only = plan({"compare": {"seeds": [0, 1], "runs": {"a": {"overrides": [], "seeds": [0]}}}})
    assert compare.main(["--config", str(own_only), "--seeds", "1"]) == 2  # no job left: an error, not a crash


def test_repo_plan_covers_the_issue(compare):
    plan = compare.load_plan(REPO_PLAN)
    assert list(plan.runs) == CONFIGS and len(plan.seeds) == 5
    assert all(plan.seeds_of(n) == [0, 1, 2] for n in THREE_SEEDS)
    assert all(plan.seeds_of(n) == plan.seeds for n in FIVE_SEEDS)
    jobs = compare.make_jobs(plan)
    assert len(jobs) == 9 * 5 + 6 * 3
    assert plan.config["algo"]["kl_coef"] == 0  # the default's, the paper's objective
    assert {(j.cfg.algo.paradigm, j.cfg.algo.align, j.cfg.algo.eliminate, j.cfg.algo.smooth, j.cfg.algo.kl_coef,
             j.cfg.algo.gold_loss) for j in jobs} == {
        ("sft", True, True, True, 0, "ppo"), ("rlvr", True, True, True, 0, "ppo"), ("sft_then_rlvr", True, True, True, 0, "ppo"),
        ("visurf", True, True, True, 0, "ppo"), ("rlvr", True, True, True, 0.05, "ppo"),
        ("sft_then_rlvr", True, True, True, 0.05, "ppo"), ("visurf", True, True, True, 0.05, "ppo"),
        ("visurf", False, True, True, 0, "ppo"), ("visurf", True, False, True, 0, "ppo"), ("visurf", True, True, False, 0, "ppo"),
        ("luffy", True, True, True, 0, "ppo"), ("chord", True, True, True, 0, "ppo"), ("dft", True, True, True, 0, "ppo"),
        ("hpt", True, True, True, 0, "ppo"), ("visurf", True, True, True, 0, "dft"),
    }  # every RL paradigm without the KL term and with the previous default's; the family on the same settings
    assert len({(j.cfg.train.steps, j.cfg.data.seed, j.cfg.data.probe_size, j.cfg.train.threads) for j in jobs}) == 1  # same budget, data, threads
    assert jobs[0].cfg.train.threads == 1  # two runs side by side on 2 cores
    assert jobs[0].cfg.data.probe_size > 0 and jobs[0].cfg.train.eval_every > 0
