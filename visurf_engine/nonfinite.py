"""The non-finite guard's bookkeeping (``train.max_skipped_steps``).

``Learner.step`` skips an optimizer step whose loss or grad norm is non-finite, on every rank;
``SkipCounter`` counts those steps (``total``, kept in checkpoints, and ``consecutive``), warns
naming the step, the norm and this rank's members, and after ``max_consecutive`` skips in a row
stops the run with ``NonFiniteError`` before the step is checkpointed, so the last checkpoint is
one from before the failure.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """``train.max_skipped_steps`` consecutive optimizer steps had a non-finite loss or grad norm."""


class SkipCounter:
    def __init__(self, max_consecutive: int, rank: int = 0):
        self.max_consecutive, self.rank = max_consecutive, rank
        self.total = self.consecutive = 0

    def state(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = state["total"], state["consecutive"]

    def count(self, step: int, skipped: bool, grad_norm: float, labels: Sequence[str]) -> None:
        """Count an optimizer step of ``step`` (0-based) the guard skipped, naming its members on this rank."""
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        log.warning("step %d: non-finite loss or grad norm (%s): optimizer step skipped (%d in a row, %d in the run); "
                    "members on rank %d: %s", step + 1, grad_norm, self.consecutive, self.total, self.rank,
                    ", ".join(labels))  # fmt: skip

    def check(self, done: int, last_checkpoint: Path | None) -> None:
        """Raise ``NonFiniteError`` once ``max_consecutive`` steps in a row were skipped (after step ``done``)."""
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive optimizer steps (the last in step {done}) had a non-finite loss or "
                f"grad norm (train.max_skipped_steps={self.max_consecutive}); the warnings above name their members. "
                f"Stopped before checkpointing; the last checkpoint, {last_checkpoint or '(none yet)'}, is intact: fix "
                "the cause and resume with train.resume=true"
            )
