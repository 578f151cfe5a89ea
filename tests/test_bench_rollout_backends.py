"""bench/rollout_backends.py: the ladder's syntax, where the crossover is read, and a smoke run of
the HF backends on the tiny model (vLLM's side runs in the vLLM environment)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
spec = importlib.util.spec_from_file_location("bench_rollout_backends", BENCH / "rollout_backends.py")
bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_ladder_syntax():
    assert bench.parse_ladder("tiny, 3b:2:1,7b:1:1") == [("tiny", None, None, None), ("3b:2:1", "qwen2.5-vl-3b", 2, 1),
                                                         ("7b:1:1", "qwen2.5-vl-7b", 1, 1)]  # fmt: skip
    for bad in ("3b:2", "13b:1:1", "3b:0:1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--ladder"):
            bench.parse_ladder(bad)


def model(name: str, params: int, vllm_s: float, loop_s: float) -> dict:
    timing = lambda s: {"rollout_s": [s, s], "sync_s": [0.0, 0.0], "tokens": [100, 100]}  # noqa: E731
    return {"model": name, "params": params, "backends": {"vllm": timing(vllm_s), "hf-loop": timing(loop_s)}}


def test_the_crossover_is_where_vllm_wins_from_there_up():
    ladder = [model("a", 1, 2.0, 1.0), model("b", 10, 0.5, 1.0), model("c", 100, 2.0, 1.0), model("d", 1000, 0.5, 1.0),
              model("e", 10_000, 0.4, 1.0)]  # fmt: skip
    assert bench.crossover(ladder) == {"model": "d", "params": 1000, "below": "c"}  # b's win is not kept above it
    assert bench.crossover(ladder[3:]) == {"model": "d", "params": 1000, "below": None}
    assert "still faster at the largest model, c" in bench.crossover(ladder[:3])["reason"]
    ladder[1]["backends"]["vllm"] = {"error": "OutOfMemoryError: ..."}
    assert bench.crossover(ladder)["model"] is None


def test_quick_smoke_run_of_the_hf_backends(tmp_path, capsys):
    out, threads = tmp_path / "r.json", torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--backends", "hf-loop,hf-generate", "--threads", "1", "--out", str(out),
                           "train.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=4"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the bench sets the process's
    result = json.loads(out.read_text())
    assert result["complete"] and result["provenance"]["command"] and result["batch"]["prompts"] == 2
    (tiny,) = result["models"]
    assert tiny["params"] == 1_148_864 and set(tiny["backends"]) == {"hf-loop", "hf-generate"}
    assert all(len(r["rollout_s"]) == 1 and 0 < r["tokens"][0] <= 2 * 2 * 4 for r in tiny["backends"].values())
    assert [r["backend"] for r in result["table"]] == ["hf-loop", "hf-generate"]
    assert result["crossover"] == {"model": None, "reason": "vLLM not timed"}
    assert "crossover: none on this ladder (vLLM not timed)" in capsys.readouterr().out


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--backends", "hf-loop,sglang"])
    assert "--backends: unknown sglang" in capsys.readouterr().err
    assert bench.main(["--quick", "rollout.nn=4"]) == 2
    assert "unknown config key 'rollout.nn'" in capsys.readouterr().err
