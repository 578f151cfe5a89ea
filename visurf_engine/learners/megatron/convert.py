"""HF <-> Megatron weight conversion for the Qwen2-VL / Qwen2.5-VL policy (pure tensor maps).

``hf_to_megatron`` cuts a full HF state dict (read by name: a lazy checkpoint reader works)
into the shard held by pipeline stage ``p`` and tensor rank ``r``; ``megatron_to_hf`` rebuilds
the HF tensors of one stage's Megatron tensors (all of them, or any subset) from their ``tp``
shards. Both directions copy values only (cat / chunk / view), so a round
trip is bit-exact. Names of the Megatron side are those of ``model.QwenVLMegatron``
(``language_model.*`` = the megatron-core ``GPTModel`` with the local layer spec,
``visual.*`` = the transformers vision tower, on stage 0 only).

HF names: both the on-disk set (``model.layers.N.*``, ``model.embed_tokens``,
``model.norm``, ``lm_head``, ``visual.*``) and the in-memory transformers-5 set
(``model.language_model.*``, ``model.visual.*``) are accepted; the output uses the
in-memory set (what ``Qwen2_5_VLForConditionalGeneration.state_dict()`` holds).
Megatron names: the local-spec norms (``input_layernorm``, ``pre_mlp_layernorm``) and the
Transformer-Engine-spec ones (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``) are accepted, with or without the ``language_model.``
prefix; the output uses the local spec.

Maps, with ``ng`` KV groups, ``hpg = heads / ng`` query heads per group, head dim ``d``,
hidden ``H`` and rank ``r`` of ``tp``:

- QKV: ``fused = cat([q.view(ng, hpg d, H), k.view(ng, d, H), v.view(ng, d, H)], 1)``
  (per group: its query heads, then its key, then its value), ``[ng (hpg + 2) d, H]``;
  column parallel, so rank ``r`` holds groups ``r ng / tp .. (r + 1) ng / tp``. Biases alike.
- ``linear_fc1`` (SwiGLU): rank ``r`` holds ``cat([gate.chunk(tp)[r], up.chunk(tp)[r]])``.
- Column parallel (dim 0): QKV, fc1, embedding, output layer. Row parallel (dim 1):
  ``linear_proj`` (o_proj), ``linear_fc2`` (down_proj). Norms and vision: replicated.
- Vocabulary: the ``V`` rows are padded with zero rows to ``V_pad = tp ceil(V / tp)`` (a
  vocab-parallel layer needs equal shards) and the padding is dropped on export. The loss
  never sees the pad rows (``model.head_shard`` slices them off), so padding changes
  nothing numerically.
- Pipeline: stage ``p`` holds layers ``p L / pp .. (p + 1) L / pp`` (local index ``j`` is
  global ``p L / pp + j``); the embedding and vision tower live on stage 0, the final
  norm and output layer on the last stage. Tied embeddings: one stage (``pp = 1``) has no
  ``output_layer``; with ``pp > 1`` the last stage holds a copy of the embedding, and
  export takes ``lm_head`` from stage 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

LM = "model.language_model."
HF_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.(.+)")
MG_LAYER = re.compile(r"language_model\.decoder\.layers\.(\d+)\.(.+)")
_HF_ALIASES = (  # on-disk prefix -> in-memory prefix
    ("model.layers.", LM + "layers."),
    ("model.embed_tokens.", LM + "embed_tokens."),
    ("model.norm.", LM + "norm."),
    ("visual.", "model.visual."),
)
_TE_NORMS = {  # Transformer-Engine spec -> local spec
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# Per-layer tensors that map one to one: HF suffix -> (Megatron suffix, sharded dim or None).
_PLAIN = {
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", 1),
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight", 1),
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", None),
}


@dataclass(frozen=True)
class Layout:
    """Shapes of the language model and its ``(tp, pp)`` split."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_hf_config(cls, config, tp: int = 1, pp: int = 1) -> "Layout":
        """From a Qwen2(.5)-VL config; raises ``ValueError`` naming ``parallel.tp/pp`` if it cannot split."""
        t = config.text_config
        layout = cls(
            num_layers=t.num_hidden_layers,
            hidden=t.hidden_size,
            heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads,
            head_dim=t.hidden_size // t.num_attention_heads,
            vocab=t.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False)),
            tp=tp,
            pp=pp,
        )
        if layout.kv_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide num_key_value_heads={layout.kv_heads}")
        if layout.num_layers % pp:
            raise ValueError(f"parallel.pp={pp} must divide num_hidden_layers={layout.num_layers}")
        return layout

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab // self.tp) * self.tp

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    def owner_stage(self, hf_name: str) -> int:
        """The pipeline stage that holds (and exports) HF tensor ``hf_name``."""
        name = canonical_hf_name(hf_name)
        layer = HF_LAYER.fullmatch(name)
        if layer:
            return int(layer.group(1)) // self.layers_per_stage
        if name == LM + "norm.weight" or name == "lm_head.weight" and not self.tied:
            return self.pp - 1
        return 0


