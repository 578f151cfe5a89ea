"""Test setup of the kernels package (runs with or without visurf-engine installed).

``kernel_testing`` (cases, the float64 oracle, tolerances, the vocab-parallel worker) sits
beside the tests and is put on ``sys.path`` here, so spawned ranks can import it too
(multiprocessing's spawn hands the parent's ``sys.path`` to its children).

Without a GPU the Triton kernels run only in Triton's interpreter, and ``TRITON_INTERPRET``
is read when ``@triton.jit`` functions are decorated, i.e. at the first import of any module
that defines kernels — possibly long before ``test_kernels_triton.py`` is collected. Setting
it here, before any test module imports anything, makes the order of test files irrelevant.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
