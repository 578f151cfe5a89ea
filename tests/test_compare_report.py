"""Report writers on fixed inputs: mean/std, the tables, the correlation, the PNGs, the results page."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from visurf_engine import report
from visurf_engine.report import (BEGIN, END, correlations, format_results_table, mean_std, pearson, read_metrics,
                                  reward_accuracy_pairs, summarise, write_report, write_results_doc)


SESSION = {"command": "python -m visurf_engine.compare --config c.yaml", "commit": "abc123", "date": "d", "machine": "m"}


def result(name, seed, final, base=None, wall=10.0, session=SESSION):
    base = base or {"giou": 0.1, "n_acc": 0.0, "bbox_acc": 0.2, "probe_acc": 0.8}
    return {"name": name, "seed": seed, "base": base, "final": final, "wall_s": wall, "provenance": session}


RESULTS = [
    result("sft", 0, {"giou": 0.2, "n_acc": 0.5, "bbox_acc": 0.3, "probe_acc": 0.6}, wall=10.0),
    result("sft", 1, {"giou": 0.4, "n_acc": 0.7, "bbox_acc": 0.5, "probe_acc": 0.4}, wall=14.0),
    result("visurf", 0, {"giou": 0.6, "n_acc": 0.9, "bbox_acc": 0.7, "probe_acc": 0.8}, wall=20.0),
]


def test_mean_std_is_the_sample_std():
    s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(5 / 3)) and s["n"] == 4
    one = mean_std([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["std"]) and one["n"] == 1
    assert mean_std([1.0, float("nan"), None, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert math.isnan(mean_std([])["mean"])


def test_summary_and_results_table():
    s = summarise(RESULTS)
    assert list(s["configs"]) == ["sft", "visurf"]
    sft = s["configs"]["sft"]
    assert sft["giou"]["mean"] == pytest.approx(0.3) and sft["giou"]["std"] == pytest.approx(math.sqrt(0.02))
    assert sft["probe_delta"]["mean"] == pytest.approx(-0.3)  # (0.6 - 0.8 + 0.4 - 0.8) / 2
    assert sft["seeds"] == [0, 1] and sft["wall_s"]["mean"] == 12.0
    assert s["base"]["giou"] == {"mean": pytest.approx(0.1), "std": pytest.approx(0.0), "n": 3}
    table = format_results_table(s).splitlines()
    assert table[0] == "| configuration | gIoU | N-Acc | bbox_acc | probe acc | Δ probe acc | always `[]` | seeds | wall s/run |"
    assert table[2] == "| base model | 0.100 ± 0.000 | 0.000 ± 0.000 | 0.200 ± 0.000 | 0.800 ± 0.000 | | | | |"
    assert table[3] == "| sft | 0.300 ± 0.141 | 0.600 ± 0.141 | 0.400 ± 0.141 | 0.500 ± 0.141 | -0.300 ± 0.141 | 0 | 2 | 12 ± 3 |"
    assert table[4] == "| visurf | 0.600 | 0.900 | 0.700 | 0.800 | 0.000 | 0 | 1 | 20 |"  # one seed: no std


def test_table_without_probe_shows_dashes():
    rows = [result("rlvr", 0, {"giou": 0.5, "n_acc": 0.0, "bbox_acc": 0.5}, base={"giou": 0.1, "n_acc": 0.0, "bbox_acc": 0.2})]
    line = format_results_table(summarise(rows)).splitlines()[3]
    assert line == "| rlvr | 0.500 | 0.000 | 0.500 | - | - | 0 | 1 | 10 |"


def test_always_empty_runs_are_counted():
    """A run answering [] to (almost) everything: N-Acc >= 0.9 with bbox_acc <= 0.1; the edges included."""
    finals = [{"n_acc": 1.0, "bbox_acc": 0.01}, {"n_acc": 0.9, "bbox_acc": 0.1}, {"n_acc": 0.89, "bbox_acc": 0.0},
              {"n_acc": 1.0, "bbox_acc": 0.11}, {"n_acc": 0.5, "bbox_acc": 0.5}]  # fmt: skip
    assert [report.always_empty(f) for f in finals] == [True, True, False, False, False]
    rows = [result("visurf", i, f | {"giou": 0.5}) for i, f in enumerate(finals)]
    assert summarise(rows)["configs"]["visurf"]["always_empty"] == 2
    assert format_results_table(summarise(rows)).splitlines()[3].split(" | ")[-3] == "2"


def test_sweep_groups_by_paradigm_and_value(tmp_path):
    """The sweep table: per paradigm (the run's algo.paradigm, not its name), per value of the key in
    the run's config, mean ± std over seeds; the figure is a PNG; the report carries both."""
    def swept(name, paradigm, share, seed, giou):
        r = result(name, seed, {"giou": giou, "n_acc": 0.5, "bbox_acc": 0.5, "probe_acc": 0.5})
        return r | {"config": {"algo": {"paradigm": paradigm}, "data": {"absent_ratio": share}}}

    rows = [swept("visurf", "visurf", 0.5, 0, 0.6), swept("visurf", "visurf", 0.5, 1, 0.8),
            swept("visurf_a03", "visurf", 0.03, 0, 0.3), swept("sft_a03", "sft", 0.03, 0, 0.2)]  # fmt: skip
    table = report.sweep(rows, "data.absent_ratio")
    assert list(table) == ["visurf", "sft"] and list(table["visurf"]) == [0.03, 0.5]  # ascending values
    assert table["visurf"][0.5]["giou"]["mean"] == pytest.approx(0.7) and table["visurf"][0.5]["giou"]["n"] == 2
    lines = report.format_sweep_table(table, "data.absent_ratio").splitlines()
    assert lines[0] == "| paradigm | data.absent_ratio | gIoU | N-Acc | bbox_acc | probe acc | seeds |"
    assert lines[3] == "| visurf | 0.5 | 0.700 ± 0.141 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 2 |"
    runs = {r["name"]: [series([3.0, 4.0], {0: 0.1, 2: r["final"]["giou"]})] for r in rows}
    out = write_report(rows, runs, tmp_path, SESSION, sweep_key="data.absent_ratio")
    assert Image.open(out["figures"]["sweep"]).size[0] > 0 and "| sft | 0.03 |" in out["sweep_table"]
    assert json.loads((tmp_path / "results.json").read_text())["sweep"]["table"]["visurf"]["0.5"]["giou"]["n"] == 2
    assert "### Against data.absent_ratio" in (tmp_path / "results.md").read_text()


def test_pearson_hand_made():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(pearson([1, 2], [1, 2]))  # too few points
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))  # constant
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def series(rewards, evals):
    return {"reward/rollout_mean": dict(enumerate(rewards, start=1)), "eval/giou": evals,
            "eval/n_acc": evals, "eval/bbox_acc": evals}


