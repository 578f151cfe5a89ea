"""Build (or check) the base model shipped with the package: ``python scripts/build_base_model.py [--check]``.

The embedded default's base model (``visurf_engine.tasks.shapes.base_model``: tokenizer, tiny
Qwen2.5-VL, 1000-step positive-only SFT warm start) is built with ``save_base_model``, the
function the cache of any other recipe uses, on one torch thread, and written to ``--out``
(default: the shipped location, ``visurf_engine/tasks/shapes/shipped_base_model/``) with a
``manifest.json``: the recipe, the SHA-256 of every file and where it was built. About 3-4
minutes on one CPU core. Run it, and commit the result, whenever the recipe changes (the
recipe's ``VERSION``, a ``warmstart`` default, the tokenizer or model config): until then the
default config builds and caches its own base model, and the tests say the shipped one is stale.

``--check`` writes nothing: it rebuilds into a temporary directory and exits 1 unless every file
has the SHA-256 the manifest at ``--out`` records (and the recipe is the manifest's). The build
is deterministic for one CPU model, thread count and set of package versions; the manifest names
those it was built with, so a mismatch on another CPU or other versions is expected.

``key=value`` overrides (as ``visurf_engine.train`` takes them) change the recipe, for tests and
experiments; the shipped model is built with none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from visurf_engine.config import load_config
from visurf_engine.provenance import cpu_model, versions
from visurf_engine.tasks.shapes.base_model import MANIFEST, SHIPPED, file_digests, recipe, save_base_model, write_manifest


def build(cfg, out: Path, *, progress: bool) -> dict:
    """Build the base model of ``cfg`` into ``out`` (replacing it whole: written to a temporary
    sibling, then renamed) with its manifest; returns the manifest."""
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = write_manifest(cfg, tmp, save_base_model(cfg, tmp, progress=progress))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest


def check(cfg, out: Path, *, progress: bool) -> list[str]:
    """What differs between the base model at ``out`` as its manifest records it and the base
    model of ``cfg``, one line per difference; empty when they are the same. The recipe and the
    files on disk are compared first; only if they match is the model rebuilt and compared."""
    if not (out / MANIFEST).is_file():
        return [f"{out / MANIFEST}: no manifest; build it with python scripts/build_base_model.py"]
    recorded = json.loads((out / MANIFEST).read_text())
    if recorded["recipe"] != recipe(cfg):
        return [f"recipe: {out} was built with {recorded['recipe']}, this config's is {recipe(cfg)}; "
                "rebuild it with python scripts/build_base_model.py"]  # fmt: skip
    problems = _differences(file_digests(out), recorded["files"], f"{out} on disk")
    if problems:
        return problems
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build(cfg, Path(tmp) / "base", progress=progress)["files"]
    problems = _differences(rebuilt, recorded["files"], "rebuilt")
    if problems:
        built = recorded["built_with"]
        problems.append(f"the manifest's model was built on {built['cpu']} with {built['versions']}, this one on "
                        f"{cpu_model()} with {versions()}: a rebuild is bit-exact only on the same CPU model and versions")  # fmt: skip
    return problems


def _differences(files: dict[str, str], recorded: dict[str, str], what: str) -> list[str]:
    return [f"{name}: {what} {files.get(name)}, manifest {recorded.get(name)}"
            for name in sorted(set(files) | set(recorded)) if files.get(name) != recorded.get(name)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED, help="the base model directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="rebuild into a temporary directory and compare with --out")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (the shipped model has none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the shipped build's thread count: reductions are ordered by it
    cfg = load_config(None, args.overrides)
    progress = sys.stderr.isatty()
    if not args.check:
        manifest = build(cfg, args.out, progress=progress)
        print(f"{args.out}: built, final warm-start NLL {manifest['final_nll_ema']:.4f}, "
              f"{sum((args.out / f).stat().st_size for f in manifest['files']) / 1e6:.2f} MB")  # fmt: skip
        return 0
    problems = check(cfg, args.out, progress=progress)
    print("\n".join(problems) or f"{args.out}: a rebuild matches its manifest, file for file",
          file=sys.stderr if problems else sys.stdout)  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
