"""Attention for packed sequences: ``attn_implementation="visurf_packed"``.

A packed batch is one row holding S sequences back to back, with boundaries
``cu_seqlens = [0, L_1, L_1 + L_2, ..., T]`` passed to the model as the flash-attention
keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``max_length_q`` / ``max_length_k``);
transformers forwards them from the model call to every attention call. Each query then
attends only to keys of its own sequence, causally:

    out[t] = softmax(q_t K_s^T / sqrt(d) + causal) V_s     for t in sequence s

- on CUDA with flash-attn installed: transformers' flash-attention (varlen) forward, which
  reads the boundaries directly (cost sum_s L_s^2);
- elsewhere: the exact equivalent, SDPA run on each sequence's slice (also sum_s L_s^2; a
  block-diagonal mask over the whole row would cost T^2);
- without boundaries (padded batches, generation, the vision tower): plain SDPA, unchanged.

The mask interface of the same name is SDPA's, so padded batches get the masks they always
had. Registered on import of ``models.hf``, which loads every policy with this implementation.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_flash_attn_2_available

NAME = "visurf_packed"


def packed_attention_forward(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """``(out[B, T, H, D], None)`` for ``query[B, Hq, T, D]``, ``key``/``value[B, Hkv, T, D]`` (see module docstring)."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.is_cuda and is_flash_attn_2_available():
        from transformers.integrations.flash_attention import flash_attention_forward

        return flash_attention_forward(module, query, key, value, None, cu_seq_lens_q=cu_seq_lens_q, **kwargs)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    bounds = cu_seq_lens_q.tolist()
    outs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1), None


AttentionInterface.register(NAME, packed_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