def test_reward_accuracy_pairs_average_each_window():
    s = series([1.0, 3.0, 5.0, 7.0, 9.0, 11.0], {0: 0.0, 2: 0.2, 4: 0.1, 6: 0.4})
    assert reward_accuracy_pairs(s, "giou") == [(2.0, 0.2), (6.0, 0.1), (10.0, 0.4)]
    # SFT-only windows carry no training reward and are skipped
    sft_first = {"reward/rollout_mean": {3: 1.0, 4: 2.0}, "eval/giou": {0: 0.0, 2: 0.5, 4: 0.6}}
    assert reward_accuracy_pairs(sft_first, "giou") == [(1.5, 0.6)]
    assert reward_accuracy_pairs({"eval/giou": {0: 0.0, 2: 0.1}}, "giou") == []


def test_correlations_pool_seeds():
    rising = series([1, 1, 2, 2, 3, 3], {0: 0.0, 2: 0.1, 4: 0.2, 6: 0.3})
    deceptive = series([1, 1, 2, 2, 3, 3], {0: 0.0, 2: 0.3, 4: 0.2, 6: 0.1})
    corr = correlations({"good": [rising, rising], "bad": [deceptive], "sft": [{"eval/giou": {0: 0.1, 2: 0.2}}]})
    assert corr["good"]["giou"] == {"r": pytest.approx(1.0), "n": 6}
    assert corr["bad"]["bbox_acc"]["r"] == pytest.approx(-1.0)
    assert math.isnan(corr["sft"]["giou"]["r"]) and corr["sft"]["giou"]["n"] == 0
    table = report.format_correlation_table(corr).splitlines()
    assert table[2] == "| good | +1.00 | +1.00 | +1.00 | 6 |" and table[4] == "| sft | - | - | - | 0 |"


def test_read_metrics_keeps_last_value_and_drops_nulls(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval/giou": 0.1}, {"step": 1, "loss": 2.0, "entropy": None, "phase/sft": 1.0},
             {"step": 2, "loss": 1.5}, {"step": 2, "loss": 1.25}]  # step 2 logged again after a resume
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert read_metrics(path) == {"eval/giou": {0: 0.1}, "loss": {1: 2.0, 2: 1.25}, "phase/sft": {1: 1.0}}


