"""Torch tile engine (the ``torch`` backend: CPU, and any device without Triton).

Same algorithm as the Triton kernels (see ``function.py`` for the driver), in plain torch
ops over vocab tiles of ``block_vocab`` columns; the driver feeds it chunks of ``n`` rows,
so no ``[N, V]`` tensor ever exists. It computes in ``promote_types(dtype, float32)``:
16-bit inputs are upcast tile by tile (fp32 GEMMs), float64 inputs stay float64, which
makes this engine an exact check of the algorithm against the float64 oracle.

Shapes: ``x[n, H]``, ``weight[V_local, H]``, local target column ``tgt[n]`` (-1 when the
target is not in this shard), ``scale[n, n_tiles]``, ``tgt_grad[n]``.

- ``stats``: per tile ``z = x W_tile^T / T`` -> ``TileStats`` partials, and with ``keep`` the
  buffer ``e = exp(z - m_tile)`` ``[n, V_local]`` for the gradient pass.
- ``grads``: per tile ``dY = e * scale[:, j]`` with the target column replaced by
  ``tgt_grad`` (``dY = d loss / d(x W^T)``, see ``function.py``), then
  ``dh += dY W_tile`` and ``dw[tile] (+)= dY^T x``. The buffer is overwritten in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .vocab_parallel import TileStats


@dataclass(frozen=True)
class TorchTiles:
    """Tile engine in torch ops. ``chunk_tokens=None`` lets the driver size the row chunks."""

    block_vocab: int = 4096
    chunk_tokens: int | None = None
    min_chunk_tokens: int = 256
    name: ClassVar[str] = "torch"

    def _tiles(self, vocab: int):
        for j, v0 in enumerate(range(0, vocab, self.block_vocab)):
            yield j, v0, min(v0 + self.block_vocab, vocab)

    def stats(self, x, weight, tgt, inv_temp: float, with_entropy: bool, keep: bool) -> TileStats:
        cd = torch.promote_types(x.dtype, torch.float32)
        n, vocab = x.shape[0], weight.shape[0]
        n_tiles = -(-vocab // self.block_vocab)
        xc = x.to(cd)
        m = xc.new_empty((n, n_tiles))
        s = xc.new_empty((n, n_tiles))
        u = xc.new_empty((n, n_tiles)) if with_entropy else None
        tz = xc.new_zeros(n)
        buf = xc.new_empty((n, vocab)) if keep else None
        for j, v0, v1 in self._tiles(vocab):
            z = (xc @ weight[v0:v1].to(cd).T).mul_(inv_temp)
            local = tgt - v0
            hit = (local >= 0) & (local < v1 - v0)
            z_tgt = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            tz += torch.where(hit, z_tgt, 0.0)
            m[:, j] = z.amax(dim=1)
            z -= m[:, j, None]
            e = torch.exp(z)
            s[:, j] = e.sum(dim=1)
            if u is not None:
                u[:, j] = (e * z).sum(dim=1)
            if buf is not None:
                buf[:, v0:v1] = e
        return TileStats(m, s, u, tz, buf)

    def grads(self, x, weight, buf, tgt, scale, tgt_grad, *, need_dh: bool, dw, accumulate: bool):
        cd = buf.dtype
        xc = x.to(cd)
        dh = xc.new_zeros(x.shape) if need_dh else None
        for j, v0, v1 in self._tiles(weight.shape[0]):
            dy = buf[:, v0:v1].mul_(scale[:, j, None])
            local = tgt - v0
            hit = (local >= 0) & (local < v1 - v0)
            col = local.clamp(0, v1 - v0 - 1)[:, None]
            dy.scatter_(1, col, torch.where(hit, tgt_grad, dy.gather(1, col).squeeze(1))[:, None])
            w_tile = weight[v0:v1].to(cd)
            if dh is not None:
                dh.addmm_(dy, w_tile)
            if dw is not None:
                if dw.dtype == cd:
                    dw[v0:v1].addmm_(dy.T, xc, beta=float(accumulate))
                else:  # single chunk written straight in the weight's dtype
                    dw[v0:v1].copy_(dy.T @ xc)
        return dh
