"""``bench/gpu.sh`` and the benches it runs, without a GPU: the stage budgets fit the lease and are
the ones ``docs/performance.md`` shows; every bench keeps what it measured when a row fails or the
stage is stopped (results written as they go, failed rows recorded with their error); the
megatron-tp check fails on a wrong gradient. The stages themselves run in ``bench/gpu.sh --dry-run``
(CI)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
GPU_SH = (BENCH / "gpu.sh").read_text()
sys.path.insert(0, str(BENCH))  # the benches import results_file, scaling, trl_peer from beside them


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
    spec.loader.exec_module(module)
    return module


def budgets() -> dict[str, tuple[int, int]]:
    """gpu.sh's BUDGETS block: stage -> (GPU seconds, dry-run seconds)."""
    block = re.search(r'^BUDGETS="\n(.*?)^"', GPU_SH, re.S | re.M)
    assert block, "bench/gpu.sh has no BUDGETS=\"...\" block"
    rows = [line.split() for line in block.group(1).splitlines() if line.strip()]
    assert all(len(r) == 3 for r in rows), rows
    return {name: (int(gpu), int(dry)) for name, gpu, dry in rows}


def budget_cap() -> int:
    return int(re.search(r"^BUDGET_S=\$\{BUDGET_S:-(\d+)\}", GPU_SH, re.M).group(1))


def test_stage_budgets_fit_the_cap():
    table, cap = budgets(), budget_cap()
    assert sum(gpu for gpu, _ in table.values()) <= cap, f"GPU budgets add up to more than BUDGET_S = {cap}"
    assert sum(dry for _, dry in table.values()) <= cap, f"dry-run budgets add up to more than BUDGET_S = {cap}"


def test_every_stage_has_a_budget_and_runs_in_both_modes():
    branches = re.search(r'if \[ "\$MODE" = gpu \]; then\n(\s+stage .*?)\nelse\n(.*?)\nfi\n', GPU_SH, re.S)
    assert branches, "bench/gpu.sh: no 'if [ \"$MODE\" = gpu ]; then stage ... else ... fi' block"
    for branch in branches.groups():
        assert re.findall(r"^\s*stage ([\w-]+) ", branch, re.M) == list(budgets())  # same stages, the table's order


def test_the_docs_budget_table_is_the_script_s():
    doc = (ROOT / "docs" / "performance.md").read_text()
    section = doc[doc.index("## GPU checks in one call"):]
    shown = {m[0]: int(m[1]) for m in re.findall(r"^\| `([\w-]+)` \| (\d+) \|", section, re.M)}
    assert shown == {name: gpu for name, (gpu, _) in budgets().items()}, "docs/performance.md's budget table is stale"
    assert f"BUDGET_S = {budget_cap()} s" in section
    assert f"add up to {sum(shown.values())} s" in " ".join(section.split()), "docs/performance.md's budget sum is stale"


