"""Rows, data files (JSONL/parquet) and the embedded shapes task."""

from .loading import BadRow, DataError, LoadResult, load_rows
from .rows import Row
from .shapes import make_probe_split, make_split, think_trace
from .writing import write_dataset

__all__ = [
    "BadRow",
    "DataError",
    "LoadResult",
    "Row",
    "load_rows",
    "make_probe_split",
    "make_split",
    "think_trace",
    "write_dataset",
]
