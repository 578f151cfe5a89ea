"""Compare post-training paradigms: ``python -m visurf_engine.compare --config configs/compare_shapes.yaml``.

Runs every configuration of the comparison (e.g. ``sft``, ``rlvr``, ``sft_then_rlvr``,
``visurf`` and ``visurf`` with each reward control off) for every seed, on the same base
model, data and step budget, one after another in this process, then writes the report
(``report.write_report``: table, figures, correlation) and, optionally, ``docs/results.md``.

The comparison file has two sections::

    compare:
      output_dir: runs/compare_shapes   # one run per <output_dir>/<name>/seed<k>/
      seeds: [0, 1, 2]                  # train.seed of each run
      docs: docs/results.md             # results page to (re)generate; null: none
      sweep: data.absent_ratio          # optional: a key the runs vary; the report plots the metrics against it
      runs:                             # name -> key=value overrides of that configuration, or
        sft: [algo.paradigm=sft]        #   {overrides: [...], seeds: [...]} with seeds of its own
        visurf_no_smooth: {overrides: [algo.paradigm=visurf, algo.smooth=false], seeds: [0, 1, 2]}
    config:                             # the training config every run shares (sections as in configs/*.yaml)
      train: {steps: 60, eval_every: 10}

A run's config is ``config`` <- its ``runs`` overrides <- command-line overrides <-
``train.seed`` / ``train.output_dir``. A finished run leaves ``result.json`` (written
atomically) and is skipped next time; an unfinished one resumes from its last checkpoint.
A run directory holding a result or checkpoint of a *different* config stops the
comparison before anything trains, naming the run. ``wall_s`` in a result is the wall time
of the session that finished the run (``resumed_from_step`` says where that session began).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_from_mapping
from .parallel.world import World, barrier, init_world
from .provenance import provenance as provenance_of
from .report import read_metrics, write_report, write_results_doc
from .tasks import prepare_base_model
from .trainer import Trainer

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_RUN_KEYS = ("train.resume", "train.progress", "train.output_dir")  # settings that do not change what a run computes


@dataclass
class Plan:
    """A comparison: configurations x seeds over one shared training config."""

    source: str
    output_dir: Path
    seeds: list[int]
    runs: dict[str, list[str]]
    config: dict[str, Any]
    docs: Path | None
    run_seeds: dict[str, list[int]] = field(default_factory=dict)  # runs with seeds of their own
    sweep: str | None = None  # a config key the runs vary: the report plots the final metrics against it

    def seeds_of(self, name: str) -> list[int]:
        return self.run_seeds.get(name, self.seeds)

    def only_seeds(self, seeds: list[int]) -> None:
        """Keep ``seeds`` (``--seeds``): the plan's seeds, and of each run's own those among them."""
        self.seeds = seeds
        self.run_seeds = {k: [s for s in v if s in seeds] for k, v in self.run_seeds.items()}


@dataclass
class Job:
    """One (configuration, seed) run."""

    name: str
    seed: int
    cfg: Config

    @property
    def dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def load_plan(path: str | Path) -> Plan:
    """Read and check a comparison file (module docstring); ``ConfigError`` names a bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file {str(path)!r} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"compare", "config"} or "compare" not in data:
        raise ConfigError(f"{path}: expected top-level sections 'compare' and (optional) 'config'")
    c = data["compare"] or {}
    if not isinstance(c, dict):
        raise ConfigError(f"{path}: compare: expected a mapping, got {c!r}")
    unknown = set(c) - {"output_dir", "seeds", "docs", "runs", "sweep"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) compare.{', compare.'.join(sorted(unknown))}")
    seeds, entries = _seeds(path, "compare.seeds", c.get("seeds", [0])), c.get("runs") or {}
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: compare.runs: expected a mapping of run name -> list of key=value overrides")
    runs, run_seeds = {}, {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{path}: compare.runs: {name!r} is not a valid run name (letters, digits, _ . -)")
        if isinstance(entry, dict):
            if set(entry) - {"overrides", "seeds"} or "overrides" not in entry:
                raise ConfigError(f"{path}: compare.runs.{name}: expected keys overrides (and seeds), got {sorted(entry)}")
            if "seeds" in entry:
                run_seeds[name] = _seeds(path, f"compare.runs.{name}.seeds", entry["seeds"])
            entry = entry["overrides"]
        if not isinstance(entry, list) or not all(isinstance(o, str) for o in entry):
            raise ConfigError(f"{path}: compare.runs.{name}: expected a list of key=value strings, got {entry!r}")
        runs[name] = entry
    return Plan(
        source=str(path), output_dir=Path(c.get("output_dir") or f"runs/{path.stem}"), seeds=seeds, runs=runs,
        config=data.get("config") or {}, docs=Path(c["docs"]) if c.get("docs") else None, run_seeds=run_seeds,
        sweep=c.get("sweep"),
    )


def _seeds(path: Path, key: str, seeds: Any) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: {key}: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: {key}: repeated seed in {seeds}")
    return seeds


def make_jobs(plan: Plan, overrides: list[str] = ()) -> list[Job]:
    """Every (configuration, seed) run with its validated config, configuration-major."""
    jobs = []
    for name, run_overrides in plan.runs.items():
        for seed in plan.seeds_of(name):
            run_dir = plan.output_dir / name / f"seed{seed}"
            try:
                cfg = config_from_mapping(
                    plan.config,
                    [*run_overrides, *overrides, f"train.seed={seed}", f"train.output_dir={run_dir}", "train.resume=true"],
                    source=plan.source,
                )
            except ConfigError as e:
                raise ConfigError(f"run {name} (seed {seed}): {e}") from None
            jobs.append(Job(name, seed, cfg))
    return jobs


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as plain JSON, without the settings that do not change its results."""
    plain = json.loads(json.dumps(config))
    for key in _RUN_KEYS:
        section, field = key.split(".")
        plain.get(section, {}).pop(field, None)
    return plain


def differences(want: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """The dotted keys where two fingerprints differ. A key only one of them has (a setting added or
    removed since the run was made) is not counted: the run is taken as made with its default."""
    return sorted(f"{s}.{k}" for s in want.keys() & found.keys() for k in want[s].keys() & found[s].keys()
                  if found[s][k] != want[s][k])  # fmt: skip


def check_run_dir(job: Job) -> None:
    """Raise if ``job``'s directory holds a result or checkpoint of another config."""
    want = fingerprint(job.cfg.to_dict())
    result = job.dir / "result.json"
    if result.is_file():
        found = json.loads(result.read_text())["config"]
    else:
        latest = ckpt.latest_checkpoint(job.dir / "checkpoints")
        if latest is None:
            return
        found = fingerprint(json.loads((latest / "state.json").read_text())["config"])
    diff = differences(want, found)
    if diff:
        raise ConfigError(
            f"run {job.name} (seed {job.seed}): {job.dir} holds a run with a different config ({', '.join(diff)}); "
            "delete it or choose another compare.output_dir"
        )


def run_job(job: Job, world: World, session: dict[str, Any]) -> dict[str, Any]:
    """Train ``job`` (resuming if it has a checkpoint) unless its ``result.json`` exists; the
    result (``session``: this session's ``provenance``, recorded in a new result)."""
    path = job.dir / "result.json"
    if not path.is_file():
        start = time.perf_counter()
        prepare_base_model(job.cfg, world, progress=job.cfg.train.progress)
        trainer = Trainer(job.cfg, world)
        resumed_from = trainer.start_step
        evals = trainer.run()
        del trainer
        gc.collect()
        result = {
            "name": job.name, "seed": job.seed, "base": evals["base"], "final": evals["final"],
            "wall_s": time.perf_counter() - start, "resumed_from_step": resumed_from,
            "steps": job.cfg.train.steps, "config": fingerprint(job.cfg.to_dict()),
            "provenance": session | {"threads": session["threads"] | {"torch": torch.get_num_threads()}},  # train.threads
        }
        if world.is_main:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, path)
        barrier(world)
    return json.loads(path.read_text())


