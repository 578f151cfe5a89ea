"""Where a data file's records are read from, sequentially once (``scan``, to validate) and then
one at a time (``read``, when a step takes the row), never all into memory.

- ``.jsonl``: one JSON object per line; a row's locator is its line's byte offset.
- ``.parquet`` (pyarrow): read by row groups. The scan streams record batches, so at most one
  row group's bytes are in memory; ``read`` decodes the one row group that holds the row (its
  locator is the row index). A row group's bytes therefore bound the memory and the cost of
  reading a row: files whose row groups exceed ``MAX_ROW_GROUP_BYTES`` are refused with the
  way to rewrite them (Hugging Face ``datasets`` writes image data in groups of 100 rows).
- a Hugging Face ``datasets`` directory (``Dataset.save_to_disk``; read with ``load_from_disk``,
  Arrow files memory-mapped: a row costs what it holds). Image features are read undecoded,
  as ``{"bytes", "path"}``; a ``DatasetDict`` directory asks for one split's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from .errors import DataError

MAX_ROW_GROUP_BYTES = 256 * 2**20
SCAN_BATCH = 64  # records per decoded batch while scanning


class JsonlSource:
    def __init__(self, path: Path):
        self.path = path

    def scan(self) -> Iterator[tuple[int, int, bytes]]:
        """``(line index, byte offset, line)`` of every non-blank line."""
        offset = 0
        with self.path.open("rb") as f:
            for index, line in enumerate(f):
                if line.strip():
                    yield index, offset, line
                offset += len(line)

    def read(self, offset: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.readline()


class ParquetSource:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow reports unreadable files with several exception types
            raise DataError(f"{path}: cannot read parquet file: {e}") from e
        meta = self.file.metadata
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        self.starts = np.cumsum([0] + [g.num_rows for g in groups])  # row index of each group's first row
        self._group = None  # (index, table) of the last row group read
        big = max(groups, key=lambda g: g.total_byte_size, default=None)
        if big is not None and big.total_byte_size > MAX_ROW_GROUP_BYTES:
            raise DataError(
                f"{path}: a row group of {big.num_rows} rows holds {big.total_byte_size / 2**20:.0f} MiB; reading one "
                f"row reads its whole group, so groups above {MAX_ROW_GROUP_BYTES // 2**20} MiB are refused. Rewrite "
                "the file with smaller groups, e.g. pyarrow.parquet.write_table(table, out, row_group_size=100), or "
                "datasets.Dataset.from_parquet(path).save_to_disk(dir) and use that directory"
            )

    def scan(self) -> Iterator[tuple[int, int, dict]]:
        """``(row index, row index, record)`` of every row: one row group read at a time (pyarrow's
        batch iterator pre-buffers ahead), turned into Python records a batch at a time."""
        index = 0
        for group in range(self.file.num_row_groups):
            for batch in self.file.read_row_group(group).to_batches(SCAN_BATCH):
                for record in batch.to_pylist():
                    yield index, index, record
                    index += 1

    def read(self, index: int) -> dict:
        """Row ``index``, from its row group (the last group read is kept: file-order reads,
        e.g. an evaluation set, read each group once)."""
        group = int(np.searchsorted(self.starts, index, side="right")) - 1
        if self._group is None or self._group[0] != group:
            self._group = (group, self.file.read_row_group(group))
        return self._group[1].slice(index - int(self.starts[group]), 1).to_pylist()[0]


class DatasetsSource:
    def __init__(self, path: Path):
        self.path = path
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"{path}: a datasets directory needs Hugging Face datasets (pip install 'visurf-engine[datasets]')") from e
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets reports unreadable directories with several exception types
            raise DataError(f"{path}: cannot load the datasets directory: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: holds the splits {', '.join(ds)}; give one split's directory, e.g. {path / next(iter(ds))}")
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))  # {"bytes", "path"}: decoded by the rows
        self.ds = ds

    def scan(self) -> Iterator[tuple[int, int, dict]]:
        index = 0
        for batch in self.ds.iter(batch_size=SCAN_BATCH):
            for values in zip(*batch.values()):
                yield index, index, dict(zip(batch, values))
                index += 1

    def read(self, index: int) -> dict:
        return self.ds[int(index)]


Source = JsonlSource | ParquetSource | DatasetsSource


def open_source(path: Path) -> Source:
    """The source of ``path``: ``.jsonl``, ``.parquet``, or a ``save_to_disk`` directory."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return DatasetsSource(path)
        raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk (no dataset_info.json)")
    readers: dict[str, Any] = {".jsonl": JsonlSource, ".parquet": ParquetSource}
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unsupported data format {path.suffix!r} (expected .jsonl, .parquet or a datasets directory)")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return readers[path.suffix.lower()](path)
