"""The memory plan (``visurf_engine.plan``): exact parameter counts, the components' arithmetic on
hand-computed cases (hf, fsdp, megatron), and a refusal that names the fix. How close it comes to measured peaks is
``bench/memory.py``'s job (results in ``bench/results/memory-*.json``)."""

from __future__ import annotations

import pytest
import torch

from engine_testing.megatron import tiny_vl_config, tiny_vl_model
from visurf_engine.config import load_config
from visurf_engine.models.presets import real_shape_config
from visurf_engine.models.tiny import train_tokenizer
from visurf_engine.plan import GIB, DoesNotFit, Shape, Workload, activation_bytes, check, loss_bytes, main, megatron_params, plan

TOKENIZER = train_tokenizer(["plan the memory"])


def test_shape_counts_the_parameters_exactly():
    for tied in (False, True):
        model, shape = tiny_vl_model(tied=tied), Shape.of(tiny_vl_config(tied=tied))
        assert shape.params == sum(p.numel() for p in model.parameters()) and shape.tied == tied
        layers, blocks = model.model.language_model.layers, model.model.visual.blocks
        assert shape.layer_params == sum(p.numel() for p in layers[0].parameters())
        assert shape.root_params + shape.layers * shape.layer_params + shape.vis_depth * shape.block_params == shape.params
    seven = Shape.of(real_shape_config("qwen2.5-vl-7b", TOKENIZER))
    assert seven.params == 8_292_166_656 and not seven.tied and seven.layers == 28  # Qwen2.5-VL-7B: 8.29 B


def test_components_on_a_hand_computed_case():
    shape = Shape.of(tiny_vl_config())
    work = Workload(tokens=1000, patches=64, completion_tokens=300, sequences=10)
    hf = plan(load_config(None, ["algo.kl_coef=0"]), shape, gpus=4, device="cpu", work=work)
    n = shape.params
    assert (hf.components["weights"], hf.components["gradients"], hf.components["optimizer"]) == (4 * n, 4 * n, 8 * n)
    fsdp = plan(load_config(None, ["model.backend=fsdp", "algo.kl_coef=0.1"]), shape, gpus=4, device="cpu", work=work)
    assert fsdp.components["optimizer"] == 8 * n // 4 and fsdp.components["reference"] == 4 * n // 4
    text = 4 * (9 * 64 + 4 * 96 + 3 * 2 * 16)  # fp32: every saved tensor 4 bytes (hidden 64, MLP 96, 2 KV heads of 16)
    vision = 4 * (13.125 * 32 + 4 * 48)
    outside = 4 * 2 * 64 * 1000 + 4 * (3 * 2 * 14 * 14 + 5 * 32) * 64
    assert activation_bytes(shape, work, 4, False) == int(4 * text * 1000 + 2 * vision * 64 + outside)
    assert activation_bytes(shape, work, 4, True) < activation_bytes(shape, work, 4, False)
    kv_cache = 2 * 4 * (2 * 16) * 64 * 256 * 4  # 2 (K, V) x 4 layers x 2 KV heads of 16 x 64 sequences x 256 tokens x fp32
    assert hf.components["rollout cache"] == kv_cache and hf.components["rollout engine"] == 0  # the shared module
    update = hf.components["loss"] + hf.components["activations"]
    assert "optimizer step" not in hf.components  # fused AdamW: no temporaries
    assert hf.peak == 16 * n + max(update, kv_cache)
    # a step of one micro-batch: the gradients appear in the backward, after the loss's working set
    one = plan(load_config(None, ["algo.kl_coef=0"]), shape, gpus=1, device="cpu", work=work, accumulating=False)
    act, loss = one.components["activations"], one.components["loss"]
    assert one.learner_peak == 12 * n + act + max(loss, 4 * n)
    assert one.peak == 12 * n + max(act + max(loss, 4 * n), kv_cache)
    ddp = plan(load_config(None, ["algo.kl_coef=0"]), shape, gpus=2, device="cpu", work=work, accumulating=False)
    assert ddp.learner_peak == 16 * n + act + loss  # DDP's buckets hold the gradients throughout


