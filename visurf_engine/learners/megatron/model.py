"""The Qwen2-VL / Qwen2.5-VL policy on megatron-core: one pipeline stage of it per rank.

``QwenVLMegatron`` = the transformers vision tower (stage 0 only, replicated over tensor
ranks) + a megatron-core ``GPTModel`` built from the local layer spec:
``ColumnParallelLinear`` QKV (GQA, with bias) and SwiGLU ``fc1``, ``RowParallelLinear``
projections, RMSNorm, ``VocabParallelEmbedding``, multimodal RoPE with the checkpoint's
``mrope_section``.

Forward of one micro-batch, ``input_ids[B, S]``, mRoPE ``position_ids[3, B, S]`` (from the HF
model's ``get_rope_index``), causal ``attention_mask[1, 1, S, S]`` (bool, True = masked):

- stage 0: ``e = embedding(input_ids)`` ``[S, B, H]``; the vision tower's merged patch
  embeddings replace the rows of the image-pad tokens, in ``[B, S]`` row-major order (as
  in transformers' ``masked_scatter``); the decoder layers of the stage run on ``e``;
- later stages: the layers run on the activation received from the previous stage
  (``set_input_tensor``, called by the pipeline schedule);
- last stage: the final RMSNorm, then ``copy_to_tensor_model_parallel_region`` (identity
  forward, all-reduce of the gradient over the TP group): the result ``h[S, B, H]`` is what
  the vocab-parallel fused loss multiplies with this rank's LM-head shard
  (``head_shard``), so no logits, local or gathered, are formed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from .convert import Layout


def _rope(text_config) -> dict:
    """``rope_theta`` and ``mrope_section`` (transformers 5: ``rope_parameters``; 4.x: ``rope_scaling``)."""
    rope = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    return rope


def transformer_config(hf_config, layout: Layout, dtype: torch.dtype) -> TransformerConfig:
    """megatron-core settings equal to the HF text model (dropout 0, unfused torch ops).

    ``calculate_per_token_loss`` makes the schedules and DDP leave the loss unscaled (the
    engine's loss weights already normalise over the global batch, so gradients are SUMs);
    ``variable_seq_lengths`` lets micro-batches differ in length under PP (megatron asks for
    the ``alltoall`` MoE dispatcher with it, even for a dense model). On CPU:
    ``use_cpu_initialization`` and unbatched-sync p2p (see ``parallel.megatron_cpu``).
    """
    t = hf_config.text_config
    if t.hidden_act != "silu":
        raise ValueError(f"model.backend=megatron: hidden_act {t.hidden_act!r} unsupported (SwiGLU/silu only)")
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden,
        ffn_hidden_size=t.intermediate_size,
        num_attention_heads=layout.heads,
        num_query_groups=layout.kv_heads,
        kv_channels=layout.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(_rope(t)["mrope_section"]),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not cuda,
        batch_p2p_sync=cuda,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        calculate_per_token_loss=True,
    )


class HiddenStateGPT(GPTModel):
    """``GPTModel`` whose last stage returns the final-norm hidden states, entering the
    tensor-parallel region, instead of logits (the loss takes the head weight itself).
    ``_postprocess`` is the hook ``GPTModel.forward`` calls after the decoder (megatron-core
    0.16.1, pinned); verl's fused-kernel forward replaces the same step."""

    def _postprocess(self, hidden_states, **kwargs):
        if not self.post_process:
            return hidden_states
        return tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states)


class QwenVLMegatron(MegatronModule):
    """One pipeline stage of the policy (see the module docstring for the forward)."""

    def __init__(self, hf_config, layout: Layout, config: TransformerConfig, visual: torch.nn.Module | None):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.layout = layout
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.share_embeddings_and_output_weights = layout.tied
        self.image_token_id = hf_config.image_token_id
        self.visual = visual if self.pre_process else None
        self.language_model = HiddenStateGPT(
            config,
            get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=layout.padded_vocab,
            max_sequence_length=hf_config.text_config.max_position_embeddings,
            pre_process=self.pre_process,
            post_process=self.post_process,
            share_embeddings_and_output_weights=layout.tied,
            position_embedding_type="mrope",
            rotary_base=_rope(hf_config.text_config)["rope_theta"],
            scatter_embedding_sequence_parallel=False,
        )

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def head_shard(self) -> tuple[torch.Tensor, int]:
        """``(W[V_r, H], vocab_start)``: this rank's LM-head rows without vocabulary padding."""
        gpt = self.language_model
        weight = gpt.shared_embedding_or_output_weight() if self.layout.tied else gpt.output_layer.weight
        start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
        return weight[: max(0, min(weight.shape[0], self.layout.vocab - start))], start

    def forward(self, input_ids, position_ids, attention_mask, pixel_values=None, image_grid_thw=None, image_of_seq=None):
        """``[S, B, H]``: the next stage's input, or (last stage) the final hidden states. The
        vision tower runs once per image; row b takes the embeddings of image ``image_of_seq[b]``."""
        decoder_input = None
        if self.pre_process:
            emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
            if pixel_values is not None:
                image = self.visual(pixel_values.to(emb.dtype), grid_thw=image_grid_thw).pooler_output
                per_image = torch.split(image, (image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist())
                image = torch.cat([per_image[i] for i in image_of_seq.tolist()])
                slots = (input_ids == self.image_token_id).unsqueeze(-1)  # [B, S, 1]
                emb = emb.transpose(0, 1).masked_scatter(slots, image.to(emb.dtype)).transpose(0, 1).contiguous()
            decoder_input = emb
        return self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=attention_mask, decoder_input=decoder_input
        )
