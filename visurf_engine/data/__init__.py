"""Rows, data files (JSONL / parquet) and the step's prompt sampler."""

from .loading import BadRow, DataError, LoadResult, load_rows
from .rows import Row
from .sampler import PromptSampler
from .writing import write_dataset

__all__ = ["BadRow", "DataError", "LoadResult", "PromptSampler", "Row", "load_rows", "write_dataset"]