def test_megatron_components_on_a_hand_computed_case():
    """The tiny shapes (hidden 64, MLP 96, 4 layers of 30 976 parameters with two 64-wide norms,
    2 KV heads of 16, vocabulary 301 untied, a vision tower of 80 480) on tp 2 x pp 2 x dp 2."""
    shape = Shape.of(tiny_vl_config())
    assert (shape.params, shape.layer_params) == (242_976, 30_976)
    layer = (30_976 - 2 * 64) // 2 + 2 * 64  # 15 552: the norms whole on each tensor rank
    rows = 151 * 64  # half the vocabulary padded to 302
    first = 2 * layer + 80_480 + rows  # stage 0: its 2 layers, the vision tower, its embedding rows
    assert megatron_params(shape, 2, 2) == first == 121_248  # > the last stage: 2 layers, the norm, the head rows
    assert megatron_params(Shape.of(tiny_vl_config(tied=True)), 2, 1) == 4 * layer + 80_480 + rows + 64  # no head
    work = Workload(tokens=1000, patches=64, completion_tokens=300, sequences=10)
    cfg = load_config(None, ["model.backend=megatron", "parallel.tp=2", "parallel.pp=2", "algo.kl_coef=0"])
    cpu = plan(cfg, shape, gpus=8, device="cpu", work=work)  # fp32: the parameters are the master weights
    c = cpu.components
    assert (c["weights"], c["gradients"], c["optimizer"], c["hf replica"], c["reference"]) == \
        (4 * first, 4 * first, 8 * first // 2, 4 * 242_976, 0)  # fmt: skip
    cuda = plan(cfg, shape, gpus=8, device="cuda", work=work).components  # bf16 parameters, fp32 main parameters
    assert (cuda["weights"], cuda["gradients"], cuda["optimizer"], cuda["hf replica"]) == \
        (2 * first, 4 * first, 12 * first // 2, 2 * 242_976)  # fmt: skip
    text = 4 * (9 * 64 + (4 * 96 + 3 * 32) / 2)  # the MLP and KV terms split over tp
    vision = 4 * (13.125 * 32 + 4 * 48)
    outside = 4 * 2 * 64 * 1000 + 4 * (3 * 2 * 14 * 14 + 5 * 32) * 64
    assert c["activations"] == int(2 * (2 * text * 1000 + 2 * vision * 64 + outside))  # 1F1B: 2 micro-batches in flight
    assert c["loss"] == loss_bytes(shape, work, 4, "cpu", 2) == 256 * 151 * 4 + 4 * 151 * 64 + 300 * 64 * 4 * 2
    assert c["weight export"] == 3 * 302 * 64 * 4 and c["rollout engine"] == 0  # the hf engine generates with the replica
    persistent = sum(c[k] for k in ("weights", "gradients", "optimizer", "hf replica"))
    working = (c["loss"] + c["activations"], c["optimizer step"], c["rollout cache"], c["weight export"])
    assert cpu.peak == persistent + max(working)
    with pytest.raises(ValueError, match=r"parallel.tp \* parallel.pp = 4 must divide the 6 GPUs"):
        plan(cfg, shape, gpus=6, device="cpu", work=work)


def test_the_7b_megatron_recipe_fits_8_x_80_gb_and_the_refusals_name_the_fix():
    shape = Shape.of(real_shape_config("qwen2.5-vl-7b", TOKENIZER))
    recipe = "configs/qwen2_5_vl_7b_grounding_megatron.yaml"
    assert plan(load_config(recipe), shape, gpus=8, gpu_gib=80, patches_per_image=1536).headroom > 0
    with pytest.raises(DoesNotFit, match=r"it fits with: parallel\.tp=4 "):
        check(load_config(recipe, ["parallel.tp=2"]), shape, gpus=8, gpu_gib=80)
    with pytest.raises(DoesNotFit, match=r"it fits with: train\.micro_batch_size=8 "):
        check(load_config(recipe, ["train.micro_batch_size=16"]), shape, gpus=8, gpu_gib=80)


def test_the_7b_recipe_does_not_fit_8_x_80_gb_on_hf_and_the_refusal_names_the_fix():
    shape = Shape.of(real_shape_config("qwen2.5-vl-7b", TOKENIZER))
    cfg = load_config("configs/qwen2_5_vl_7b_grounding.yaml", ["model.backend=hf", "train.activation_checkpointing=false"])
    with pytest.raises(DoesNotFit, match=r"(?s)needs \d+\.\d GiB per GPU, the GPU has 80\.0 GiB.*it fits with: model\.backend=fsdp \(train"):
        check(cfg, shape, gpus=8, gpu_gib=80)
    assert plan(load_config("configs/qwen2_5_vl_7b_grounding.yaml"), shape, gpus=8, gpu_gib=80).headroom > 0


def test_cli_prints_the_table(capsys):
    assert main(["model.preset=qwen2.5-vl-3b", "model.backend=fsdp", "--gpus", "8", "--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "fsdp on 8 x 80 GiB, 3.75 B parameters" in out and "headroom" in out and "activations" in out
