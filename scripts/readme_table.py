"""Regenerate (or check) the README's default-run tables: ``python scripts/readme_table.py [--check]``.

Two blocks of ``README.md``, each between its markers:

- ``default-run``: the one-run table (base vs final) of ``runs/default/eval.json``, which
  ``torchrun -m visurf_engine.train`` writes, with the run's wall time and the package versions
  it ran on;
- ``default-seeds``: the default's mean ± std over seeds, the comparison's ``visurf`` row of
  ``docs/results/results.json`` (``python -m visurf_engine.compare --config configs/compare_shapes.yaml``,
  whose shared config is the default's).

``--check`` rewrites nothing and exits 1 when a table row of either block differs from what the
files say (e.g. after a fresh clone's default run: the README's table is what a newcomer gets, or
not); the wall time and the versions under the table are not compared.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from visurf_engine.provenance import RESULT_VERSIONS

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("giou", "ciou", "n_acc", "bbox_acc", "parse_rate", "probe_acc", "probe_acc/colour", "probe_acc/count")
SEED_METRICS = ("giou", "n_acc", "bbox_acc", "probe_acc", "probe_delta")


def one_run(eval_json: Path) -> str:
    r = json.loads(eval_json.read_text())
    lines = ["| metric | base | final |", "|---|---:|---:|"]
    lines += [f"| {m} | {r['base'][m]:.4f} | {r['final'][m]:.4f} |" for m in METRICS if m in r["final"]]
    versions = ", ".join(f"{k} {v}" for k, v in r.get("provenance", {}).get("versions", {}).items() if k in RESULT_VERSIONS)
    base = f", plus {r['base_model_s']:.0f} s to build or load the base model" if "base_model_s" in r else ""
    tail = f"\n\nWall time of that run: {r['wall_s'] / 60:.1f} min{base}" + (f"; {versions}." if versions else ".")
    return "\n".join(lines) + tail


def seeds(results_json: Path, config: str = "visurf") -> str:
    s = json.loads(results_json.read_text())["summary"]
    row, base = s["configs"][config], s["base"]
    fmt = lambda v: f"{v['mean']:.3f} ± {v['std']:.3f}"  # noqa: E731
    lines = ["| | " + " | ".join(SEED_METRICS) + " | seeds |", "|---|" + "---:|" * (len(SEED_METRICS) + 1)]
    lines.append("| base model | " + " | ".join(fmt(base[m]) if m in base else "" for m in SEED_METRICS) + " | |")
    lines.append(f"| default ({config}) | " + " | ".join(fmt(row[m]) for m in SEED_METRICS) + f" | {row['n_acc']['n']} |")
    runs = sorted((r["seed"], r["final"]["n_acc"]) for r in json.loads(results_json.read_text())["runs"] if r["name"] == config)
    return "\n".join(lines) + "\n\nFinal N-Acc per seed: " + ", ".join(f"seed {s} {v:.3f}" for s, v in runs) + "."


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


def table_rows(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith("|")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table row differs; rewrite nothing")
    ap.add_argument("--eval", type=Path, default=ROOT / "runs" / "default" / "eval.json")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "results.json")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    old = args.readme.read_text()
    bodies = {"default-run": one_run(args.eval), "default-seeds": seeds(args.results)}
    if args.check:
        differ = False
        for name, body in bodies.items():
            want, have = table_rows(body), table_rows(block(old, name).group(1))
            for row in (r for r in want if r not in have):
                differ = True
                print(f"{args.readme} {name}: missing row {row}")
            for row in (r for r in have if r not in want):
                differ = True
                print(f"{args.readme} {name}: row not in the files: {row}")
        print(f"{args.readme}'s default-run tables {'differ from' if differ else 'match'} {args.eval} and {args.results}")
        return int(differ)
    new = old
    for name, body in bodies.items():
        new = replace_block(new, name, body)
    args.readme.write_text(new)
    print(f"{args.readme} updated" if new != old else f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
