"""Qwen2-VL / Qwen2.5-VL through transformers: processor and loading from a local directory.

Images go through the PIL image processor (``Qwen2VLImageProcessorPil``; the torchvision one
cannot run beside a CPU build of torch), or by default through its native subclass
(``image_processor.py``, same outputs). The processor is image-only because the stock
one insists on a torchvision video processor; transformers derives a processor's parts from
its ``__init__`` signature, so naming only the image processor and tokenizer is enough.
Models load with ``models.attention``'s implementation (SDPA, and attention within each
sequence of a packed batch). The processor returns ``mm_token_type_ids``, without which
Qwen2.5-VL silently falls back to 1-D
positions instead of mRoPE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from . import attention
from .image_processor import image_processor_class

MODEL_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2(.5)-VL processor without the video part (no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def image_processor_for(
    pixels: int | None = None, path: str | Path | None = None, kind: str = "native"
) -> Qwen2VLImageProcessorPil:
    """From a checkpoint dir, or fixed to ``pixels`` (min = max: images keep their size); ``kind``: native | hf."""
    cls = image_processor_class(kind)
    if path is not None:
        return cls.from_pretrained(str(path))
    return cls(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2)


def model_class(path: str | Path):
    """The transformers class of the checkpoint at ``path``; clear errors if it is not a supported one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path {str(path)!r}: no config.json there (need a local Hugging Face checkpoint dir)")
    config = AutoConfig.from_pretrained(path)
    cls = MODEL_CLASSES.get(config.model_type)
    if cls is None:
        raise ValueError(f"model.path {str(path)!r}: model_type {config.model_type!r} unsupported; use one of {list(MODEL_CLASSES)}")
    return cls


def load_processor(path: str | Path, image_processor: str = "native") -> ImageOnlyProcessor:
    """The image-only processor (tokenizer, chat template, image processor) saved at ``path``."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImageOnlyProcessor(image_processor_for(path=path, kind=image_processor), tokenizer,
                              chat_template=tokenizer.chat_template)  # fmt: skip


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """The model of a local checkpoint directory, its weights read in ``dtype`` straight onto
    ``device`` (tensor by tensor on CUDA: no full host copy first), with ``models.attention``'s
    implementation; clear errors if it is not a supported checkpoint."""
    cls = model_class(path)
    placement = {"device_map": {"": torch.device(device)}} if torch.device(device).type != "cpu" else {}
    return cls.from_pretrained(Path(path), dtype=dtype, attn_implementation=attention.NAME, **placement)


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    image_processor: str = "native"):  # fmt: skip
    """``(model, processor)`` of a local checkpoint directory (``load_model``, ``load_processor``);
    ``image_processor``: native (``csrc/``, HF's when not built) | hf."""
    return load_model(path, dtype=dtype, device=device), load_processor(path, image_processor)
