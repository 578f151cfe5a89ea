"""Which absent-object queries a run answers ``[]``: ``python scripts/absent_breakdown.py RUN_DIR [RUN_DIR ...]``.

The shapes task asks for a (colour, shape) pair that is not drawn; the image may still hold that
colour (as another shape) or that shape (in another colour). For the run's final checkpoint, on
its held-out absent rows, the greedy ``[]`` share (N-Acc) by kind: neither the colour nor the
shape in the image, only the shape, only the colour, both (each as another object). A policy
that checks only whether the colour is present answers ``[]`` on the first two kinds and a box
on the last two. Prints one table per run and writes ``absent_breakdown.json`` beside its
``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_model

from diagnose_collapse import run_trainer  # scripts/: the script's own directory is on sys.path
from visurf_engine import checkpoint as ckpt
from visurf_engine.eval.evaluate import greedy_completions

KINDS = {(False, False): "neither in image", (False, True): "shape in image", (True, False): "colour in image",
         (True, True): "colour and shape in image"}  # fmt: skip


def kind(row) -> str:
    """What the absent query of ``row`` shares with the drawn objects."""
    m = row.meta
    return KINDS[(m["colour"] in {o[0] for o in m["objects"]}, m["shape"] in {o[1] for o in m["objects"]})]


def breakdown(run: Path) -> dict[str, dict[str, float]]:
    """``{kind: {"rows": n, "n_acc": greedy [] share}}`` for the base model and the run's last checkpoint."""
    last = ckpt.latest_checkpoint(run / "checkpoints")
    if last is None:
        raise SystemExit(f"{run}: no checkpoint (checkpoints/latest)")
    state = json.loads((last / "state.json").read_text())
    trainer = run_trainer(state["config"])
    rows = [r for r in trainer.data.eval if not r.solution]
    out = {}
    for name, weights in (("base", None), (f"step {state['step']}", last)):
        if weights is not None:
            load_model(trainer.policy.model, str(weights / "model.safetensors"))
        texts = greedy_completions(trainer.policy, trainer.rollout, rows)
        by_kind = defaultdict(list)
        for row, text in zip(rows, texts):
            by_kind[kind(row)].append(trainer.spec.extract_answer(text) == [])
        out[name] = {k: {"rows": len(v), "n_acc": sum(v) / len(v)} for k, v in sorted(by_kind.items())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for run in args.runs:
        table = breakdown(run)
        (run / "absent_breakdown.json").write_text(json.dumps(table, indent=1))
        print(f"\n{run}\n| model | " + " | ".join(f"{k} (rows)" for k in KINDS.values()) + " |")
        for name, kinds in table.items():
            print(f"| {name} | " + " | ".join(f"{kinds[k]['n_acc']:.2f} ({kinds[k]['rows']})" if k in kinds else "-"
                                            for k in KINDS.values()) + " |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
