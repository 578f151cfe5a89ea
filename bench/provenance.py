"""Where a benchmark ran (package versions, the device's name, the commit, the command), and
its JSON under ``bench/results/``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def commit() -> str | None:
    """``git rev-parse HEAD`` of the repository, ``+dirty`` with uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def command() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def write_results(bench: str, tag: str, device: torch.device, fields: dict, packages: tuple[str, ...],
                  out: Path | None = None) -> Path:  # fmt: skip
    """Write ``fields`` with the provenance (date, device, command, commit, the versions of python,
    torch, CUDA and ``packages``) to ``out`` or ``bench/results/<bench>-<tag>-<date>.json``."""
    stamp = dt.datetime.now(dt.timezone.utc)
    out = out or RESULTS / f"{bench}-{tag}-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    payload = {
        "bench": bench, "date": stamp.isoformat(), "device": device_name(device), "command": command(), "commit": commit(),
        "versions": versions | {pkg: version(pkg) for pkg in packages}, **fields,
    }  # fmt: skip
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")
    return out