def fake_runs():
    def run(offset):
        steps = range(1, 21)
        return {
            "reward/rollout_mean": {s: offset + s / 10 for s in steps}, "adv/gold": {s: 1.0 - s / 40 for s in steps},
            "gold/smooth_rate": {s: s / 20 for s in steps}, "entropy": {s: 2 - s / 20 for s in steps},
            "loss": {s: 1.0 for s in steps},
            **{f"eval/{m}": {0: 0.1, 10: 0.2 + offset, 20: 0.3 + offset} for m in ("giou", "n_acc", "bbox_acc", "probe_acc")},
        }
    rlvr = run(0.0)
    del rlvr["adv/gold"], rlvr["gold/smooth_rate"]
    return {"visurf": [run(0.0), run(0.1)], "rlvr": [rlvr]}


def test_write_report_files(tmp_path):
    resumed = SESSION | {"command": "python -m visurf_engine.compare --config c.yaml --runs rlvr", "commit": None}
    results = [result("visurf", 0, {"giou": 0.3}), result("visurf", 1, {"giou": 0.4}),
               result("rlvr", 0, {"giou": 0.3}, session=resumed)]
    report_session = SESSION | {"command": "python -m visurf_engine.compare --config c.yaml --report-only", "date": "today"}
    rep = write_report(results, fake_runs(), tmp_path, report_session, window=3)
    for name in ("training_curves.png", "heldout_curves.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        assert (tmp_path / name).stat().st_size > 20_000  # four panels of curves, not an empty canvas
    saved = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN written as null
    assert saved["summary"]["configs"]["visurf"]["giou"]["mean"] == pytest.approx(0.35)
    assert saved["summary"]["configs"]["rlvr"]["giou"]["std"] is None
    assert saved["correlation"]["visurf"]["giou"]["n"] == 4 and saved["provenance"]["commit"] == "abc123"
    md = (tmp_path / "results.md").read_text()
    assert rep["results_table"] in md and rep["correlation_table"] in md
    assert "![training dynamics](training_curves.png)" in md
    assert "3 runs (configurations × seeds), 0.5 min of wall time in all" in md  # 10 s x 3 runs
    assert "- `python -m visurf_engine.compare --config c.yaml` at commit `abc123` on m\n" in md  # one line per session
    assert "- `python -m visurf_engine.compare --config c.yaml --runs rlvr` at commit `unknown` on m\n" in md
    assert "Page generated today by `python -m visurf_engine.compare --config c.yaml --report-only`" in md
    pinned = SESSION | {"uncommitted_changes": True, "threads": {"torch": 1},
                        "versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0", "numpy": "2.4.6", "trl": "1.16.0"}}
    md = report._markdown(write_report([result("visurf", 0, {"giou": 0.3}, session=pinned)], fake_runs(), tmp_path, pinned),
                          {"training_curves": "t.png", "heldout_curves": "h.png"})
    assert ("- `python -m visurf_engine.compare --config c.yaml` at commit `abc123` (with uncommitted changes) on m, "
            "transformers 5.24.0, numpy 2.4.6, 1 torch thread(s)\n") in md  # what the numbers depend on, trl is not


def test_results_doc_keeps_the_hand_written_reading(tmp_path):
    rep = write_report([result("visurf", 0, {"giou": 0.3})], fake_runs(), tmp_path / "report", SESSION)
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    write_results_doc(doc, rep)  # new page from the template
    text = doc.read_text()
    assert "Not generated yet" not in text and "## Reading" in text and "at commit `abc123`" in text
    assert "![training dynamics](results/training_curves.png)" in text
    assert (tmp_path / "docs" / "results" / "heldout_curves.png").is_file()
    data = json.loads((tmp_path / "docs" / "results" / "results.json").read_text())
    assert data["summary"] == report._jsonable(rep["summary"]) and "(results/results.json)" in text
    doc.write_text(text.replace("To be written after the full run.", "ViSurf wins, by hand."))
    rep["results_table"] = "| regenerated |"
    write_results_doc(doc, rep)
    text = doc.read_text()
    assert "ViSurf wins, by hand." in text and "| regenerated |" in text and text.count(BEGIN) == text.count(END) == 1
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers are missing"):
        write_results_doc(doc, rep)
