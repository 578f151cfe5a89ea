"""``PromptSampler``: which training rows each step takes.

Epoch-wise seeded permutations of the ``n`` rows (epoch ``e`` uses seed ``seed + e``), read
``k`` at a time, crossing into the next epoch's permutation when one runs out. Its whole
state is two integers (epoch, position), so a checkpoint resumes the exact sequence. A row
whose image turns out bad is replaced by ``replacement(step, slot, attempt)``, a draw that
depends on nothing else, so it moves no state: every rank and a resumed run draw the same.
"""

from __future__ import annotations

import numpy as np
import torch


class PromptSampler:
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _perm(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self, k: int) -> list[int]:
        """The next ``k`` row indices."""
        out, perm = [], self._perm()
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                perm = self._perm()
            take = min(k - len(out), self.n - self.pos)
            out += perm[self.pos : self.pos + take]
            self.pos += take
        return out

    def replacement(self, step: int, slot: int, attempt: int) -> int:
        """A row index uniform over the ``n`` rows, a pure function of (seed, step, slot, attempt)."""
        return int(np.random.default_rng([self.seed, step, slot, attempt]).integers(self.n))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
