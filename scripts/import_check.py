"""Import every module of visurf_engine and visurf_kernels: ``python scripts/import_check.py``.

Walks both packages (``pkgutil.iter_modules``, into every subpackage) and imports each module. A
module whose import fails because an optional stack is absent (``OPTIONAL``: vllm, megatron, trl,
verl; the failing import names it, and it is not installed) is skipped, and its subpackage with it,
and named; any other failure (a required dependency missing, an API the installed torch, Triton or
transformers lacks) prints its traceback and fails the check (exit 1). ``scripts/setup_image_cpu.sh``
runs it in the GPU image's versions, so an import that those versions break is found before a GPU
call.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import traceback

PACKAGES = ("visurf_engine", "visurf_kernels")
OPTIONAL = ("vllm", "megatron", "trl", "verl")


def missing_optional(exc: BaseException) -> str | None:
    """The absent optional module ``exc`` is about, or None (any other failure)."""
    name = getattr(exc, "name", None) or ""
    top = name.split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and top in OPTIONAL and importlib.util.find_spec(top) is None:
        return name
    return None


def walk(package: str, imported: list[str], skipped: dict[str, str], failed: dict[str, str]) -> None:
    """Import ``package``, then every module below it (depth first); record each outcome."""
    try:
        module = importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001  (every failure is recorded, the walk goes on)
        absent = missing_optional(exc)
        if absent:
            skipped[package] = absent
        else:
            failed[package] = traceback.format_exc()
        return
    imported.append(package)
    for info in pkgutil.iter_modules(getattr(module, "__path__", []), package + "."):
        if not info.name.endswith(".__main__"):
            walk(info.name, imported, skipped, failed)


def main() -> int:
    imported: list[str] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for package in PACKAGES:
        walk(package, imported, skipped, failed)
    for name, tb in failed.items():
        print(f"FAILED {name}:\n{tb}", file=sys.stderr)
    print(f"imported {len(imported)} modules of {', '.join(PACKAGES)}")
    for name, absent in skipped.items():
        print(f"  skipped {name}: needs {absent} (optional, not installed)")
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
