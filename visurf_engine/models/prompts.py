"""``Prompts``: a step's prompts, encoded once and kept unpadded per prompt, so any set of
(prompt, completion) pairs — G rollouts, the gold, several micro-batches — can be collated
from them on demand (``collate``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from PIL import Image


@dataclass
class Prompts:
    """Encoded prompts; every list is indexed by prompt."""

    input_ids: list[torch.Tensor]  # [P_i] int64 (one <|image_pad|> per merged image token)
    mm_token_type_ids: list[torch.Tensor]  # [P_i] (0 text, 1 image)
    pixel_values: list[torch.Tensor]  # [patches_i, C*T*p*p]
    image_grid_thw: list[torch.Tensor]  # [3]
    images: list[Image.Image]  # the RGB images themselves (engines that run their own processor)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: Sequence[int]) -> Prompts:
        """The prompts ``idx`` (repeats allowed), in that order."""
        return Prompts(*([getattr(self, f.name)[i] for i in idx] for f in fields(self)))
