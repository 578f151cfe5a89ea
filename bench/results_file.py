"""A benchmark's results file, written as the bench goes, and the error line of a failed row.

``ResultsFile(path).write(payload, complete)`` writes ``{"provenance": ..., **payload,
"complete": complete}`` atomically (a temporary file beside it, then ``os.replace``), so the
file on disk is always a whole JSON document: the rows measured so far with ``complete:
false``, then everything with ``complete: true``. A bench that calls it after every measured
row loses at most the row in progress when it is killed (``bench/gpu.sh`` gives each stage a
time budget). The provenance (``visurf_engine.provenance``) is taken once, when the file is
opened, so its ``date`` is the run's start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from visurf_engine.provenance import provenance


class ResultsFile:
    """One results file at ``path`` (directories created), rewritten whole by each ``write``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.provenance = provenance()

    def write(self, payload: dict[str, Any], complete: bool) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"provenance": self.provenance, **payload, "complete": complete}, indent=2) + "\n")
        os.replace(tmp, self.path)
        return self.path


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): what a failed row records as its
    ``error`` (``OutOfMemoryError: CUDA out of memory. ...``)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
