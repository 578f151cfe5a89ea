"""Packed attention through a varlen kernel (``models.attention``): the dispatch that runs on CUDA
(flash-attn's ``flash_attn_varlen_func``, or torch's ``varlen_attn`` under both of its
signatures) exercised on CPU through stand-ins with the real functions' signatures, which check
what they are given (int32 ``cu_seqlens``, an int longest length, ``[T, H, D]`` inputs, causal)
and compute it with per-sequence SDPA. A packed forward through each must give the padded
forward's loss, log-probs and gradients (float32: the tolerances of ``test_packing``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from engine_testing.megatron import SPEC, random_micro_batches, tiny_vl_model
from visurf_engine.models import attention
from visurf_engine.models.collate import Batching
from visurf_engine.models.policy import completion_hidden
from visurf_kernels import fused_policy_loss

PACKED = Batching(pack=True, vision_once=True)
PADDED = Batching(pack=False, vision_once=True)
CALLS: list[dict] = []


def _attend(q, k, v, cu, scale):
    """Causal attention within each sequence of ``[T, H, D]`` rows (the stand-ins' arithmetic)."""
    b = cu.tolist()
    out = [F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale,
                                          enable_gqa=True).transpose(0, 1) for s, e in zip(b[:-1], b[1:])]  # fmt: skip
    return torch.cat(out)


def _check(q, k, v, cu_q, cu_k, max_q, max_k):
    assert q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0] == int(cu_q[-1]) and q.shape[1] % k.shape[1] == 0
    assert cu_q.dtype == torch.int32 and cu_q is cu_k or torch.equal(cu_q, cu_k)
    assert type(max_q) is int and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    """flash-attn 2's signature."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    assert causal and dropout_p == 0.0
    CALLS.append({"kernel": "flash_attn"})
    return _attend(q, k, v, cu_seqlens_q, softmax_scale)


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    """torch 2.13's ``varlen_attn``: causal as ``window_size=(-1, 0)``, GQA as ``enable_gqa``."""
    _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    assert tuple(window_size) == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
    CALLS.append({"kernel": "varlen_attn"})
    return _attend(query, key, value, cu_seq_q, scale)


def varlen_attn_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None,
                          scale=None):  # fmt: skip
    """An older ``varlen_attn``: ``is_causal``, no GQA (K/V must carry every query head)."""
    _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    assert is_causal and query.shape[1] == key.shape[1]
    CALLS.append({"kernel": "varlen_attn_is_causal"})
    return _attend(query, key, value, cu_seq_q, scale)


def _loss_and_grads(model, batching):
    model.zero_grad(set_to_none=True)
    (x,) = random_micro_batches(model, seed=3, micro=1, rows=5, batching=batching)
    hidden = completion_hidden(model, x.batch)
    loss, stats = fused_policy_loss(hidden, model.lm_head.weight, x.batch.targets, x.old_logp, x.adv, x.w, SPEC,
                                    x.objective)  # fmt: skip
    loss.backward()
    return loss.detach(), stats["logp"], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def stand_in(monkeypatch, request):
    """Installs the stand-in of ``request.param`` as the CPU's varlen kernel, through the engine's own wrapper."""
    CALLS.clear()
    if request.param == "flash_attn":
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
        kernel = attention.flash_attn_kernel()
    else:
        import torch.nn.attention.varlen as tv

        monkeypatch.setattr(tv, "varlen_attn", varlen_attn if request.param == "varlen_attn" else varlen_attn_is_causal)
        kernel = attention.torch_varlen_kernel()
    monkeypatch.setitem(attention._KERNELS, "cpu", (kernel, frozenset({torch.float32})))
    return request.param


@pytest.mark.parametrize("stand_in", ["flash_attn", "varlen_attn", "varlen_attn_is_causal"], indirect=True)
def test_packed_forward_through_a_varlen_kernel_equals_padded(stand_in):
    model = tiny_vl_model()
    loss, logp, grads = _loss_and_grads(model, PACKED)
    layers = model.config.text_config.num_hidden_layers
    assert [c["kernel"] for c in CALLS] == [stand_in] * layers  # one call per layer for the whole packed row
    ref_loss, ref_logp, ref_grads = _loss_and_grads(model, PADDED)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7, name


def test_cuda_resolves_flash_attn_first_then_torch_varlen_and_fp32_takes_neither(monkeypatch):
    """The CUDA dispatch: flash-attn when installed, else torch's varlen; 16-bit inputs only
    (fp32 falls back to per-sequence SDPA); CPU: none."""
    import importlib.machinery
    import torch.nn.attention.varlen as tv

    cuda, q = torch.device("cuda"), torch.randn(6, 4, 8, dtype=torch.bfloat16)
    kv, cu = torch.randn(6, 2, 8, dtype=torch.bfloat16), torch.tensor([0, 2, 6], dtype=torch.int32)
    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setattr(tv, "varlen_attn", varlen_attn)
    for installed, expected in ((True, "flash_attn"), (False, "varlen_attn")):
        CALLS.clear()
        monkeypatch.delitem(attention._KERNELS, "cuda", raising=False)
        if installed:
            monkeypatch.setitem(sys.modules, "flash_attn", fake)
        else:
            monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        assert attention.varlen_kernel(cuda, torch.float32) is None
        attention.varlen_kernel(cuda, torch.bfloat16)(q, kv, kv, cu, 4, 0.35, 0.0)
        assert [c["kernel"] for c in CALLS] == [expected]
    assert attention.varlen_kernel(torch.device("cpu"), torch.bfloat16) is None


@pytest.mark.cuda
def test_the_cuda_varlen_kernel_matches_per_sequence_sdpa():
    """On a GPU: the kernel the dispatch picks (flash-attn or torch's varlen) on bf16 packed rows
    against the per-sequence SDPA loop; bf16 tolerance (2e-2 relative to the output's scale)."""
    torch.manual_seed(0)
    lens = [37, 5, 120, 64, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, sum(lens), 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    module = types.SimpleNamespace(training=False, num_key_value_groups=4, is_causal=True)
    assert attention.varlen_kernel(q.device, q.dtype) is not None
    out, _ = attention.packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, scaling=0.125)
    attention._KERNELS["cuda"], kept = None, attention._KERNELS["cuda"]
    try:
        ref, _ = attention.packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, scaling=0.125)
    finally:
        attention._KERNELS["cuda"] = kept
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
