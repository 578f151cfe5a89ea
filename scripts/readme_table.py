"""Regenerate the README's default-run tables, or check a run against them: ``python scripts/readme_table.py [--check]``.

Two blocks of ``README.md``, each between its markers:

- ``default-distribution``: what the default run ends at over seeds and thread counts, from a
  comparison report (``--distribution``, default ``docs/results/default_distribution.json``: the
  report of ``python -m visurf_engine.compare --config configs/experiments/robust_default_atomic.yaml``,
  the default's config with ``train.seed`` 0-9 at ``train.threads`` 1 and 2): per final metric its
  median, minimum and maximum over every run of the report, the runs that meet the bar (N-Acc and
  bbox_acc both >= 0.5) and those that ended answering ``[]`` to everything (``always_empty``);
- ``default-run``: one run's table (base vs final), labelled as one machine's example: the
  ``runs/default/eval.json`` that ``torchrun -m visurf_engine.train`` writes, with its wall time,
  CPU, thread count and package versions.

``--check`` rewrites nothing: it holds your ``runs/default/eval.json`` against the distribution
and exits 1 when a final metric lies outside the distribution's range widened by one standard
deviation of that metric over the runs (``[min - std, max + std]``: what another machine's float
reductions move a run by, measured over 20 runs), or when the base model's metrics differ from
the distribution's by more than ``BASE_TOL`` (every run starts from the same shipped base model;
greedy decoding of near-ties is all that may move them). Each metric is printed with its band.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from visurf_engine.provenance import RESULT_VERSIONS
from visurf_engine.report import always_empty

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("giou", "ciou", "n_acc", "bbox_acc", "parse_rate", "probe_acc", "probe_acc/colour", "probe_acc/count")
DIST_METRICS = ("giou", "n_acc", "bbox_acc", "probe_acc")
BAR = 0.5  # a run meets the bar with N-Acc >= BAR and bbox_acc >= BAR
BASE_TOL = 0.02


def one_run(eval_json: Path) -> str:
    r = json.loads(eval_json.read_text())
    lines = ["| metric | base | final |", "|---|---:|---:|"]
    lines += [f"| {m} | {r['base'][m]:.4f} | {r['final'][m]:.4f} |" for m in METRICS if m in r["final"]]
    p = r.get("provenance", {})
    versions = ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items() if k in RESULT_VERSIONS)
    where = ", ".join(x for x in (p.get("device"), f"{p['threads']['torch']} torch thread(s)" if "threads" in p else None) if x)
    base = f", plus {r['base_model_s']:.0f} s to build or load the base model" if "base_model_s" in r else ""
    tail = f"\n\nWall time of that run: {r['wall_s'] / 60:.1f} min{base}" + (f"; {where}" if where else "")
    return "\n".join(lines) + tail + (f"; {versions}." if versions else ".")


def runs_of(report_json: Path) -> list[dict]:
    """The runs of a comparison report (``report.write_report``'s ``results.json``)."""
    return json.loads(report_json.read_text())["runs"]


def meets_bar(final: dict) -> bool:
    return final["n_acc"] >= BAR and final["bbox_acc"] >= BAR


def distribution(report_json: Path) -> str:
    """Markdown: median [min, max] of each final metric over the report's runs, and the counts."""
    runs = runs_of(report_json)
    lines = ["| metric | base | median | min | max |", "|---|---:|---:|---:|---:|"]
    for m in DIST_METRICS:
        v = [r["final"][m] for r in runs]
        lines.append(f"| {m} | {runs[0]['base'][m]:.3f} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    threads = sorted({r["provenance"]["threads"]["torch"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    ok, empty = sum(meets_bar(r["final"]) for r in runs), sum(always_empty(r["final"]) for r in runs)
    return "\n".join(lines) + (
        f"\n\n{len(runs)} runs (seeds {seeds[0]}-{seeds[-1]} x {' and '.join(map(str, threads))} torch thread(s)): "
        f"{ok} end with N-Acc >= {BAR} and bbox_acc >= {BAR}; {empty} ended answering `[]` to everything "
        f"(N-Acc >= 0.9, bbox_acc <= 0.1)."
    )


def check(eval_json: Path, report_json: Path) -> list[str]:
    """What in ``eval_json`` lies outside the distribution (module docstring); printed as it goes."""
    run, runs, problems = json.loads(eval_json.read_text()), runs_of(report_json), []
    for m in DIST_METRICS:
        v = [r["final"][m] for r in runs]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        lo, hi = max(0.0, min(v) - sd), min(1.0, max(v) + sd)
        base, want = run["base"][m], runs[0]["base"][m]
        inside = lo <= run["final"][m] <= hi
        print(f"{m:10s} final {run['final'][m]:.3f}  band [{lo:.3f}, {hi:.3f}]  {'ok' if inside else 'OUTSIDE'};"
              f"  base {base:.3f} (shipped base model: {want:.3f})")  # fmt: skip
        if not inside:
            problems.append(f"{m}: final {run['final'][m]:.3f} outside [{lo:.3f}, {hi:.3f}]")
        if abs(base - want) > BASE_TOL:
            problems.append(f"{m}: base {base:.3f}, the shipped base model scores {want:.3f}")
    return problems


def markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name}: scripts/readme_table.py -->", f"<!-- END {name} -->"


def block(text: str, name: str) -> re.Match:
    """The block ``name`` of ``text``: the whole match, and its body as group 1."""
    begin, end = markers(name)
    m = re.search(re.escape(begin) + r"(.*?)" + re.escape(end), text, re.S)
    if m is None:
        raise SystemExit(f"README.md has no {begin} ... {end} block")
    return m


def replace_block(text: str, name: str, body: str) -> str:
    m, (begin, end) = block(text, name), markers(name)
    return text[: m.start()] + f"{begin}\n{body}\n{end}" + text[m.end():]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="hold --eval against the distribution; rewrite nothing")
    ap.add_argument("--eval", type=Path, default=ROOT / "runs" / "default" / "eval.json")
    ap.add_argument("--distribution", type=Path, default=ROOT / "docs" / "results" / "default_distribution.json")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.eval, args.distribution)
        for p in problems:
            print(f"{args.eval}: {p}")
        print(f"{args.eval} is {'outside' if problems else 'within'} the distribution of {args.distribution}")
        return int(bool(problems))
    old = args.readme.read_text()
    new = replace_block(old, "default-distribution", distribution(args.distribution))
    new = replace_block(new, "default-run", one_run(args.eval))
    args.readme.write_text(new)
    print(f"{args.readme} updated" if new != old else f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
