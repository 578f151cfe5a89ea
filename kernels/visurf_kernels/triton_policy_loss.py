"""Triton tile engine (the ``triton`` backend): three GEMM kernels, no ``[N, V]`` tensor.

The driver (``function.py``) walks the tokens in chunks of ``n`` rows (``n`` ~ N/16, at
least ``min_chunk_tokens``) and, per chunk, calls ``stats`` then ``grads``:

1. ``_stats_kernel`` -- GEMM 1, ``z = x W^T / T`` ``[n, V_local]`` in tiles of
   ``BLOCK_N x STAT_BLOCK`` (fp32 accumulation, K loop over H). The epilogue reduces the
   tile in registers to the softmax partials of ``vocab_parallel.TileStats`` (tile max
   ``m``, ``s = sum exp(z - m)``, entropy partial ``u``, the target logit) and, when a
   gradient pass follows, stores ``e = exp(z - m_tile)`` in a ``[n, V_local]`` buffer
   (bf16 for 16-bit inputs: ``e`` lies in [0, 1], bf16 keeps its range and it is rounded
   to the GEMM operand precision anyway; fp32 for fp32 inputs). Grid: row blocks x vocab
   tiles, row blocks fastest, so the programs that share a ``W`` tile run together and
   ``W`` streams from HBM once per chunk while ``x`` (n x H) sits in L2.
2. The driver reduces the partials over tiles and TP ranks (tiny ``[n, n_tiles]`` torch
   ops), gets ``logp``, and the per-token ``g = d loss / d logp`` from
   ``reference.policy_loss_from_logp`` (autograd on an ``[n]`` vector: the PPO-clip math
   lives once). With ``a = g / T`` the logit gradient is
   ``dY[r, v] = a_r (onehot - p_rv) = scale[r, tile(v)] * e[r, v]`` off the target, with
   ``scale = -a exp(m_tile - lse)``, and ``tgt_grad = -a expm1(logp)`` = ``a (1 - p_target)``
   on the target column (exact, not ``1 - p`` from a rounded ``p``).
3. ``_dhidden_kernel`` -- GEMM 2, ``dh = dY W`` ``[n, H]``: the A operand is built in the
   prologue from the buffer (``e * scale``, target column replaced), K loop over the local
   vocab. A row's dh is complete within the chunk, so it is written once in hidden's
   dtype. If ``row blocks x H blocks`` would under-fill the GPU, the vocab is split
   (``SPLIT`` programs per output tile, each a contiguous range of stat tiles) into an
   fp32 workspace ``[SPLIT, n, H]`` summed afterwards: deterministic, no atomics.
4. ``_dweight_kernel`` -- GEMM 3, ``dW = dY^T x`` ``[V_local, H]``: the same ``dY`` tiles
   (built from the row-major buffer) enter transposed as the A operand; K loop over the
   chunk's rows.
   Each program owns one ``BLOCK_V x BLOCK_H`` tile of dW; chunks run one after another,
   so accumulation over chunks is a plain load-add-store of that tile: no atomics,
   deterministic. dW accumulates over chunks in an fp32 ``[V_local, H]`` buffer (a
   single chunk writes the weight's dtype directly). Grid: H blocks fastest, so the
   programs that share a buffer column block run together.

Cost model (7B: H 3584, V 152064, N 16384, n 1024, bf16): three GEMM-sized passes, each
operand streamed once per chunk; extra HBM traffic per chunk is the buffer (write once,
read twice: 3 n V x 2 B) and the fp32 dW read-modify-write (V H x 8 B), which the chunk's
GEMM 3 (2 n V H flops) hides for n >~ 1000 on H100. Peak extra memory: the buffer
(n V x 2 B = N/16 of the [N, V] bf16 logits, 6 %), the partials, and the fp32 dW
accumulator (V H x 4 B; the issue asks for fp32 accumulation, count it with the grads).

Hopper specifics: every tile moves through TMA tensor descriptors (host-built
``TensorDescriptor``; out-of-bounds reads are zero, out-of-bounds writes dropped, so odd
N / V need no masks and no pointer tensors -- pointer-tensor loads of the same kernels
spilled registers). TMA needs 16-byte aligned rows: ``H * itemsize % 16 == 0`` (true of
every real model; ``auto`` falls back to ``torch`` otherwise) and the buffer's rows are
padded to 16 elements. 16-bit inputs run wgmma with fp32 accumulation; fp32 inputs use
3xTF32 (``tf32x3``, fp32-grade accuracy) and smaller blocks (``TritonTiles.for_dtype``).
Block sizes are fixed defaults (128x256x64 tiles, 8 warps, 3 stages for 16-bit), checked
to compile for sm_90 without spills; tune them with visurf-engine's ``bench/kernels.py`` on the GPU.

Under ``TRITON_INTERPRET=1`` (read when this module is imported, and at launch) the
kernels run on CPU tensors; the interpreter multiplies bf16 bit patterns as integers in
``tl.dot``, so ``_mma`` upcasts the operands there (and only there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .vocab_parallel import TileStats

INTERPRET = bool(triton.knobs.runtime.interpret)
_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    if _INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _stats_kernel(
    x_desc, w_desc, tgt_ptr, buf_desc, m_ptr, s_ptr, u_ptr, tz_ptr,
    n_rows, n_vocab, n_hidden, n_tiles, inv_temp,
    BLOCK_N: tl.constexpr, STAT_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, STORE_BUF: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    r0 = tl.program_id(0) * BLOCK_N
    v0 = tl.program_id(1) * STAT_BLOCK
    acc = tl.zeros((BLOCK_N, STAT_BLOCK), dtype=tl.float32)
    for k0 in range(0, n_hidden, BLOCK_H):
        x = x_desc.load([r0, k0])  # out-of-bounds rows / columns read as 0
        w = w_desc.load([v0, k0])
        acc = _mma(x, w.T, acc, PRECISION)

    # Epilogue, written to keep one [BLOCK_N, STAT_BLOCK] tensor live besides acc. Padding
    # columns get a huge finite logit: exp() gives 0 and e * (z - m) gives 0, not NaN.
    rows = r0 + tl.arange(0, BLOCK_N)
    cols = v0 + tl.arange(0, STAT_BLOCK)
    row_ok = rows < n_rows
    z = tl.where((cols < n_vocab)[None, :], acc * inv_temp, -3.0e38)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    in_tile = (tgt >= v0) & (tgt < v0 + STAT_BLOCK)
    tl.store(tz_ptr + rows, tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1), mask=row_ok & in_tile)
    m = tl.max(z, axis=1)
    z = z - m[:, None]
    e = tl.exp(z)
    part = rows * n_tiles + tl.program_id(1)
    tl.store(m_ptr + part, m, mask=row_ok)
    tl.store(s_ptr + part, tl.sum(e, axis=1), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(u_ptr + part, tl.sum(e * z, axis=1), mask=row_ok)
    if STORE_BUF:
        buf_desc.store([r0, v0], e.to(buf_desc.dtype))  # out-of-bounds part dropped


@triton.jit
def _dy_tile(buf_desc, r0, v0, tgt_ptr, scale_ptr, tgt_grad_ptr, n_rows, n_vocab, n_tiles,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, STAT_BLOCK: tl.constexpr):  # fmt: skip
    """``dY[r0:r0+BLOCK_N, v0:v0+BLOCK_V]`` in fp32: ``e * scale`` with the target column
    replaced by ``tgt_grad``; 0 outside the chunk / vocab. ``BLOCK_V`` divides ``STAT_BLOCK``."""
    rows = r0 + tl.arange(0, BLOCK_N)
    cols = v0 + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    e = buf_desc.load([r0, v0]).to(tl.float32)
    scale = tl.load(scale_ptr + rows * n_tiles + v0 // STAT_BLOCK, mask=row_ok & (v0 < n_vocab), other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    tgt_grad = tl.load(tgt_grad_ptr + rows, mask=row_ok, other=0.0)
    return tl.where(cols[None, :] == tgt[:, None], tgt_grad[:, None], e * scale[:, None])


@triton.jit
def _dhidden_kernel(
    buf_desc, w_desc, tgt_ptr, scale_ptr, tgt_grad_ptr, out_desc,
    n_rows, n_vocab, n_tiles, split_len,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, STAT_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    r0 = tl.program_id(0) * BLOCK_N
    h0 = tl.program_id(1) * BLOCK_H
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for off in range(0, split_len, BLOCK_V):
        v0 = split * split_len + off
        dy = _dy_tile(buf_desc, r0, v0, tgt_ptr, scale_ptr, tgt_grad_ptr, n_rows, n_vocab, n_tiles,
                      BLOCK_N, BLOCK_V, STAT_BLOCK)  # fmt: skip
        w = w_desc.load([v0, h0])
        acc = _mma(dy.to(w.dtype), w, acc, PRECISION)
    out_desc.store([split, r0, h0], acc.to(out_desc.dtype).reshape(1, BLOCK_N, BLOCK_H))


@triton.jit
def _dweight_kernel(
    buf_desc, x_desc, tgt_ptr, scale_ptr, tgt_grad_ptr, dw_desc,
    n_rows, n_vocab, n_tiles,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, STAT_BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    h0 = tl.program_id(0) * BLOCK_H
    v0 = tl.program_id(1) * BLOCK_V
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_N):
        dy = _dy_tile(buf_desc, r0, v0, tgt_ptr, scale_ptr, tgt_grad_ptr, n_rows, n_vocab, n_tiles,
                      BLOCK_N, BLOCK_V, STAT_BLOCK)  # fmt: skip
        x = x_desc.load([r0, h0])
        acc = _mma(dy.to(x.dtype).T, x, acc, PRECISION)
    if ACCUMULATE:
        acc += dw_desc.load([v0, h0]).to(tl.float32)
    dw_desc.store([v0, h0], acc.to(dw_desc.dtype))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: 3xTF32 tensor-core dots (fp32-grade accuracy); 16-bit: plain tensor cores."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _desc(t: torch.Tensor, block: list[int], shape: list[int] | None = None) -> TensorDescriptor:
    """TMA descriptor of ``t`` (last dim contiguous), optionally of a leading ``shape`` of it."""
    return TensorDescriptor(t, list(shape or t.shape), list(t.stride()), block)


def tma_compatible(t: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base and row stride: ``H * itemsize % 16 == 0`` for ``[., H]``."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


@dataclass(frozen=True)
class TritonTiles:
    """Block sizes of the three kernels (Hopper defaults) and the chunking of rows.

    ``stat_block`` is the vocab tile of the softmax partials; the dh kernel's ``dh_block[2]``
    (its K step) and the dw kernel's ``dw_block[0]`` (its vocab block) must divide it.
    ``dh_split=None`` picks the vocab split of the dh kernel from the SM count. The defaults
    suit 16-bit inputs; ``for_dtype`` gives smaller blocks for fp32 (shared memory). Every
    default compiles for sm_90 with wgmma + TMA and no register spills (ptxas -v).
    """

    stats_block: tuple[int, int] = (128, 64)  # BLOCK_N, BLOCK_H (K step)
    stat_block: int = 256  # vocab tile of GEMM 1 and of the partials
    dh_block: tuple[int, int, int] = (128, 256, 64)  # BLOCK_N, BLOCK_H, BLOCK_V (K step)
    dw_block: tuple[int, int, int] = (128, 256, 64)  # BLOCK_V, BLOCK_H, BLOCK_N (K step)
    num_warps: int = 8
    num_stages: int = 3
    dh_split: int | None = None
    chunk_tokens: int | None = None
    min_chunk_tokens: int = 1024
    name: ClassVar[str] = "triton"

    def __post_init__(self):
        if self.stat_block % self.dh_block[2] or self.stat_block % self.dw_block[0]:
            raise ValueError("dh_block[2] and dw_block[0] must divide stat_block")

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, **overrides) -> TritonTiles:
        if dtype == torch.float32:
            fp32 = {"stats_block": (128, 32), "stat_block": 128, "dh_block": (128, 128, 32), "dw_block": (64, 128, 32)}
            overrides = {**fp32, **overrides}
        return cls(**overrides)

    def _check(self, x: torch.Tensor, weight: torch.Tensor):
        if x.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                "visurf_kernels.triton_policy_loss is imported); use backend='torch'"
            )
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"the triton backend takes bf16/fp16/fp32 inputs, got {x.dtype}")
        if not (tma_compatible(x) and tma_compatible(weight)):
            raise ValueError(
                f"the triton backend needs a contiguous, 16-byte aligned lm_weight with H * itemsize a "
                f"multiple of 16 (TMA); got H={weight.shape[1]}, {weight.dtype}; use backend='torch'"
            )

    def _launch(self):
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def stats(self, x, weight, tgt, inv_temp: float, with_entropy: bool, keep: bool) -> TileStats:
        self._check(x, weight)
        n, hidden = x.shape
        vocab = weight.shape[0]
        n_tiles = triton.cdiv(vocab, self.stat_block)
        m = x.new_empty((n, n_tiles), dtype=torch.float32)
        s = torch.empty_like(m)
        u = torch.empty_like(m) if with_entropy else None
        tz = x.new_zeros(n, dtype=torch.float32)
        block_n, block_h = self.stats_block
        buf = buf_desc = None
        if keep:  # rows padded to 16 elements for TMA; the descriptor covers [n, vocab]
            buf = x.new_empty((n, triton.cdiv(vocab, 16) * 16), dtype=x.dtype if x.dtype == torch.float32 else torch.bfloat16)
            buf_desc = _desc(buf, [block_n, self.stat_block], [n, vocab])
        _stats_kernel[(triton.cdiv(n, block_n), n_tiles)](
            _desc(x, [block_n, block_h]), _desc(weight, [self.stat_block, block_h]), tgt, buf_desc,
            m, s, u if with_entropy else m, tz,
            n, vocab, hidden, n_tiles, inv_temp,
            BLOCK_N=block_n, STAT_BLOCK=self.stat_block, BLOCK_H=block_h,
            WITH_ENTROPY=with_entropy, STORE_BUF=keep, PRECISION=_precision(x.dtype),
            **self._launch(),
        )  # fmt: skip
        return TileStats(m, s, u, tz, buf)

    def _split(self, n: int, hidden: int, n_tiles: int, device: torch.device) -> int:
        if self.dh_split is not None:
            return max(1, min(self.dh_split, n_tiles))
        if device.type != "cuda":
            return 1
        blocks = triton.cdiv(n, self.dh_block[0]) * triton.cdiv(hidden, self.dh_block[1])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(triton.cdiv(2 * sms, blocks), n_tiles))

    def grads(self, x, weight, buf, tgt, scale, tgt_grad, *, need_dh: bool, dw, accumulate: bool):
        n, hidden = x.shape
        vocab = weight.shape[0]
        n_tiles = scale.shape[1]
        precision = _precision(x.dtype)
        dh = None
        if need_dh:
            split = self._split(n, hidden, n_tiles, x.device)
            split_len = triton.cdiv(n_tiles, split) * self.stat_block
            split = triton.cdiv(vocab, split_len)
            out = x.new_empty((split, n, hidden), dtype=torch.float32 if split > 1 else x.dtype)
            block_n, block_h, block_v = self.dh_block
            _dhidden_kernel[(triton.cdiv(n, block_n), triton.cdiv(hidden, block_h), split)](
                _desc(buf, [block_n, block_v], [n, vocab]), _desc(weight, [block_v, block_h]),
                tgt, scale, tgt_grad, _desc(out, [1, block_n, block_h]),
                n, vocab, n_tiles, split_len,
                BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_V=block_v, STAT_BLOCK=self.stat_block,
                PRECISION=precision, **self._launch(),
            )  # fmt: skip
            dh = out[0] if split == 1 else out.sum(dim=0).to(x.dtype)
        if dw is not None:
            block_v, block_h, block_n = self.dw_block
            _dweight_kernel[(triton.cdiv(hidden, block_h), triton.cdiv(vocab, block_v))](
                _desc(buf, [block_n, block_v], [n, vocab]), _desc(x, [block_n, block_h]),
                tgt, scale, tgt_grad, _desc(dw, [block_v, block_h]),
                n, vocab, n_tiles,
                BLOCK_V=block_v, BLOCK_H=block_h, BLOCK_N=block_n, STAT_BLOCK=self.stat_block,
                ACCUMULATE=accumulate, PRECISION=precision, **self._launch(),
            )  # fmt: skip
        return dh
