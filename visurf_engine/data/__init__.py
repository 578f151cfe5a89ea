"""Rows, data files (JSONL / parquet / a ``datasets`` directory), read lazily, and the step's prompt sampler."""

from .decoding import decodable, fetch_rows
from .errors import BadImage, BadRow, DataError
from .images import ImageRef
from .loading import LoadResult, RowTable, load_rows
from .rows import Row
from .sampler import PromptSampler
from .writing import write_dataset

__all__ = ["BadImage", "BadRow", "DataError", "ImageRef", "LoadResult", "PromptSampler", "Row", "RowTable", "decodable",
           "fetch_rows", "load_rows", "write_dataset"]
