"""Fixtures of the TRL / verl integration tests: the optional stacks, and tiny models with data.

``require(module)`` skips a test when the stack is not installed, unless
``VISURF_REQUIRE_INTEGRATIONS=1`` (CI sets it), where a missing stack fails the test instead.
Models are built from config (nothing is downloaded): the embedded ``tiny`` Qwen2.5-VL with
the shapes task's images, and a tiny ``Qwen2ForCausalLM`` on the same tokenizer.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
from visurf_engine.models.tiny import CHAT_TEMPLATE, tiny_config, train_tokenizer
from visurf_engine.rewards import get_reward
from visurf_engine.tasks.shapes.generator import SIZE, make_split

REQUIRED = os.environ.get("VISURF_REQUIRE_INTEGRATIONS") == "1"


def require(module: str):
    """``module`` imported, or the test skipped (failed under ``VISURF_REQUIRE_INTEGRATIONS=1``)."""
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def shapes_rows(n: int = 4, seed: int = 0):
    return make_split(n, seed=seed, absent_ratio=0.25)


def tokenizer_for(rows):
    """The tiny BPE tokenizer over the rows' prompts and gold renderings; pads on the left, as TRL's
    prompt ids are padded."""
    spec = get_reward("grounding")
    corpus = [r.problem for r in rows] + [spec.render(r.solution, s) for r in rows for s in spec.styles]
    tok = train_tokenizer(corpus)
    tok.padding_side = "left"
    return tok


def tiny_vlm(rows, seed: int = 0):
    """``(model, processor)``: the tiny Qwen2.5-VL (random init) and its image-only processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = tokenizer_for(rows)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(tok), attn_implementation="sdpa")
    return model, ImageOnlyProcessor(image_processor_for(SIZE * SIZE), tok, chat_template=CHAT_TEMPLATE)


def tiny_text_lm(rows, seed: int = 0):
    """``(model, tokenizer)``: a tiny ``Qwen2ForCausalLM`` (random init) on the same tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer_for(rows)
    text = tiny_config(tok).text_config
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa"), tok


def vlm_dataset(rows):
    """TRL's VLM layout: a conversational ``prompt``, an ``image`` column, the gold ``solution``."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r.problem}], "image": r.image,
                               "solution": r.solution} for r in rows])  # fmt: skip


def text_dataset(rows):
    """Plain-text prompts (no chat template) with the gold ``solution`` as a JSON string."""
    import json

    from datasets import Dataset

    return Dataset.from_list([{"prompt": r.problem, "solution": json.dumps(r.solution)} for r in rows])