def provenance(argv: list[str]) -> dict[str, Any]:
    """Command, commit, date, machine and versions of this comparison (``provenance.provenance``)."""
    p = provenance_of(["python", "-m", "visurf_engine.compare", *argv])
    return p | {"machine": f"{p['device']}, {p['machine']}, Python {p['versions']['python']}, torch {torch.__version__}"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="visurf_engine.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="comparison YAML (sections: compare, config)")
    parser.add_argument("--seeds", type=int, nargs="+", help="replace compare.seeds")
    parser.add_argument("--runs", help="comma-separated subset of compare.runs to run and report")
    parser.add_argument("--output-dir", help="replace compare.output_dir")
    parser.add_argument("--docs", help="replace compare.docs (the results page to regenerate)")
    parser.add_argument("--no-docs", action="store_true", help="do not write the results page")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.steps=20")
    args = parser.parse_intermixed_args(argv)  # options may follow key=value overrides
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = load_plan(args.config)
        if args.seeds:
            plan.only_seeds(args.seeds)
        if args.runs:
            names = args.runs.split(",")
            missing = set(names) - set(plan.runs)
            if missing:
                raise ConfigError(f"--runs: unknown run(s) {', '.join(sorted(missing))}; known: {', '.join(plan.runs)}")
            plan.runs = {k: v for k, v in plan.runs.items() if k in names}
        if args.output_dir:
            plan.output_dir = Path(args.output_dir)
        if args.docs or args.no_docs:
            plan.docs = None if args.no_docs else Path(args.docs)
        jobs = make_jobs(plan, args.overrides)
        if not jobs:
            raise ConfigError(f"no run to train: the selected runs ({', '.join(plan.runs)}) have none of the seeds "
                              f"{plan.seeds} (a run's own compare.runs.<name>.seeds keep only those among --seeds)")
        for job in jobs:
            check_run_dir(job)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    world = init_world()
    if args.report_only:
        jobs = [j for j in jobs if (j.dir / "result.json").is_file()]
        if not jobs:
            print(f"no finished runs under {plan.output_dir}", file=sys.stderr)
            return 1
    session, results = provenance(argv), []
    progress = jobs[0].cfg.train.progress and world.is_main
    bar = tqdm(jobs, desc="compare", unit="run", disable=not progress, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(f"{job.name} seed {job.seed}")
        results.append(run_job(job, world, session))
    if world.is_main:
        runs: dict[str, list] = {}
        for job in jobs:
            runs.setdefault(job.name, []).append(read_metrics(job.dir / "metrics.jsonl"))
        window = max(1, max(j.cfg.train.steps for j in jobs) // 20)
        report = write_report(results, runs, plan.output_dir / "report", session, window=window, sweep_key=plan.sweep)
        print("\n" + report["results_table"] + "\n\n" + report["correlation_table"])
        if plan.sweep:
            print("\n" + report["sweep_table"])
        print(f"\nreport: {plan.output_dir / 'report'}")
        if plan.docs:
            print(f"results page: {write_results_doc(plan.docs, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
