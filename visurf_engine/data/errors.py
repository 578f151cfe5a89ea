"""Errors of the data layer. Each names the file, the row and, where one is at fault, the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DataError(Exception):
    """A data file, or a row in it, cannot be used; the message names file, row and field."""


@dataclass(frozen=True)
class BadRow:
    """Why one row was rejected; ``row`` is the 0-based line (JSONL) or row (parquet, arrow) index."""

    file: str
    row: int
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file} row {self.row}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.reason}"


class BadImage(DataError):
    """A row's image, valid by its header, cannot be decoded (found when a step needs it)."""

    def __init__(self, bad: BadRow):
        super().__init__(str(bad))
        self.bad = bad


class FieldError(Exception):
    """A bad value in one field of the row being read (the caller adds file and row)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def describe(value: Any) -> str:
    """A stored value as an error message shows it: its type, and the value unless a container."""
    return type(value).__name__ if value is None or isinstance(value, (dict, list)) else f"{type(value).__name__} {value!r}"
