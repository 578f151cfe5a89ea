"""Read rows from JSONL or parquet files (the VisionReasoner/verl layout), naming every bad row.

A record has ``image``, ``problem``, ``solution`` and optionally ``id``. ``image`` is a path
(relative to the data file's directory, or absolute), raw bytes, a ``data:image/...;base64,``
URI, or a Hugging Face style dict ``{"bytes": ..., "path": ...}`` whose bytes are raw (parquet)
or base64 text (JSONL). ``solution`` is handed as stored to the caller's ``parse_solution``.
Any further fields are kept in ``Row.meta`` beside the provenance ``file`` and ``row``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from .rows import Row

_FIELDS = ("id", "image", "problem", "solution")
_POLICIES = ("error", "skip")


class DataError(Exception):
    """A data file, or a row in it, cannot be used; the message names file, row and field."""


@dataclass(frozen=True)
class BadRow:
    """Why one row was rejected; ``row`` is the 0-based line (JSONL) or row (parquet) index."""

    file: str
    row: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file} row {self.row}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass
class LoadResult:
    """The usable rows of a file and the rows skipped under ``on_bad_row="skip"``."""

    rows: list[Row]
    skipped: list[BadRow]


class _Fault(Exception):
    """Internal: a bad value in one field of the row being converted."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def load_rows(
    path: str | os.PathLike,
    parse_solution: Callable[[Any], Any],
    on_bad_row: str = "error",
) -> LoadResult:
    """Load every row of a ``.jsonl`` or ``.parquet`` file, decoding images eagerly to RGB.

    ``parse_solution`` receives the stored solution (JSON text or an object) and raises
    ValueError (or TypeError) on bad input. A bad row raises DataError with
    ``on_bad_row="error"``; with ``"skip"`` it is left out and recorded in ``skipped``.
    A file without any usable row raises DataError either way.
    """
    if on_bad_row not in _POLICIES:
        raise ValueError(f"on_bad_row must be one of {_POLICIES}, got {on_bad_row!r}")
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported data format {path.suffix!r} (expected .jsonl or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[Row] = []
    skipped: list[BadRow] = []
    for index, raw in reader(path):
        try:
            rows.append(_to_row(raw, path, index, parse_solution))
        except _Fault as fault:
            bad = BadRow(str(path), index, fault.field, fault.reason)
            if on_bad_row == "error":
                raise DataError(str(bad)) from fault.__cause__
            skipped.append(bad)
    if not rows:
        detail = f"all {len(skipped)} rows are bad, first: {skipped[0]}" if skipped else "it holds no rows"
        raise DataError(f"{path}: no usable rows ({detail})")
    return LoadResult(rows, skipped)


def _read_jsonl(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line index, raw line) for every non-blank line; decoding happens per row."""
    with path.open("rb") as f:
        for index, line in enumerate(f):
            if line.strip():
                yield index, line


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (row index, record) batch by batch, so only one batch of raw bytes is held."""
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow reports unreadable files with several exception types
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    index = 0
    for batch in table.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            yield index, record
            index += 1


_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _to_row(raw: bytes | dict, path: Path, index: int, parse_solution: Callable[[Any], Any]) -> Row:
    """Validate one record and convert it; raises _Fault naming the bad field."""
    record = _as_record(raw)
    problem = _required(record, "problem")
    if not isinstance(problem, str) or not problem.strip():
        raise _Fault("problem", f"expected a non-empty string, got {_describe(problem)}")
    try:
        solution = parse_solution(_required(record, "solution"))
    except (ValueError, TypeError) as e:
        raise _Fault("solution", f"cannot parse: {e}") from e
    row_id = record.get("id")
    if row_id is None:
        row_id = f"{path.stem}:{index}"
    elif isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise _Fault("id", f"expected a string or integer, got {_describe(row_id)}")
    image = _image(_required(record, "image"), path.parent)
    meta = {key: value for key, value in record.items() if key not in _FIELDS}
    meta.update(file=str(path), row=index)
    return Row(id=str(row_id), image=image, problem=problem, solution=solution, meta=meta)


def _as_record(raw: bytes | dict) -> dict:
    """A parquet record as is; a JSONL line decoded into a JSON object."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _Fault(None, f"invalid JSON line: {e}") from e
    if not isinstance(record, dict):
        raise _Fault(None, f"expected a JSON object, got {_describe(record)}")
    return record


def _required(record: dict, name: str) -> Any:
    if name not in record:
        raise _Fault(name, "missing")
    if record[name] is None:
        raise _Fault(name, "is null")
    return record[name]


def _describe(value: Any) -> str:
    return type(value).__name__ if value is None or isinstance(value, (dict, list)) else f"{type(value).__name__} {value!r}"


def _image(value: Any, base_dir: Path) -> Image.Image:
    """Decode an image given as a path, bytes, a base64 data URI or an HF-style dict."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            data = value["bytes"]
            return _decode(_b64decode(data) if isinstance(data, str) else data, "embedded bytes")
        if value.get("path") is not None:
            return _image(value["path"], base_dir)
        raise _Fault("image", "dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), "embedded bytes")
    if isinstance(value, str) and value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise _Fault("image", f"unsupported data URI {header!r} (only base64 is supported)")
        return _decode(_b64decode(payload), "data URI")
    if isinstance(value, str):
        try:
            data = (base_dir / value).read_bytes()  # an absolute ``value`` replaces base_dir
        except FileNotFoundError:
            raise _Fault("image", f"cannot open {value!r}: file not found") from None
        except OSError as e:
            raise _Fault("image", f"cannot open {value!r}: {e.strerror or e}") from e
        return _decode(data, repr(value))
    raise _Fault("image", f"expected a path, bytes, a data URI or a {{'bytes', 'path'}} dict, got {_describe(value)}")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise _Fault("image", f"invalid base64: {e}") from e


def _decode(data: bytes, what: str) -> Image.Image:
    """Fully decode to RGB now, so a corrupt image fails here, with its row named."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError as e:
        raise _Fault("image", f"cannot decode {what}: unrecognised image format") from e
    except Exception as e:  # PIL reports corrupt data with many exception types
        raise _Fault("image", f"cannot decode {what}: {e}") from e
