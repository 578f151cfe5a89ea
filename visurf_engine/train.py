"""Entry point: ``torchrun [--nproc_per_node N] -m visurf_engine.train [--config F] [key=value ...]``.

With no arguments it post-trains the embedded default (the tiny Qwen2.5-VL-architecture
policy on the shapes grounding task) with ViSurf, then prints the held-out evaluation
table (base model vs. final policy). The base model is prepared first (the embedded one is
warm-started once and cached, with its own progress bar), then the trainer is built on it. ``python -m visurf_engine.train`` works the same way
on one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .config import ConfigError, load_config
from .eval.evaluate import format_table
from .parallel.world import init_world
from .provenance import provenance
from .tasks import prepare_base_model
from .nonfinite import NonFiniteError
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visurf_engine.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (sections: model, parallel, data, warmstart, rollout, algo, loss, train)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algo.paradigm=rlvr train.steps=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    world = init_world()
    start = time.perf_counter()
    prepare_base_model(cfg, world, progress=cfg.train.progress)
    base_s, start = time.perf_counter() - start, time.perf_counter()
    try:
        trainer = Trainer(cfg, world)
    except ConfigError as e:  # a check that fails only with the backend rollout.backend=auto chose
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        results = trainer.run()
    except NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    if world.is_main:
        wall = time.perf_counter() - start
        print(f"\n{cfg.algo.paradigm}: {cfg.train.steps} steps in {wall:.0f} s, evaluations included (base model "
              f"ready after {base_s:.0f} s); outputs in {cfg.train.output_dir}")
        print(format_table(results))
        timing = {"wall_s": wall, "base_model_s": base_s}  # the run; building (or finding) the base model before it
        (trainer.out / "eval.json").write_text(json.dumps(results | timing | {"provenance": provenance()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