def canonical_hf_name(name: str) -> str:
    for old, new in _HF_ALIASES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def canonical_megatron_name(name: str) -> str:
    if name.startswith(("decoder.", "embedding.", "output_layer.")):
        name = "language_model." + name
    for te, local in _TE_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout) -> torch.Tensor:
    tail = q.shape[1:]  # (H,) for weights, () for biases
    ng, d = lay.kv_heads, lay.head_dim
    return torch.cat([q.reshape(ng, -1, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], 1).reshape(-1, *tail)


def _split_qkv(fused: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tail = fused.shape[1:]
    ng, d, hpg = lay.kv_heads, lay.head_dim, lay.heads // lay.kv_heads
    q, k, v = fused.reshape(ng, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], lay: Layout, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
    """The Megatron state dict of rank ``tp_rank`` on stage ``pp_rank`` (contiguous copies).

    ``hf`` is read by name, only the tensors of the stage: each slice is copied as it is cut, so
    through a lazy mapping (``models.weights.CheckpointTensors``) no more than the few whole
    tensors of one layer are held at a time."""
    names = {canonical_hf_name(k): k for k in hf}
    r, tp = tp_rank, lay.tp
    out = {}

    def get(name):
        return hf[names[name]]

    def put(name, w):
        out[name] = w.contiguous().clone()

    def col(w):
        return w.chunk(tp, dim=0)[r]

    first = lay.layers_per_stage * pp_rank
    for j in range(lay.layers_per_stage):
        src, dst = f"{LM}layers.{first + j}.", f"language_model.decoder.layers.{j}."
        for kind in ("weight", "bias"):
            q, k, v = (get(f"{src}self_attn.{x}_proj.{kind}") for x in "qkv")
            put(f"{dst}self_attention.linear_qkv.{kind}", col(_fuse_qkv(q, k, v, lay)))
        gate, up = get(f"{src}mlp.gate_proj.weight"), get(f"{src}mlp.up_proj.weight")
        put(f"{dst}mlp.linear_fc1.weight", torch.cat([col(gate), col(up)]))
        for hf_suffix, (mg_suffix, dim) in _PLAIN.items():
            w = get(src + hf_suffix)
            put(dst + mg_suffix, w if dim is None else w.chunk(tp, dim=dim)[r])
    if pp_rank == 0:
        embed = _pad_rows(get(LM + "embed_tokens.weight"), lay.padded_vocab)
        put("language_model.embedding.word_embeddings.weight", col(embed))
        for name in names:
            if name.startswith("model.visual."):
                put("visual." + name[len("model.visual.") :], get(name))
    if pp_rank == lay.pp - 1:
        put("language_model.decoder.final_layernorm.weight", get(LM + "norm.weight"))
        if not lay.tied or lay.pp > 1:  # tied with pp > 1: the last stage's copy of the embedding
            head = get(LM + "embed_tokens.weight" if lay.tied else "lm_head.weight")
            put("language_model.output_layer.weight", col(_pad_rows(head, lay.padded_vocab)))
    return out


def megatron_to_hf(shards: Sequence[Mapping[str, torch.Tensor]], lay: Layout, pp_rank: int) -> dict[str, torch.Tensor]:
    """The HF tensors of stage ``pp_rank``'s Megatron tensors, from its ``tp`` shards (index =
    tensor rank). The shards may hold any subset of the stage's names (every tensor maps on its
    own: ``MegatronLearner.export_weights`` converts one at a time); the last stage's copy of a
    tied embedding gives nothing (stage 0 exports ``lm_head``)."""
    if len(shards) != lay.tp:
        raise ValueError(f"expected {lay.tp} tensor-parallel shards, got {len(shards)}")
    shards = [
        {canonical_megatron_name(k): v for k, v in s.items() if not k.endswith("_extra_state")} for s in shards
    ]
    rank0 = shards[0]

    def cat(name, dim=0):
        return torch.cat([s[name] for s in shards], dim=dim)

    out = {}
    for name in rank0:
        layer = MG_LAYER.fullmatch(name)
        if not layer:
            continue
        dst, suffix = f"{LM}layers.{lay.layers_per_stage * pp_rank + int(layer.group(1))}.", layer.group(2)
        if suffix.startswith("self_attention.linear_qkv."):
            kind = suffix.rsplit(".", 1)[1]
            for x, t in zip("qkv", _split_qkv(cat(name), lay)):
                out[f"{dst}self_attn.{x}_proj.{kind}"] = t
        elif suffix == "mlp.linear_fc1.weight":
            halves = [s[name].chunk(2) for s in shards]
            out[dst + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
            out[dst + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
        else:
            hf_suffix, dim = next((h, d) for h, (m, d) in _PLAIN.items() if m == suffix)
            out[dst + hf_suffix] = rank0[name] if dim is None else cat(name, dim)
    if "language_model.embedding.word_embeddings.weight" in rank0:  # stage 0
        embed = cat("language_model.embedding.word_embeddings.weight")[: lay.vocab]
        out[LM + "embed_tokens.weight"] = embed
        if lay.tied:
            out["lm_head.weight"] = embed
    out |= {"model.visual." + k[len("visual.") :]: v for k, v in rank0.items() if k.startswith("visual.")}
    if "language_model.decoder.final_layernorm.weight" in rank0:  # the last stage
        out[LM + "norm.weight"] = rank0["language_model.decoder.final_layernorm.weight"]
    if "language_model.output_layer.weight" in rank0 and not lay.tied:
        out["lm_head.weight"] = cat("language_model.output_layer.weight")[: lay.vocab]
    return {k: v.contiguous().clone() for k, v in out.items()}
