"""HF <-> Megatron weight conversion (pure tensor maps, no process group).

HF -> (tp, pp) shards -> HF is bit-exact for tp, pp in {1, 2}, untied and tied; both HF
naming sets and both Megatron norm naming sets are accepted; the vocabulary is padded with
zero rows; a checkpoint read lazily gives the same shards, and every tensor converts back on
its own; a split that does not fit is refused naming the key.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine_testing.megatron import tiny_vl_model
from visurf_engine.learners.megatron.convert import Layout, hf_to_megatron, megatron_to_hf
from visurf_engine.models.weights import CheckpointTensors


def _shards(hf, lay):
    return [[hf_to_megatron(hf, lay, r, p) for r in range(lay.tp)] for p in range(lay.pp)]


def _back(shards, lay):
    out = {}
    for p in range(lay.pp):
        part = megatron_to_hf(shards[p], lay, p)
        assert not set(part) & set(out), "two stages export the same tensor"
        out |= part
        assert all(lay.owner_stage(k) == p for k in part)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    return tiny_vl_model(tied=request.param)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact(model, tp, pp):
    hf = model.state_dict()
    lay = Layout.from_hf_config(model.config, tp, pp)
    back = _back(_shards(hf, lay), lay)
    assert set(back) == set(hf)
    for k, v in hf.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_shard_shapes_and_vocab_padding(model):
    lay = Layout.from_hf_config(model.config, 2, 2)
    assert lay.vocab == 301 and lay.padded_vocab == 302
    s0, s1 = hf_to_megatron(model.state_dict(), lay, 1, 0), hf_to_megatron(model.state_dict(), lay, 1, 1)
    emb = s0["language_model.embedding.word_embeddings.weight"]
    assert emb.shape == (151, 64) and torch.equal(emb[-1], torch.zeros(64))  # row 301 is padding
    assert "language_model.decoder.layers.1.self_attention.linear_qkv.weight" in s0
    assert "language_model.decoder.layers.2.self_attention.linear_qkv.weight" not in s0
    # per rank: 1 of 2 KV groups = (2 query heads + k + v) x head dim 16
    assert s1["language_model.decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 64)
    assert s1["language_model.decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 32)
    assert s1["language_model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (96, 64)  # gate and up halves
    assert s1["language_model.output_layer.weight"].shape == (151, 64)  # tied: the last stage's copy
    assert not any(k.startswith("visual.") for k in s1) and any(k.startswith("visual.") for k in s0)


def test_qkv_groups_and_fc1_halves_land_on_their_rank(model):
    """Rank r's fused QKV rows are [q heads of group r; k_r; v_r], its fc1 rows [gate_r; up_r]."""
    hf, lay = model.state_dict(), Layout.from_hf_config(model.config, 2, 1)
    p = "model.language_model.layers.3."
    s = hf_to_megatron(hf, lay, 1, 0)
    qkv = s["language_model.decoder.layers.3.self_attention.linear_qkv.bias"]
    d = lay.head_dim
    q, k, v = hf[p + "self_attn.q_proj.bias"], hf[p + "self_attn.k_proj.bias"], hf[p + "self_attn.v_proj.bias"]
    assert torch.equal(qkv, torch.cat([q[2 * d : 4 * d], k[d:], v[d:]]))
    fc1 = s["language_model.decoder.layers.3.mlp.linear_fc1.weight"]
    gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[48:], up[48:]]))


def test_on_disk_hf_names_give_the_same_shards(model):
    hf = model.state_dict()
    disk = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in hf.items()
    }
    assert "model.layers.0.self_attn.q_proj.weight" in disk and "visual.merger.mlp.0.weight" in disk
    lay = Layout.from_hf_config(model.config, 2, 2)
    for p in range(2):
        for r in range(2):
            a, b = hf_to_megatron(hf, lay, r, p), hf_to_megatron(disk, lay, r, p)
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_read_lazily_from_a_checkpoint_directory_are_the_same(model, tmp_path):
    """``CheckpointTensors`` (what ``MegatronLearner.load`` cuts its shard from) reads the saved
    (bf16) checkpoint by name, in the dtype asked for; each tensor's megatron slices convert
    back alone (``megatron_to_hf`` of any subset, as ``export_weights`` converts them)."""
    saved = copy.deepcopy(model).to(torch.bfloat16)
    saved.save_pretrained(tmp_path)
    lazy, lay = CheckpointTensors(tmp_path, torch.float32), Layout.from_hf_config(model.config, 2, 2)
    assert "model.layers.0.self_attn.q_proj.weight" in lazy and lazy["model.embed_tokens.weight"].dtype == torch.float32
    hf = {k: v.float() for k, v in saved.state_dict().items()}
    for p in range(2):
        shards = [hf_to_megatron(lazy, lay, r, p) for r in range(2)]
        for r in range(2):
            ref = hf_to_megatron(hf, lay, r, p)
            assert set(shards[r]) == set(ref) and all(torch.equal(shards[r][k], ref[k]) for k in ref)
        whole = megatron_to_hf(shards, lay, p)
        one_by_one = {}
        for name in shards[0]:
            one_by_one |= megatron_to_hf([{name: s[name]} for s in shards], lay, p)
        assert set(one_by_one) == set(whole) and all(torch.equal(one_by_one[k], whole[k]) for k in whole)


def test_te_spec_norm_names_and_bare_gpt_prefix_are_accepted(model):
    hf, lay = model.state_dict(), Layout.from_hf_config(model.config, 2, 1)
    te = [
        {
            k.removeprefix("language_model.")
            .replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
            .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): v
            for k, v in hf_to_megatron(hf, lay, r, 0).items()
        }
        | {"decoder.layers.0.self_attention.core_attention._extra_state": None}
        for r in range(2)
    ]
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te[0]
    back = megatron_to_hf(te, lay, 0)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_splits_that_do_not_fit_name_the_key(model):
    with pytest.raises(ValueError, match="parallel.tp=4 must divide num_key_value_heads=2"):
        Layout.from_hf_config(model.config, 4, 1)
    with pytest.raises(ValueError, match="parallel.pp=3 must divide num_hidden_layers=4"):
        Layout.from_hf_config(model.config, 1, 3)
