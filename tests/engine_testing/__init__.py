"""Test fixtures of the engine (not installed): ``megatron`` (the spawned megatron-backend tests),
``runs`` (the tiny end-to-end settings, test rewards and fault paradigms, runs in a fresh
process), ``train`` (the entry point those runs use, with a SIGKILL injectable) and
``require_vllm`` (the gate of the vLLM test modules)."""


from __future__ import annotations

import os

import pytest


def require_vllm() -> None:
    """Skip the calling test module where vLLM is not installed, or fail it if ``VISURF_REQUIRE_VLLM=1``
    (CI, in the vLLM environment: the vLLM tests must run there, never be skipped)."""
    if os.environ.get("VISURF_REQUIRE_VLLM") == "1":
        import vllm  # noqa: F401  (an ImportError fails the module)
    else:
        pytest.importorskip("vllm")
