"""Validate a data file's rows cheaply at start and read them back lazily (``docs/design.md`` §4).

A record has ``image``, ``problem``, ``solution`` and optionally ``id`` (the VisionReasoner /
verl layout). ``image`` is any stored form ``data.images`` reads; ``solution`` is handed as
stored to the caller's ``parse_solution``. Any further fields are kept in ``Row.meta`` beside
the provenance ``file`` and ``row``.

``load_rows`` scans the source once (``data.sources``: JSONL, parquet by row groups, a
``datasets`` directory): per record the fields are checked, the solution parsed and the image
header read (format and size, no pixels), then the record is dropped. What stays in memory is
three int64/uint64 numbers per usable row (locator, row index, id fingerprint) in a
``RowTable``, whose item ``i`` re-reads the record from the file and gives a ``Row`` whose
image is decoded when used. Memory is therefore independent of the row count up to those
24 bytes a row, and start-up costs one sequential read of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import BadRow, DataError, FieldError, describe
from .images import ImageRef
from .rows import Row
from .sources import Source, open_source

_FIELDS = ("id", "image", "problem", "solution")
_POLICIES = ("error", "skip")


class RowTable(Sequence[Row]):
    """The usable rows of one data file, in file order, read back on access (module docstring)."""

    def __init__(self, source: Source, parse_solution: Callable[[Any], Any], locators: np.ndarray, rows: np.ndarray,
                 fingerprints: np.ndarray):  # fmt: skip
        self.source, self.parse_solution = source, parse_solution
        self.locators, self.rows, self.fingerprints = locators, rows, fingerprints

    def __len__(self) -> int:
        return len(self.locators)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        i = range(len(self))[i]  # IndexError, negative indices
        try:
            return _to_row(self.source.read(int(self.locators[i])), self.source.path, int(self.rows[i]), self.parse_solution)
        except FieldError as e:  # the file changed since it was validated
            raise DataError(str(BadRow(str(self.source.path), int(self.rows[i]), e.field, e.reason))) from e

    def take(self, positions: Sequence[int] | np.ndarray) -> RowTable:
        """The rows at ``positions``, in that order."""
        p = np.asarray(positions, dtype=np.int64)
        return RowTable(self.source, self.parse_solution, self.locators[p], self.rows[p], self.fingerprints[p])

    def split(self, fraction: float, seed: int) -> tuple[RowTable, RowTable]:
        """``(kept, held out)``: a row is held out iff ``u < fraction``, with ``u`` in [0, 1) the
        64-bit blake2b hash of its id fingerprint keyed by ``seed``: a fixed, seeded choice per row
        id, whatever the file order, the other rows or the policy for bad rows."""
        key = str(seed).encode()
        u = np.fromiter((int.from_bytes(hashlib.blake2b(f.tobytes(), digest_size=8, key=key).digest(), "little")
                         for f in self.fingerprints), dtype=np.float64, count=len(self)) / 2.0**64  # fmt: skip
        held = u < fraction
        return self.take(np.flatnonzero(~held)), self.take(np.flatnonzero(held))


@dataclass
class LoadResult:
    """The usable rows of a file and the rows skipped under ``on_bad_row="skip"``."""

    rows: RowTable
    skipped: list[BadRow]


def load_rows(
    path: str | os.PathLike,
    parse_solution: Callable[[Any], Any],
    on_bad_row: str = "error",
) -> LoadResult:
    """Validate every row of a ``.jsonl`` / ``.parquet`` file or a ``datasets`` directory, decoding no image.

    ``parse_solution`` receives the stored solution (JSON text or an object) and raises
    ValueError (or TypeError) on bad input. A bad row raises DataError with
    ``on_bad_row="error"``; with ``"skip"`` it is left out and recorded in ``skipped``.
    A file without any usable row raises DataError either way. An image that is bad past its
    header is found when decoded (``data.decoding``).
    """
    if on_bad_row not in _POLICIES:
        raise ValueError(f"on_bad_row must be one of {_POLICIES}, got {on_bad_row!r}")
    source = open_source(Path(path))
    locators, rows, fingerprints = [], [], []
    skipped: list[BadRow] = []
    for index, locator, raw in source.scan():
        try:
            row = _to_row(raw, source.path, index, parse_solution)
            row.source.header()
        except FieldError as fault:
            bad = BadRow(str(source.path), index, fault.field, fault.reason)
            if on_bad_row == "error":
                raise DataError(str(bad)) from fault.__cause__
            skipped.append(bad)
            continue
        locators.append(locator)
        rows.append(index)
        fingerprints.append(hashlib.blake2b(row.id.encode(), digest_size=8).digest())
    if not rows:
        detail = f"all {len(skipped)} rows are bad, first: {skipped[0]}" if skipped else "it holds no rows"
        raise DataError(f"{source.path}: no usable rows ({detail})")
    table = RowTable(source, parse_solution, np.array(locators, dtype=np.int64), np.array(rows, dtype=np.int64),
                     np.frombuffer(b"".join(fingerprints), dtype=np.uint64).copy())  # fmt: skip
    return LoadResult(table, skipped)


def _to_row(raw: bytes | dict, path: Path, index: int, parse_solution: Callable[[Any], Any]) -> Row:
    """Validate one record and convert it (its image as an ``ImageRef``); raises FieldError."""
    record = _as_record(raw)
    problem = _required(record, "problem")
    if not isinstance(problem, str) or not problem.strip():
        raise FieldError("problem", f"expected a non-empty string, got {describe(problem)}")
    try:
        solution = parse_solution(_required(record, "solution"))
    except (ValueError, TypeError) as e:
        raise FieldError("solution", f"cannot parse: {e}") from e
    row_id = record.get("id")
    if row_id is None:
        row_id = f"{path.stem}:{index}"
    elif isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise FieldError("id", f"expected a string or integer, got {describe(row_id)}")
    image = ImageRef(_required(record, "image"), path.parent, str(path), index)
    meta = {key: value for key, value in record.items() if key not in _FIELDS}
    meta.update(file=str(path), row=index)
    return Row(id=str(row_id), source=image, problem=problem, solution=solution, meta=meta)


def _as_record(raw: bytes | dict) -> dict:
    """A parquet / arrow record as is; a JSONL line decoded into a JSON object."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise FieldError(None, f"invalid JSON line: {e}") from e
    if not isinstance(record, dict):
        raise FieldError(None, f"expected a JSON object, got {describe(record)}")
    return record


def _required(record: dict, name: str) -> Any:
    if name not in record:
        raise FieldError(name, "missing")
    if record[name] is None:
        raise FieldError(name, "is null")
    return record[name]
