"""bench/throughput.py's pure parts: the step schedules (SFT->RLVR split as in a real run), the
fitted growth of a sweep, and the command line's errors. The bench end to end runs in
``bench/gpu.sh --dry-run`` (CI)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from visurf_engine.algo.paradigms import get_paradigm
from visurf_engine.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


throughput, scaling = _load("throughput"), _load("scaling")


def test_schedule_of_a_single_paradigm():
    plan, extra = throughput.schedule(load_config(None, ["algo.paradigm=rlvr"]), steps=3, warmup=2)
    assert plan == [(0, False), (1, False), (2, True), (3, True), (4, True)] and extra == ["train.steps=5"]


@pytest.mark.parametrize("overrides, steps, n_sft", [([], 4, 2), (["algo.sft_steps=100", "train.steps=400"], 8, 2)])
def test_sft_then_rlvr_measures_both_stages_in_the_run_s_split(overrides, steps, n_sft):
    cfg = load_config(None, ["algo.paradigm=sft_then_rlvr", *overrides])
    plan, extra = throughput.schedule(cfg, steps=steps, warmup=1)
    s = 1 + n_sft
    assert extra == [f"algo.sft_steps={s}", f"train.steps={len(plan)}"]
    run = load_config(None, ["algo.paradigm=sft_then_rlvr", *overrides, *extra])  # a valid config
    phases = [get_paradigm("sft_then_rlvr").phase(i, run.algo.sft_steps).name for i, _ in plan]
    measured = [p for (_, m), p in zip(plan, phases) if m]
    assert measured.count("sft") == n_sft and measured.count("rlvr") == steps - n_sft
    assert [m for (_, m), p in zip(plan, phases) if p == "rlvr"][0] is False  # the RL stage warms up too
    assert [i for i, _ in plan] == sorted(i for i, _ in plan)  # in order, as a real run


def test_fit_growth():
    linear = scaling.fit_growth([4, 8, 16], [3 * x + 1e-9 for x in (4, 8, 16)])
    assert linear["power"]["k"] == pytest.approx(1.0, abs=1e-6) and linear["linear"]["r2"] == pytest.approx(1.0)
    assert linear["bend"] is None
    bent = scaling.fit_growth([1, 2, 4, 8], [1.0, 2.0, 4.0, 4.4])
    assert bent["local_exponents"][0] == pytest.approx(1.0) and bent["bend"] == 4.0
    assert "bends at 4" in scaling.describe(bent)


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "rollout.n"], "expected KEY=V1,V2"),
    (["--sweep", "rollout.n=4"], "two or more numeric values"),
    (["--paradigms", "sft,grpo"], "unknown grpo"),
    (["--paradigms", "rlvr,visurf", "--peer", "trl"], "choose one mode"),
    (["--image-pixels", "1000"], "needs --random-init"),
])  # fmt: skip
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bad_config_key_is_named(capsys):
    assert throughput.main(["rollout.nn=4"]) == 2
    assert "unknown config key 'rollout.nn'" in capsys.readouterr().err


def test_sft_then_rlvr_needs_two_measured_steps():
    with pytest.raises(throughput.ConfigError, match="needs --steps >= 2"):
        throughput.schedule(load_config(None, ["algo.paradigm=sft_then_rlvr"]), steps=1, warmup=1)


def test_trl_micro_batches_fit_the_engine_token_budget():
    pytest.importorskip("trl")
    trl_peer = _load("trl_peer")
    assert trl_peer.micro_rows(32, 106, 8192) == 32  # the tiny default: one forward, as the engine's one packed row
    assert trl_peer.micro_rows(32, 428, 8192) == 16  # 3B, 448 px, 128 tokens: two forwards
    assert trl_peer.micro_rows(12, 5000, 8192) == 1  # a row longer than half the budget: one row a forward
    assert trl_peer.LOSS_TYPE["token-mean"] == "dapo"  # token-mean over the generation batch, as the engine's
