"""The row schema every task and data file is turned into."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from .images import ImageRef


@dataclass
class Row:
    """One prompt with its gold answer.

    ``source`` is the decoded RGB image (an in-memory task such as shapes), or an ``ImageRef``
    saying where a data file stores it; ``image`` gives the pixels either way, decoding a
    reference on every access (``decoded()`` keeps one decode). ``solution`` is whatever the
    task's parser made of the stored answer; ``meta`` is free-form (task facts such as
    ``{"absent": True}``, or provenance ``{"file": ..., "row": ...}`` for rows read from disk).
    """

    id: str
    source: Image.Image | ImageRef
    problem: str
    solution: Any
    meta: dict = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        """The RGB pixels (``BadImage``, naming file, row and field, if a stored one cannot be decoded)."""
        return self.source.decode() if isinstance(self.source, ImageRef) else self.source

    def decoded(self) -> Row:
        """This row with its image decoded once, in memory."""
        return replace(self, source=self.image) if isinstance(self.source, ImageRef) else self
