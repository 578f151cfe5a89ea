"""Rollout backends side by side over a ladder of model sizes: where vLLM overtakes the HF decode loop.

    python bench/rollout_backends.py [--ladder tiny,3b:1:1,...] [--repeats 5] [--threads N] [key=value ...]

What is timed is one rollout phase of a training step, as ``Trainer.step`` runs it: the trainer's
engine's ``sample(prompts, rollout.n)`` on a batch of the shapes task's prompts and images (the
first ``train.batch_size`` training rows; defaults 8 prompts x G = 4, ``rollout.max_new_tokens``
48, temperature 1; each completion stops at ``<|im_end|>`` or the budget, as in training), then the
weight sync that follows every update (``sync_weights(learner.export_weights())``: nothing to copy
for the HF engine, which generates with the training module; vLLM's bucketed in-place reload).

Backends (each built by ``rollout.build_rollout`` from the config, over one ``Trainer`` per model):

  hf-loop      ``rollout.backend=hf rollout.hf.decode=loop`` (``models/decode.py``; CPU's default)
  hf-generate  ``rollout.backend=hf rollout.hf.decode=generate`` (transformers' ``generate``)
  vllm         ``rollout.backend=vllm``, when this interpreter can import vLLM (CPU: the environment
               of ``scripts/setup_vllm_cpu.sh``); otherwise skipped, and said so

Models (``--ladder``, smallest first): ``tiny`` is the base model shipped with the package (the
default run's, 1.15 M parameters); ``3b:L:B`` a random-init Qwen2.5-VL-3B of the real widths with
``L`` decoder layers and ``B`` vision blocks (``models.presets.save_random_checkpoint``; ``7b:L:B``
likewise), written to a temporary directory, with the shipped model's tokenizer and the task's
84x84 images, so every model sees the same prompts. A random-init model never stops early: its
completions are as long as the budget. fp32 throughout (the trainer's ``model.dtype`` and vLLM's
CPU dtype).

Per model: ``--warmup`` rollouts + syncs per backend not counted, then ``--repeats`` rounds, each
running every backend once (the order rotated each round, so drift falls on all alike), with the
same torch seed for every backend of a round. Reported per backend: seconds per rollout (median,
min-max), seconds per sync, generated tokens per rollout, and the rate that decides which engine a
training step should use: generated tokens per second of rollout + sync (median over the rounds);
``x fastest`` is the fastest backend's rate over this one's. The **crossover** is the smallest model
of the ladder from which vLLM's rate beats the HF loop's at that model and every larger one; its
parameter count (``rollout.auto.checkpoint_params``, what ``rollout.backend=auto`` compares) is the
value for ``rollout.auto.CPU_VLLM_MIN_PARAMS``.

Prints the table and writes JSON (provenance, every timing) to
``bench/results/rollout_backends-<device>-<date>.json``, rewritten after every model (``complete:
false`` until the last; ``results_file``). ``--quick``: a smoke run (the tiny model, one warm-up,
one round; not for the record). A backend that fails on a model (out of memory, say) is recorded
with its error and the rest goes on.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside it, also when imported from elsewhere

import visurf_engine  # noqa: E402,F401  (the torchvision CPU layer, before transformers)
import torch  # noqa: E402
from results_file import ResultsFile, error_line  # noqa: E402

from visurf_engine.config import ConfigError, config_from_mapping, load_config  # noqa: E402
from visurf_engine.provenance import device_name, result_path  # noqa: E402
from visurf_engine.rollout.auto import CPU_VLLM_MIN_PARAMS, checkpoint_params, vllm_importable  # noqa: E402

LADDER = "tiny,3b:1:1,3b:2:1,3b:4:2"
BACKENDS = {
    "hf-loop": ["rollout.backend=hf", "rollout.hf.decode=loop"],
    "hf-generate": ["rollout.backend=hf", "rollout.hf.decode=generate"],
    "vllm": ["rollout.backend=vllm"],
}
PRESETS = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b"}
# The trainer around the engines: no KL reference (nothing of it is timed), a small task split.
TRAINER = ["algo.kl_coef=0", "data.train_size=64", "data.eval_size=1", "data.probe_size=0", "train.progress=false"]


def parse_ladder(text: str) -> list[tuple[str, str | None, int | None, int | None]]:
    """``"tiny,3b:2:1"`` -> ``[("tiny", None, None, None), ("3b:2:1", "qwen2.5-vl-3b", 2, 1)]``:
    (name, preset, decoder layers, vision blocks)."""
    models = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "tiny":
            models.append((item, None, None, None))
            continue
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in PRESETS or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
            raise argparse.ArgumentTypeError(f"--ladder {item!r}: expected tiny or {'|'.join(PRESETS)}:LAYERS:BLOCKS "
                                             "(e.g. 3b:2:1)")  # fmt: skip
        models.append((item, PRESETS[parts[0]], int(parts[1]), int(parts[2])))
    if not models:
        raise argparse.ArgumentTypeError("--ladder: no model given")
    return models


def rate(record: dict[str, list[float]]) -> float:
    """Generated tokens per second of rollout + sync, the median over the rounds."""
    return statistics.median(t / (r + s) for t, r, s in zip(record["tokens"], record["rollout_s"], record["sync_s"]))


def crossover(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The smallest model (``models`` smallest first) from which ``vllm``'s rate beats ``hf-loop``'s
    at it and every larger one: ``{"model", "params", "below"}`` (``below``: the next smaller model, where
    the HF loop is at least as fast; None when it is the smallest), or ``{"model": None, "reason"}``."""
    pairs = [(m, m["backends"].get("vllm", {}), m["backends"].get("hf-loop", {})) for m in models]
    if not pairs or any("rollout_s" not in v or "rollout_s" not in h for _, v, h in pairs):
        return {"model": None, "reason": "vllm or hf-loop has no timing at some model of the ladder"}
    wins = [rate(v) > rate(h) for _, v, h in pairs]
    if not wins[-1]:
        largest = pairs[-1][0]
        return {"model": None, "reason": f"the HF loop is still faster at the largest model, {largest['model']} "
                                         f"({largest['params'] / 1e6:.1f} M parameters): the crossover is above it"}  # fmt: skip
    first = next(i for i in range(len(wins)) if all(wins[i:]))
    m = pairs[first][0]
    return {"model": m["model"], "params": m["params"], "below": pairs[first - 1][0]["model"] if first else None}


