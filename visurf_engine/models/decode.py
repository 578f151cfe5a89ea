"""Decoding a Qwen2(.5)-VL policy in a loop of its own, over a preallocated KV cache.

``decode(model, ...)`` does what transformers' ``generate`` does for sampling and greedy decoding
(the same prefill, each decoder layer's arithmetic on its own weights, the same logits
processing, a draw from the same categorical distribution), without its per-token machinery
(input preparation, cache objects growing by concatenation, mask rebuilding, logits-processor
and stopping-criteria objects): on a small model on CPU that machinery, not arithmetic, is most
of a decode step.

1. **Prefill**: the model's own forward on the left-padded *distinct* prompts (vision tower
   included) with transformers' ``DynamicCache``, at the mRoPE positions of ``get_rope_index``; the
   keys and values are copied into a ``StaticKV`` of ``static_cache_length`` positions (256-token
   buckets), each prompt's rows repeated for its samples (``rows``): G samples of a prompt share
   one prefill, where ``generate`` runs the prompt and its image G times.
2. **Decode**: per new token, the language model's embedding, then each decoder layer's own
   weights in its own arithmetic (pre-norm attention and SiLU-gated MLP with residuals,
   ``_layer_step``) called as functions rather than as modules: on a small model on CPU a module
   call costs more than the arithmetic under it (the step's operator calls fell from 390 to 238
   on the tiny model, a rollout's time from ~0.19-0.21 to ~0.18 s on one thread). The key and value
   are written in place into ``StaticKV`` and attention runs over its filled prefix with an
   additive mask of the non-padding positions. A generated token's position is the prompt's
   last mRoPE position + 1 + its index on all three axes, as the trainer's packed forward places
   it; the cos/sin of every step come from the model's own rotary embedding in one call before
   the loop, and ``rotate_half`` is a matmul by a signed permutation.
3. **Next token**: the vision placeholder tokens are suppressed (-inf), logits divided by the
   temperature, top-p applied (``top_p < 1``), then a draw by inverse CDF (``searchsorted`` of a
   uniform in the cumulative probabilities: the categorical distribution exactly, ten times
   cheaper than ``multinomial`` on CPU) or ``argmax`` (greedy); a finished sequence (``eos``) is
   padded. The log-prob of each sampled token under that processed distribution is returned with it
   (the rollout/trainer mismatch's ``rollout_logp``).

``tests/test_decode.py`` checks it against ``generate``: the same greedy tokens, and sampled
tokens' log-probs equal to the trainer's fused pass within 1e-4.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from transformers import DynamicCache


STATIC_CACHE_BUCKET = 256  # tokens: static KV caches are sized in multiples of this (bounded recompiles)


def static_cache_length(tokens: int, previous: int = 0) -> int:
    """The static KV cache length for ``tokens`` (prompt width + generation budget): rounded up to a
    multiple of ``STATIC_CACHE_BUCKET`` and never below ``previous``, so a compiled decode step,
    specialised on the cache length, recompiles only when a longer bucket is first needed."""
    return max(previous, -(-tokens // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET)


class StaticKV:
    """Per layer, keys and values ``[B, H_kv, L, D]`` of one decode; ``length`` positions are filled."""

    def __init__(self, prefill: DynamicCache, capacity: int, rows: torch.Tensor):
        """The prefill's keys and values of rows ``rows`` (a prompt's, repeated for each of its samples)."""
        self.keys, self.values = [], []
        for layer in prefill.layers:
            k, v = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            shape = (*k.shape[:2], capacity, k.shape[-1])
            self.keys.append(torch.empty(shape, dtype=k.dtype, device=k.device))
            self.values.append(torch.empty(shape, dtype=v.dtype, device=v.device))
            self.keys[-1][:, :, : k.shape[2]] = k
            self.values[-1][:, :, : v.shape[2]] = v
        self.length = prefill.layers[0].keys.shape[2]


def _cache_keyword(layer) -> str:
    """The decoder layer's cache argument (transformers renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


