"""Packaging: ``kernels/`` is importable only as ``visurf_engine.kernels``, and a run from the
repository root (where ``kernels/`` sits on ``sys.path``) does not make transformers believe the
Hugging Face ``kernels`` package is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_installed_under_visurf_engine():
    import visurf_engine.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
    assert {"fused_policy_loss", "fused_logprobs"} <= set(k.__all__)


def test_repo_root_does_not_fake_hf_kernels():
    code = "import transformers.utils.import_utils as u; print(u.is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