def make_checkpoint(preset: str, layers: int, blocks: int, tokenizer, path: Path) -> Path:
    from visurf_engine.models.presets import save_random_checkpoint
    from visurf_engine.tasks.shapes import generator as shapes

    return save_random_checkpoint(preset, path, tokenizer, pixels=shapes.SIZE * shapes.SIZE, layers=layers, blocks=blocks)


def measure_model(path: Path, backends: list[str], args, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every backend's timings on the checkpoint at ``path`` (module docstring)."""
    from visurf_engine.data.decoding import fetch_rows
    from visurf_engine.rollout import build_rollout
    from visurf_engine.trainer import Trainer

    cfg = load_config(None, [*TRAINER, *args.overrides, "rollout.backend=hf", f"model.path={path}",
                             f"train.output_dir={run_dir}"])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.policy.model.train()  # as Trainer.run does before its first step
    rows, _ = fetch_rows(trainer.data.train, range(cfg.train.batch_size), "error", lambda slot, attempt: 0)
    prompts = trainer.policy.encode([r.problem for r in rows], [r.image for r in rows])
    engines, records = {}, {}
    for name in backends:
        try:
            engines[name] = build_rollout(config_from_mapping(trainer.cfg.to_dict(), BACKENDS[name]), trainer.policy,
                                          path, trainer.learner, trainer.batching)  # fmt: skip
            records[name] = {"rollout_s": [], "sync_s": [], "tokens": []}
        except Exception as e:  # an engine that cannot start here: recorded, the others go on
            records[name] = {"error": error_line(e)}
            print(f"  {name} failed to start: {records[name]['error']}")

    def one(name: str, seed: int) -> tuple[float, float, int]:
        engine = engines[name]
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = engine.sample(prompts, cfg.rollout.n)
        mid = time.perf_counter()
        engine.sync_weights(trainer.learner.export_weights())
        return mid - start, time.perf_counter() - mid, sum(len(c) for group in out.tokens for c in group)

    for r in range(-args.warmup, args.repeats):
        live = [n for n in backends if n in engines]
        k = r % len(live) if live else 0
        for name in live[k:] + live[:k]:
            try:
                rollout_s, sync_s, tokens = one(name, seed=1000 + r)
            except Exception as e:
                records[name] = {"error": error_line(e)}
                close(engines.pop(name))
                print(f"  {name} failed: {records[name]['error']}")
                continue
            if r >= 0:
                for key, value in (("rollout_s", rollout_s), ("sync_s", sync_s), ("tokens", tokens)):
                    records[name][key].append(value)
    for engine in engines.values():
        close(engine)
    del engines, trainer
    gc.collect()
    return records


def close(engine) -> None:
    """Release a vLLM engine's memory now (a process holds one; the HF engines hold nothing of their own)."""
    if hasattr(engine, "close"):
        engine.close()


def summary_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in models:
        rates = {n: rate(r) for n, r in m["backends"].items() if "rollout_s" in r}
        for name, r in m["backends"].items():
            row = {"model": m["model"], "params": m["params"], "backend": name}
            if "error" in r:
                rows.append(row | {"error": r["error"]})
                continue
            rows.append(row | {
                "rollout_s": statistics.median(r["rollout_s"]), "rollout_min_s": min(r["rollout_s"]),
                "rollout_max_s": max(r["rollout_s"]), "sync_s": statistics.median(r["sync_s"]),
                "tokens": statistics.mean(r["tokens"]), "tokens_per_s": rates[name],
                "x_fastest": max(rates.values()) / rates[name],
            })  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]], cross: dict[str, Any], skipped: dict[str, str]) -> None:
    print(f"\n{'model':10s} {'params':>9s} {'backend':12s} {'s/rollout (min-max)':>22s} {'sync s':>8s} "
          f"{'tokens':>7s} {'tok/s':>8s} {'x fastest':>9s}")  # fmt: skip
    for r in rows:
        head = f"{r['model']:10s} {r['params'] / 1e6:8.1f}M {r['backend']:12s}"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        spread = f"{r['rollout_s']:.3f} ({r['rollout_min_s']:.3f}-{r['rollout_max_s']:.3f})"
        print(f"{head} {spread:>22s} {r['sync_s']:8.4f} {r['tokens']:7.0f} {r['tokens_per_s']:8.1f} {r['x_fastest']:8.2f}x")
    print("(tok/s: generated tokens per second of rollout + sync, the median over the rounds; x fastest: the fastest "
          "backend's tok/s over this one's)")  # fmt: skip
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if cross["model"] is None:
        print(f"crossover: none on this ladder ({cross['reason']})")
    else:
        below = f", the HF loop at {cross['below']} and below" if cross["below"] else ""
        print(f"crossover: vLLM beats the HF loop from {cross['model']} ({cross['params']:,} parameters) up{below}; "
              f"rollout.auto.CPU_VLLM_MIN_PARAMS = {cross['params']:.3g} (now {CPU_VLLM_MIN_PARAMS:.3g})")  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every model (e.g. rollout.n=8)")
    ap.add_argument("--ladder", type=parse_ladder, help=f"models, smallest first (default {LADDER}; --quick: tiny)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {', '.join(BACKENDS)}")
    ap.add_argument("--repeats", type=int, help="measured rounds per model (default 5; --quick: 1)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds per model run first and not counted (default 1)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (default: torch's, from OMP_NUM_THREADS)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny model, 1 warm-up + 1 round")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/rollout_backends-<device>-<date>.json)")
    args = ap.parse_args(argv)
    args.ladder = args.ladder or parse_ladder("tiny" if args.quick else LADDER)
    args.repeats = args.repeats if args.repeats is not None else 1 if args.quick else 5
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        ap.error(f"--backends: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error(f"--repeats and --threads must be >= 1, --warmup >= 0; got {args.repeats}, {args.threads}, {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        load_config(None, [*TRAINER, *args.overrides])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from visurf_engine.models.hf import load_processor
    from visurf_engine.tasks import prepare_base_model

    backends, skipped = list(args.backends), {}
    if "vllm" in backends and not vllm_importable():
        skipped["vllm"] = (f"vLLM is not importable by {sys.executable}; run this bench with the vLLM environment's "
                           "python (CPU: bash scripts/setup_vllm_cpu.sh VENV_DIR) to time it")  # fmt: skip
        backends.remove("vllm")
        print(f"skipping vllm: {skipped['vllm']}")
    tiny = prepare_base_model(load_config(), progress=False)  # the shipped base model (the default run's)
    tokenizer = load_processor(tiny).tokenizer
    cuda = torch.cuda.is_available()
    tag = ("cpu" if not cuda else device_name().lower().replace(" ", "-")) + ("-quick" if args.quick else "")
    out = ResultsFile(args.out or result_path("rollout_backends", tag))
    cfg = load_config(None, [*TRAINER, *args.overrides])
    payload: dict[str, Any] = {
        "bench": "rollout_backends", "device": device_name(), "python": sys.executable, "threads": args.threads,
        "batch": {"prompts": cfg.train.batch_size, "n": cfg.rollout.n, "max_new_tokens": cfg.rollout.max_new_tokens,
                  "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p},
        "overrides": args.overrides, "repeats": args.repeats, "warmup": args.warmup, "backends": backends,
        "skipped": skipped, "models": [],
    }  # fmt: skip
    print(f"{device_name()}; {args.threads} thread(s); {cfg.train.batch_size} prompts x G = {cfg.rollout.n}, "
          f"max_new_tokens {cfg.rollout.max_new_tokens}; {args.warmup} warm-up + {args.repeats} round(s) per model")
    for name, preset, layers, blocks in args.ladder:
        with tempfile.TemporaryDirectory(prefix="visurf-rollout-bench-") as tmp:
            path = tiny if preset is None else make_checkpoint(preset, layers, blocks, tokenizer, Path(tmp) / "model")
            params = checkpoint_params(path)
            print(f"{name}: {params / 1e6:.1f} M parameters", flush=True)
            try:
                records = measure_model(path, backends, args, Path(tmp) / "run")
            except Exception as e:  # the trainer itself could not be built (out of memory, say)
                records = {b: {"error": error_line(e)} for b in backends}
                print(f"  failed: {records[backends[0]]['error']}")
        payload["models"].append({"model": name, "preset": preset or "shipped tiny base model", "layers": layers,
                                  "blocks": blocks, "params": params, "backends": records,
                                  "torch_threads_after": torch.get_num_threads()})  # fmt: skip
        out.write(payload, complete=False)
    payload["table"] = summary_rows(payload["models"])
    payload["crossover"] = crossover(payload["models"]) if "vllm" in backends else {"model": None, "reason": "vLLM not timed"}
    print_table(payload["table"], payload["crossover"], skipped)
    print(f"\nwrote {out.write(payload, complete=True)}")
    return 1 if any("error" in r for r in payload["table"]) else 0


if __name__ == "__main__":
    sys.exit(main())