def _next_token(logits, suppressed, temperature: float, top_p: float, do_sample: bool):
    """``(token[B], its log-prob under the processed distribution [B])`` from ``logits[B, V]`` (float32)."""
    scores = logits.float()
    scores[:, suppressed] = float("-inf")
    if do_sample:
        scores = scores / temperature
        if top_p < 1.0:
            order = scores.argsort(dim=-1)
            cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - top_p
            drop[:, -1] = False
            scores = scores.scatter(1, order, scores.gather(1, order).masked_fill(drop, float("-inf")))
    logp = scores.log_softmax(dim=-1)
    if do_sample:
        cumulative = logp.exp().cumsum(dim=-1)
        u = (1 - torch.rand(len(scores), 1, device=scores.device)) * cumulative[:, -1:]  # in (0, total]: no p = 0 token
        token = torch.searchsorted(cumulative, u).clamp(max=scores.shape[1] - 1).squeeze(1)
    else:
        token = scores.argmax(dim=-1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    rows: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    suppressed: Sequence[int],
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens[B, T], logprobs[B, T])`` of up to ``max_new_tokens`` new tokens after the left-padded
    distinct prompts ``input_ids[U, P]`` (one image each), row b continuing prompt ``rows[b]``
    (module docstring); finished rows are padded with ``pad_id``."""
    inner, lm = model.model, model.model.language_model
    batch, width = len(rows), input_ids.shape[1]
    positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                                        attention_mask=attention_mask)  # fmt: skip
    prefill = DynamicCache()
    out = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=True,
                **{_cache_keyword(lm.layers[0]): prefill})  # fmt: skip
    cache = StaticKV(prefill, static_cache_length(width + max_new_tokens), rows)
    next_position = positions.amax(dim=(0, 2))[rows] + 1  # [B]: the prompt's last mRoPE position + 1
    suppressed = torch.tensor(list(suppressed), device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    hidden = out.last_hidden_state[rows, -1]  # [B, hidden]: the prefill's last position (normed)
    steps = torch.arange(max_new_tokens, device=input_ids.device)
    pos = (next_position[:, None] + steps).expand(3, batch, max_new_tokens)  # every new token's mRoPE position
    cos, sin = lm.rotary_emb(hidden[:, None], pos)  # [B, T, D] each, the model's own rotary embedding
    half = cos.shape[-1] // 2
    swap = torch.zeros(2 * half, 2 * half, dtype=cos.dtype, device=cos.device)  # x @ swap = rotate_half(x)
    swap[half:, :half] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    swap[:half, half:] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    bias = torch.full((batch, cache.keys[0].shape[2]), float("-inf"), dtype=hidden.dtype, device=hidden.device)
    bias[:, :width].masked_fill_(attention_mask.bool()[rows], 0.0)  # [B, L]: the additive mask of the filled positions
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        token, logp = _next_token(model.lm_head(hidden), suppressed, temperature, top_p, do_sample)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(logp), logp))
        finished |= token == eos_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        n = cache.length
        bias[:, n] = 0.0
        rotary = (cos[:, step, None], sin[:, step, None], swap)  # [B, 1, D], [B, 1, D], [D, D]
        hidden = lm.embed_tokens(token)
        for i, layer in enumerate(lm.layers):
            hidden = _layer_step(layer, hidden, rotary, cache.keys[i], cache.values[i], n, bias[:, None, None, : n + 1])
        cache.length = n + 1
        hidden = lm.norm(hidden)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def _rms_norm(norm, x):
    """The model's RMSNorm ``w * (x / sqrt(mean(x^2) + eps))``, computed in float32 as it computes it."""
    return norm.weight * torch.nn.functional.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype)


def _layer_step(layer, x, rotary, keys, values, n: int, mask):
    """One decoder layer for one new token per row: ``x [B, hidden]`` -> ``[B, hidden]``, its key and
    value written at position ``n`` of ``keys`` / ``values [B, H_kv, L, D]``. The layer's own weights
    and the arithmetic of its modules (pre-norm attention and SiLU-gated MLP, residuals), called as
    functions: a decode step is a few hundred operator calls, and a module call costs more than the
    arithmetic here. Rotary: ``x cos + rotate_half(x) sin`` for ``x = [q; k]`` at once, with
    ``rotate_half(x) = x @ S`` (``rotary = (cos, sin, S)``; S a signed permutation, exact in any
    dtype), in the precision the model's own rotary runs in."""
    attn, mlp, linear = layer.self_attn, layer.mlp, torch.nn.functional.linear
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    h = _rms_norm(layer.input_layernorm, x)
    q = linear(h, attn.q_proj.weight, attn.q_proj.bias).view(-1, heads, dim)
    k = linear(h, attn.k_proj.weight, attn.k_proj.bias).view(-1, kv_heads, dim)
    cos, sin, swap = rotary
    qk = torch.cat((q, k), 1)  # [B, H + H_kv, D]
    qk = qk * cos + (qk @ swap) * sin
    keys[:, :, n] = qk[:, heads:]
    values[:, :, n] = linear(h, attn.v_proj.weight, attn.v_proj.bias).view(-1, kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        qk[:, :heads, None], keys[:, :, : n + 1], values[:, :, : n + 1], attn_mask=mask, scale=attn.scaling,
        enable_gqa=True)  # fmt: skip
    x = x + linear(out.view(len(x), heads * dim), attn.o_proj.weight, attn.o_proj.bias)
    h = _rms_norm(layer.post_attention_layernorm, x)
    return x + linear(mlp.act_fn(linear(h, mlp.gate_proj.weight)) * linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