def test_results_file_is_replaced_whole_and_says_whether_complete(tmp_path):
    from results_file import ResultsFile, error_line

    out = ResultsFile(tmp_path / "r.json")
    out.write({"rows": [1]}, complete=False)
    assert json.loads(out.path.read_text())["complete"] is False
    out.write({"rows": [1, 2]}, complete=True)
    data = json.loads(out.path.read_text())
    assert data["rows"] == [1, 2] and data["complete"] is True and "commit" in data["provenance"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    assert error_line(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")) == \
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_kernels_bench_records_a_failing_method_and_measures_the_rest(tmp_path, monkeypatch):
    kernels = _load("kernels")
    ours = kernels._ours

    def failing(backend):
        if backend == "reference":
            def run(x):
                raise torch.OutOfMemoryError("CUDA out of memory. (the test's)")
            return run
        return ours(backend)

    monkeypatch.setattr(kernels, "_ours", failing)
    assert kernels.main(["--quick", "--tokens", "16", "--reps", "1", "--out", str(tmp_path / "k.json")]) == 1
    data = json.loads((tmp_path / "k.json").read_text())
    assert data["complete"] is True
    rows = {(r["inputs"], r["method"]): r for r in data["results"]}
    assert set(rows) == {(kernels.BF16, "torch"), (kernels.BF16, "eager"), (kernels.BF16, "floor"),
                         (kernels.FP32, "torch"), (kernels.FP32, "floor")}  # fmt: skip
    assert rows[kernels.BF16, "eager"]["error"] == "OutOfMemoryError: CUDA out of memory. (the test's)"
    assert all(r["ms"] > 0 for k, r in rows.items() if k[1] != "eager")
    assert rows[kernels.BF16, "torch"]["dtype"] == "torch.bfloat16" and rows[kernels.FP32, "torch"]["dtype"] == "torch.float32"
    fp32 = next(s for s in data["summary"] if s["inputs"] == kernels.FP32)
    assert set(fp32) >= {"torch/floor", "torch/torch bf16 inputs"}


def test_update_bench_records_failed_layouts_and_keeps_the_others(tmp_path, monkeypatch, capsys):
    update = _load("update")
    measured = {"g": 2, "s_per_update": 2.0, "times": [2.0], "peak_bytes": 100, "micro_batches": 1, "sequences": 6,
                "completion_tokens": 60, "tokens": 600, "padded_tokens": 700, "vision_images": 6}  # fmt: skip

    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if "--worker" not in cmd:  # git, for the provenance
            return real_run(cmd, **kwargs)
        layout = cmd[cmd.index("--worker") + 1]
        if layout == "padded":
            return subprocess.CompletedProcess(cmd, 0, json.dumps(measured | {"layout": layout}), "")
        if layout == "packed":  # the worker caught it and said so
            return subprocess.CompletedProcess(cmd, 1, json.dumps({"layout": layout, "g": 2, "error": "OutOfMemoryError: x"}),
                                               "Traceback ...\ntorch.OutOfMemoryError: x")  # fmt: skip
        return subprocess.CompletedProcess(cmd, -9, "", "")  # killed without a word

    monkeypatch.setattr(update.subprocess, "run", fake_run)
    assert update.main(["--quick", "--out", str(tmp_path / "u.json")]) == 1
    data = json.loads((tmp_path / "u.json").read_text())
    padded, packed, vision, shared = data["results"]
    assert data["complete"] is True and padded["time_vs_padded"] == 1.0
    assert packed["error"] == "OutOfMemoryError: x" and "torch.OutOfMemoryError" in packed["stderr_tail"]
    assert vision["error"] == shared["error"] == "worker died (killed by signal 9) without a result"

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(update, "worker", oom)
    capsys.readouterr()
    assert update.main(["--quick", "--worker", "padded", "--g", "2"]) == 1
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row == {"layout": "padded", "g": 2, "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"}


def test_throughput_reports_each_finished_or_failed_point(monkeypatch):
    throughput = _load("throughput")

    class FakeWorker:
        def __init__(self, point, base):
            if point.name == "broken":
                raise RuntimeError("broken failed: OutOfMemoryError")
            self.point, self.remaining = point, len(point.schedule)

        def step(self):
            self.remaining -= 1

        def close(self):
            pass

    monkeypatch.setattr(throughput, "Worker", FakeWorker)
    points = [throughput.Point(n, "engine", [], schedule=[(0, True), (1, True)]) for n in ("engine", "broken", "trl")]
    seen = []
    done, failed = throughput.run_points(points, {}, interleaved=False,
                                         on_point=lambda d, f: seen.append((sorted(d), sorted(f))))  # fmt: skip
    assert seen == [(["engine"], []), (["engine"], ["broken"]), (["engine", "trl"], ["broken"])]
    assert sorted(done) == ["engine", "trl"] and failed == {"broken": "broken failed: OutOfMemoryError"}


def test_megatron_tp_check_fails_on_a_wrong_gradient():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
    from engine_testing.megatron import tiny_vl_model

    from visurf_engine.learners.megatron.convert import Layout, hf_to_megatron

    megatron_tp = _load("megatron_tp")
    model = tiny_vl_model()
    grads = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    weights = model.state_dict()
    ref = {"losses": torch.tensor([0.5, -0.25]), "norm": 2.0, "grads": grads, "weights": weights}
    rank = {"losses": ref["losses"].clone(), "norm": 2.0, "weights": weights,
            "grads": hf_to_megatron(grads, Layout.from_hf_config(model.config, 1, 1), 0, 0)}  # fmt: skip
    assert all(c["ok"] for c in megatron_tp.compare([rank], ref, 1, model.config))
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    ref["grads"] = grads | {name: grads[name] * (1 + 1e-3)}
    bad = [c["check"] for c in megatron_tp.compare([rank], ref, 1, model.config) if not c["ok"]]
    assert bad == ["gradients (max |d| / max |ref|, worst tensor)"]
