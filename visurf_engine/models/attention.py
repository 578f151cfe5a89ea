"""Attention for packed sequences: ``attn_implementation="visurf_packed"``.

A packed batch is one row holding S sequences back to back, with boundaries
``cu_seqlens = [0, L_1, L_1 + L_2, ..., T]`` (int32) passed to the model as the flash-attention
keyword arguments ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``max_length_q`` / ``max_length_k``);
transformers forwards them from the model call to every attention call. Each query then
attends only to keys of its own sequence, causally:

    out[t] = softmax(q_t K_s^T * scale + causal) V_s     for t in sequence s

- with a *varlen kernel* for the device (``varlen_kernel``): one call over the whole row, cost
  ``sum_s L_s^2``. On CUDA: flash-attn's ``flash_attn_varlen_func`` when installed, else torch's
  ``torch.nn.attention.varlen.varlen_attn`` (flash-attention inside torch), called directly with
  the int32 ``cu_seqlens`` and the longest length (transformers resolves its own flash path from
  ``config._attn_implementation`` and refuses this implementation's name, so it is not used);
- elsewhere: the exact equivalent, SDPA run on each sequence's slice (also ``sum_s L_s^2``; a
  block-diagonal mask over the whole row would cost ``T^2``). On CPU this loop is as fast as
  the single-call alternatives measured (``docs/performance.md``: the same sequences padded
  into one SDPA call; FlexAttention with a document mask, which in torch 2.13 has no CPU
  backward and ran its forward 2.4x slower);
- with shared prompts (``segment_prefix``, ``group_masks``: ``models.collate``'s packed, shared
  prompts): a prompt segment attends causally to itself, a completion segment to its prompt
  segment and causally to itself: one SDPA call per group with the group's mask where collate
  made one (short groups), else one per segment (the prompt's keys and values in front of the
  completion's); the varlen kernels take no prefix, so this path runs on every device;
- without boundaries (padded batches, generation, the vision tower): plain SDPA, unchanged.

The mask interface of the same name is SDPA's, so padded batches get the masks they always
had. Registered on import of ``models.hf``, which loads every policy with this implementation.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "visurf_packed"

# (q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D], cu_seqlens int32 [S + 1], max_seqlen, scale, dropout) -> out[T, Hq, D]
Varlen = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float, float], torch.Tensor]


def flash_attn_kernel() -> Varlen:
    """flash-attn's causal varlen attention (GQA native)."""
    from flash_attn import flash_attn_varlen_func

    def run(q, k, v, cu_seqlens, max_seqlen, scale, dropout):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout,
                                      softmax_scale=scale, causal=True)  # fmt: skip

    return run


def torch_varlen_kernel() -> Varlen:
    """torch's ``varlen_attn``, causal, over the keyword arguments the installed torch has
    (``window_size=(-1, 0)`` or ``is_causal``; ``enable_gqa`` or K/V heads repeated)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def run(q, k, v, cu_seqlens, max_seqlen, scale, dropout):
        if dropout:
            raise ValueError("torch's varlen_attn has no dropout: install flash-attn, or set the attention dropout to 0")
        kw = dict(causal, scale=scale)
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)

    return run


HALF = frozenset({torch.float16, torch.bfloat16})  # what the flash kernels take
_KERNELS: dict[str, tuple[Varlen, frozenset] | None] = {}  # device type -> (kernel, its dtypes); None: per-sequence SDPA


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> Varlen | None:
    """The varlen kernel of packed batches on ``device`` in ``dtype`` (module docstring), resolved
    once per device type; None where there is none (CPU, fp32 inputs)."""
    if device.type not in _KERNELS:
        kernel = None
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            kernel = (flash_attn_kernel(), HALF)
        elif device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            kernel = (torch_varlen_kernel(), HALF)
        _KERNELS[device.type] = kernel
    found = _KERNELS[device.type]
    return found[0] if found is not None and dtype in found[1] else None


def packed_attention_forward(module, query, key, value, attention_mask, cu_seq_lens_q=None, segment_prefix=None,
                             group_masks=None, **kwargs):  # fmt: skip
    """``(out[B, T, H, D], None)`` for ``query[B, Hq, T, D]``, ``key``/``value[B, Hkv, T, D]`` (see module docstring)."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if segment_prefix is not None:
        return _shared_prompt_attention(module, query, key, value, cu_seq_lens_q, segment_prefix, group_masks, **kwargs)
    kernel = varlen_kernel(query.device, query.dtype)
    if kernel is not None:
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, H, D]
        longest = kwargs.get("max_length_q") or int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        return kernel(q, k, v, cu_seq_lens_q.to(torch.int32), int(longest), scale, dropout)[None], None
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    bounds = cu_seq_lens_q.tolist()
    outs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1), None


def _shared_prompt_attention(module, query, key, value, cu_seq_lens_q, segment_prefix, group_masks, **kwargs):
    """Each group's attention: one call under its mask ``group_masks[g]``, or, where that is None,
    each segment's: a prompt's causally on itself, a completion's on its prompt and causally on
    itself (``[C, P + C]`` mask: prompt columns all, own columns up to the diagonal)."""
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
        kwargs.pop(k, None)
    bounds, prefix = cu_seq_lens_q.tolist(), segment_prefix.tolist()
    firsts = [j for j, p in enumerate(prefix) if p == j] + [len(prefix)]  # each group's prompt segment, then the end

    def span(a: int, b: int, mask):  # columns a:b attending to themselves under ``mask``
        return sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask, **kwargs)[0]

    outs = []
    for g, mask in enumerate(group_masks):
        first, end = firsts[g], firsts[g + 1]
        if mask is not None:
            outs.append(span(bounds[first], bounds[end], mask[None, None]))
            continue
        pa, pb = bounds[first], bounds[first + 1]
        outs.append(span(pa, pb, None))
        for a, b in zip(bounds[first + 1 : end], bounds[first + 2 : end + 1]):
            keys, values = (torch.cat([x[:, :, pa:pb], x[:, :, a:b]], dim=2) for x in (key, value))
            mask = torch.ones(b - a, pb - pa + b - a, dtype=torch.bool, device=query.device).tril(diagonal=pb - pa)
            outs.append(sdpa_attention_forward(module, query[:, :, a:b], keys, values, mask[None, None], **kwargs)[0])
    return torch.cat(outs, dim=1), None


AttentionInterface.register(NAME, packed_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
