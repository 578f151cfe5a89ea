"""Qwen2.5-VL architectures of real sizes, for profiling without a download (random init).

The values are those of the published Qwen2.5-VL-3B-Instruct and -7B-Instruct
``config.json`` files (text: hidden size, layers, heads, KV heads, MLP width, vocabulary,
RoPE; vision: 32 blocks of width 1280, window attention with four full-attention blocks,
2x2 merge to the text width). ``real_shape_config(name, tokenizer)`` builds one with the
special-token ids of ``tokenizer`` (the tiny preset's offline tokenizer has the Qwen special
tokens, at low ids inside the real vocabulary), so the engine's code path is the real one
and only the weights are random. ``save_random_checkpoint`` writes such a model (or the tiny
preset) as a local checkpoint directory, which the trainer loads through ``model.path`` like
any real one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig

from . import attention
from .hf import ImageOnlyProcessor, image_processor_for
from .tiny import SPECIAL_TOKENS, tiny_config

_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")  # fmt: skip
_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}

SHAPES = {
    "qwen2.5-vl-3b": dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000),
        tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000),
        tie_word_embeddings=False,
    ),
}  # fmt: skip


def real_shape_config(name: str, tokenizer: PreTrainedTokenizerFast, *, layers: int | None = None,
                      blocks: int | None = None) -> Qwen2_5_VLConfig:  # fmt: skip
    """The ``name`` architecture (``SHAPES``) with ``tokenizer``'s special-token ids; ``layers`` /
    ``blocks``: that many decoder layers / vision blocks instead (the widths stay; the last
    block keeps full attention)."""
    if name not in SHAPES:
        raise ValueError(f"unknown real-shape preset {name!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[name]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = _VISION if blocks is None else _VISION | dict(depth=blocks, fullatt_block_indexes=[blocks - 1])
    text = shape["text"] | ({} if layers is None else {"num_hidden_layers": layers}) | dict(rope_parameters=_ROPE, rms_norm_eps=1e-6, tie_word_embeddings=shape["tie_word_embeddings"],
                                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                pad_token_id=ids["<|endoftext|>"])  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision | {"out_hidden_size": shape["text"]["hidden_size"]},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape["tie_word_embeddings"],
    )


def save_random_checkpoint(name: str, path: str | Path, tokenizer: PreTrainedTokenizerFast, *, pixels: int,
                           dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                           seed: int = 0, layers: int | None = None, blocks: int | None = None) -> Path:  # fmt: skip
    """Write a random-init Qwen2.5-VL of architecture ``name`` (``tiny`` or a key of ``SHAPES``)
    to ``path``: weights in ``dtype`` (``save_pretrained``), ``tokenizer`` and an image
    processor that takes every image to ``pixels`` pixels (min = max). The weights are
    initialised on ``device`` (a GPU makes a 3B model in seconds) with ``seed``. ``layers`` /
    ``blocks``: that many decoder layers / vision blocks (the real widths, fewer of them; the
    last block keeps full attention)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_config(tokenizer) if name == "tiny" else real_shape_config(name, tokenizer, layers=layers, blocks=blocks)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attention.NAME, dtype=dtype)
    path = Path(path)
    model.save_pretrained(path)
    ImageOnlyProcessor(image_processor_for(pixels), tokenizer, chat_template=tokenizer.chat_template).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
