"""The profiling presets: real Qwen2.5-VL architectures with random init, and the random-init
checkpoint the trainer loads through ``model.path``."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from visurf_engine.models.hf import load_pretrained
from visurf_engine.models.presets import real_shape_config, save_random_checkpoint
from visurf_engine.models.tiny import train_tokenizer

TOKENIZER = train_tokenizer(["Find the red circle. <think></think><answer>[]</answer>"] * 4)


@pytest.mark.parametrize("name, billions", [("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29)])
def test_real_shapes_have_the_published_sizes(name, billions):
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(real_shape_config(name, TOKENIZER))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_random_checkpoint_loads_like_a_real_one(tmp_path):
    path = save_random_checkpoint("tiny", tmp_path, TOKENIZER, pixels=56 * 56, dtype=torch.float32)
    model, processor = load_pretrained(path)
    assert processor.tokenizer.get_vocab() == TOKENIZER.get_vocab()
    image = torch.zeros(3, 112, 112, dtype=torch.uint8)
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # 112x112 taken to 56x56: 4x4 patches of 14
    assert not any(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n.endswith("proj.weight"))


def test_atomic_tags_are_whole_tokens_that_decode():
    """``warmstart.atomic_tags``: each tag is one token wherever it appears, no merge spans it, and
    decoding (special tokens skipped) gives the text back; without it BPE merges across the tags."""
    from visurf_engine.tasks.shapes.base_model import TAGS

    corpus = ['<think>the red square</think><answer>[{"bbox_2d": [10, 2, 33, 4]}]</answer>',
              "<think></think><answer>[]</answer>", "<answer>red</answer>"] * 20  # fmt: skip
    text = "<think>a red</think><answer>[]</answer><answer>3</answer>"
    atomic, merged = train_tokenizer(corpus, atomic=TAGS), train_tokenizer(corpus)
    pieces = atomic.convert_ids_to_tokens(atomic(text, add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if "<" in p or ">" in p] == ["<think>", "</think>", "<answer>", "</answer>", "<answer>", "</answer>"]
    assert atomic.decode(atomic(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == text
    assert all(len(atomic(t, add_special_tokens=False)["input_ids"]) == 1 for t in TAGS)
    assert any(len(merged(t, add_special_tokens=False)["input_ids"]) > 1 for t in TAGS)
    spanning = merged.convert_ids_to_tokens(merged(text, add_special_tokens=False)["input_ids"])
    assert any(p.startswith(">") and len(p) > 1 for p in spanning)  # e.g. '>[]</': a merge across a tag's edge
