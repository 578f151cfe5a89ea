"""Writes that survive a crash or a power loss: fsync, and atomic replacement of a file.

``os.replace`` is atomic against other processes and against a crash of this one, but after a
power loss the new name may point at data that never reached the disk unless the data were
fsynced first, and the rename itself is durable only once its directory is fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable(path: Path, write: Callable[[Path], object]) -> None:
    """``write(path)``, then fsync the file."""
    write(path)
    fsync(path)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: a reader, a crash or a power loss sees the old content or
    the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)
