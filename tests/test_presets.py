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
