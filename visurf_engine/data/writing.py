"""Write rows to a data file that ``load_rows`` reads back (images as PNG, solutions as JSON)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .rows import Row

FORMATS = ("jsonl", "parquet")
ROW_GROUP_SIZE = 100  # as Hugging Face datasets writes image data


def write_dataset(rows: Sequence[Row], directory: str | os.PathLike, fmt: str = "jsonl") -> Path:
    """Write ``rows`` under ``directory`` (created if needed) and return the data file's path.

    ``jsonl``: ``data.jsonl`` plus ``images/NNNNNN.png`` referenced by relative path.
    ``parquet``: ``data.parquet`` with the PNG bytes in a binary ``image`` column, in row
    groups of ``ROW_GROUP_SIZE`` rows (a row is read back by reading its group).
    Each ``solution`` is stored as compact JSON text; ``meta`` is not written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"data.{fmt}"
    records = [
        {"id": row.id, "problem": row.problem, "solution": json.dumps(row.solution, separators=(",", ":"))}
        for row in rows
    ]
    if fmt == "jsonl":
        (directory / "images").mkdir(exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for index, (row, record) in enumerate(zip(rows, records)):
                record["image"] = f"images/{index:06d}.png"
                row.image.save(directory / record["image"], format="PNG")
                f.write(json.dumps(record) + "\n")
    else:
        for row, record in zip(rows, records):
            record["image"] = _png(row.image)
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=ROW_GROUP_SIZE)
    return path


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
