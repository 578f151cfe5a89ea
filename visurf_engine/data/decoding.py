"""The decode-time side of ``data.on_bad_row``: rows validated by their image header whose
pixels turn out not to decode (e.g. a truncated JPEG).

- ``fetch_rows`` (a training step): ``error`` raises the ``BadImage`` naming file, row and
  field; ``skip`` draws a replacement for the slot, ``replacement(slot, attempt)`` for
  attempts 0, 1, ..., until one decodes, and reports the bad rows (the trainer counts them).
  A replacement that is a pure function of the step and slot keeps every rank and a resumed
  run on the same rows (``PromptSampler.replacement``).
- ``decodable`` (an evaluation set, checked once at start): the first ``k`` rows that decode,
  in order; ``error`` raises at the first bad one.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .errors import BadImage, BadRow, DataError
from .rows import Row

MAX_DRAWS = 100  # replacement attempts for one slot before giving up


def fetch_rows(
    rows: Sequence[Row], indices: Sequence[int], on_bad_row: str, replacement: Callable[[int, int], int]
) -> tuple[list[Row], list[BadRow]]:
    """``rows[i]`` for each ``i`` of ``indices``, images decoded (``Row.decoded``), and the bad
    rows met (module docstring)."""
    out, bad = [], []
    for slot, index in enumerate(indices):
        for attempt in range(MAX_DRAWS + 1):
            try:
                out.append(rows[index].decoded())
                break
            except BadImage as e:
                if on_bad_row == "error":
                    raise
                bad.append(e.bad)
                index = replacement(slot, attempt)
        else:
            raise DataError(f"{MAX_DRAWS} rows in a row had an image that does not decode; last: {bad[-1]}")
    return out, bad


def decodable(rows: Sequence[Row], k: int, on_bad_row: str) -> tuple[list[int], list[BadRow]]:
    """Positions of the first ``k`` rows whose image decodes, and the bad rows before them."""
    keep, bad = [], []
    for i in range(len(rows)):
        if len(keep) == k:
            break
        try:
            rows[i].image
            keep.append(i)
        except BadImage as e:
            if on_bad_row == "error":
                raise
            bad.append(e.bad)
    return keep, bad
