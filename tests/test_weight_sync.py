"""The weight-sync plan against a real ``save_pretrained`` checkpoint of the tiny Qwen2.5-VL (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from visurf_engine.models.tiny import tiny_config, train_tokenizer
from visurf_engine.models.weights import TensorSpec, checkpoint_name, checkpoint_specs, module_specs
from visurf_engine.rollout.weight_sync import SyncPlan


def tiny_model(tie: bool) -> Qwen2_5_VLForConditionalGeneration:
    cfg = tiny_config(train_tokenizer(["Find the red circle. <answer>[]</answer>"] * 4))
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = tie
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    model = tiny_model(request.param)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, max_shard_size="200KB")  # several shards: the index is read
    return model, path


def test_every_trainer_parameter_maps_exactly_once(saved):
    model, path = saved
    assert (path / "model.safetensors.index.json").is_file()
    specs, aliases = module_specs(model)
    engine = checkpoint_specs(path)
    plan = SyncPlan.build(specs, engine, dtype=torch.bfloat16, aliases=aliases)
    pairs = plan.pairs
    trainer_names = [t for t, _ in pairs]
    engine_names = [e for _, e in pairs]
    assert sorted(trainer_names) == sorted(name for name, _ in model.named_parameters())  # no missing, no extra
    assert len(set(trainer_names)) == len(trainer_names) and len(set(engine_names)) == len(engine_names)
    assert set(engine_names) == set(engine)
    tied = model.config.tie_word_embeddings
    assert aliases == ({"lm_head.weight": "model.language_model.embed_tokens.weight"} if tied else {})
    assert ("lm_head.weight" in engine) is not tied
    assert all(engine[e].shape == specs[t].shape for t, e in pairs)


def test_batches_cast_skip_aliases_and_keep_layers_whole(saved):
    model, path = saved
    specs, aliases = module_specs(model)
    plan = SyncPlan.build(specs, checkpoint_specs(path), dtype=torch.bfloat16, aliases=aliases, bucket_bytes=64 << 10)
    assert len(plan.buckets) > 3
    params = dict(model.named_parameters())
    sent = []
    for batch in plan.batches(model.named_parameters(remove_duplicate=False)):  # aliases included: skipped
        size = sum(t.numel() * t.element_size() for _, t in batch)
        groups = {name.rsplit(".", 2)[0] for name, _ in batch}
        assert size <= plan.bucket_bytes or len(groups) == 1
        assert all(t.dtype == torch.bfloat16 for _, t in batch)
        sent += [name for name, _ in batch]
    assert len(sent) == len(set(sent)) == len(params)
    bucket_of = {e: k for k, bucket in enumerate(plan.buckets) for _, e in bucket}
    for layer in range(model.config.text_config.num_hidden_layers):
        attn = {bucket_of[f"model.layers.{layer}.self_attn.{p}_proj.{w}"] for p in "qkv" for w in ("weight", "bias")}
        mlp = {bucket_of[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up")}
        assert len(attn) == 1 and len(mlp) == 1  # vLLM's fused qkv_proj / gate_up_proj load in one call
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    cast = dict(b for batch in plan.batches(model.named_parameters()) for b in batch)[checkpoint_name(name)]
    assert torch.equal(cast, params[name].detach().to(torch.bfloat16))


def test_checkpoint_names():
    assert checkpoint_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert checkpoint_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert checkpoint_name("lm_head.weight") == "lm_head.weight"


def test_mismatches_are_named():
    up, head = TensorSpec((4, 2), torch.float32), TensorSpec((8, 2), torch.float32)
    engine = {"model.layers.0.mlp.up_proj.weight": up, "lm_head.weight": head}
    ok = {"model.language_model.layers.0.mlp.up_proj.weight": up, "lm_head.weight": head}
    SyncPlan.build(ok, engine, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"engine tensors no trainer tensor feeds: \['lm_head.weight'\]"):
        SyncPlan.build({k: v for k, v in ok.items() if k != "lm_head.weight"}, engine, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"trainer tensors the engine lacks: \['model.visual.merger.ln_q.weight'\]"):
        SyncPlan.build(ok | {"model.visual.merger.ln_q.weight": TensorSpec((2,), torch.float32)}, engine, dtype=torch.float32)
    with pytest.raises(ValueError, match="shape mismatches: .*lm_head.weight"):
        SyncPlan.build(ok | {"lm_head.weight": TensorSpec((9, 2), torch.float32)}, engine, dtype=torch.float32)
    with pytest.raises(ValueError, match="both map to 'model.layers.0.mlp.up_proj.weight'"):
        SyncPlan.build(ok | {"model.layers.0.mlp.up_proj.weight": up}, engine, dtype=torch.float32)
    plan = SyncPlan.build(ok, engine, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        next(plan.batches([("model.language_model.layers.0.mlp.up_proj.weight", torch.zeros(4, 2))]))
