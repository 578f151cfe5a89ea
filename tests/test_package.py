"""Packaging: the kernels are their own package (``kernels/visurf_kernels``, import name
``visurf_kernels``) that imports and passes its tests without visurf-engine; the folder above it
is not a second importable copy; test fixtures are not shipped in either package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_one_package_where_their_import_path_says():
    import visurf_kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels" / "visurf_kernels"
    assert {"LossSpec", "fused_policy_loss", "fused_logprobs", "FusedPolicyLoss"} <= set(k.__all__)
    code = "import importlib.util as u; print(u.find_spec('visurf_engine.kernels'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_repo_root_kernels_folder_is_no_second_copy_and_no_fake_hf_kernels():
    code = (
        "import kernels, transformers.utils.import_utils as u; "
        "print(hasattr(kernels, 'fused_policy_loss'), getattr(kernels, '__file__', None), u.is_kernels_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None", "False"]  # at most an empty namespace package


def test_kernels_import_nothing_of_the_engine():
    offenders = [p for p in (ROOT / "kernels").rglob("*.py") if "visurf_engine" in p.read_text()]
    assert offenders == []


def test_kernels_tests_pass_without_visurf_engine():
    """The kernel package's own suite (Triton and TP cases excluded here for time: they run in
    the main suite) in a process where importing ``visurf_engine`` fails."""
    code = (
        "import sys; sys.modules['visurf_engine'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--rootdir', 'kernels', '-c', '/dev/null', "
        "'--import-mode=importlib', 'kernels/tests/test_kernels.py', '-k', 'public_api or module_wrapper or fp32']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout


def test_no_test_fixtures_in_the_installed_packages():
    shipped = [*(ROOT / "visurf_engine").rglob("*.py"), *(ROOT / "kernels" / "visurf_kernels").rglob("*.py")]
    assert not [p for p in shipped if p.stem in ("testing", "conftest") or p.stem.startswith("test_")]
