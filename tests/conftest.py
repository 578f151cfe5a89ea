"""Session-wide test setup.

Without a GPU the Triton kernels can only run in Triton's interpreter, and
``TRITON_INTERPRET`` is read when ``@triton.jit`` functions are decorated, i.e. at the first
import of any module that defines kernels — possibly transformers, long before
``test_kernels_triton.py`` is collected. Setting it here, before any test module imports
anything, makes the order of test files irrelevant.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
