"""The row schema every task and data file is turned into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Row:
    """One prompt with its gold answer.

    ``image`` is decoded RGB; ``solution`` is whatever the task's parser made of the
    stored answer; ``meta`` is free-form (task facts such as ``{"absent": True}``, or
    provenance ``{"file": ..., "row": ...}`` for rows read from disk).
    """

    id: str
    image: Image.Image
    problem: str
    solution: Any
    meta: dict = field(default_factory=dict)
