"""Session-wide test setup.

``engine_testing`` (fixtures that spawned ranks import too, e.g. the megatron workers) sits
beside the tests and is put on ``sys.path`` here; multiprocessing's spawn hands the parent's
``sys.path`` to its children. It is not part of the installed package.

Without a GPU the Triton kernels can only run in Triton's interpreter, and
``TRITON_INTERPRET`` is read when ``@triton.jit`` functions are decorated, i.e. at the first
import of any module that defines kernels — possibly transformers, long before the Triton
tests are collected. Setting it here, before any test module imports anything, makes the
order of test files irrelevant.

Tests marked ``cuda`` (GPU-only assertions: storage addresses, CUDA graphs, sleep mode) are
skipped, with the reason, where no CUDA device is visible.

``cache``: a warm-start cache holding the base model of ``engine_testing.runs.SMALL``, built
once per session for every test that runs the tiny end to end.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    from engine_testing.runs import SMALL
    from visurf_engine.config import load_config
    from visurf_engine.tasks import prepare_base_model

    root = str(tmp_path_factory.mktemp("base-cache"))
    prepare_base_model(load_config(None, SMALL + [f"warmstart.cache_dir={root}"]), progress=False)
    return root
