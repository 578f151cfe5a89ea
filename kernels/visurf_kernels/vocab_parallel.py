"""Reduction of per-vocab-tile softmax partials over tiles and tensor-parallel ranks.

Every tile engine (``chunked.TorchTiles``, ``triton_policy_loss.TritonTiles``) scans a
chunk of ``n`` rows against its local vocabulary ``lm_weight[V_local, H]`` in tiles of
``B`` columns and reports, for tile ``j`` covering columns ``C_j`` of ``z = x W^T / T``:

    m[r, j] = max_{v in C_j} z[r, v]
    s[r, j] = sum_{v in C_j} exp(z[r, v] - m[r, j])
    u[r, j] = sum_{v in C_j} exp(z[r, v] - m[r, j]) * (z[r, v] - m[r, j])    (entropy only)
    tz[r]   = z[r, target_r]   if the target column is local, else 0

``reduce_row_stats`` turns them into the row log-sum-exp, the target log-prob and the
entropy. With ``M = max_j m_j`` (MAX all-reduce over ranks) and ``c_j = exp(m_j - M)``:

    S   = sum_j c_j s_j                                 (SUM all-reduce)
    U   = sum_j c_j (u_j + (m_j - M) s_j)               (SUM all-reduce) = sum_v exp(z_v - M)(z_v - M)
    lse = M + log S,   logp = tz - lse                  (tz: SUM all-reduce, one rank holds it)
    H   = lse - sum_v softmax(z)_v z_v = log S - U / S

Every term is relative to the row max, so logits of any magnitude (|z| ~ 1e4) stay finite
and the entropy does not cancel two large numbers. ``S``, ``U`` and ``tz`` travel in one
packed all-reduce.

Vocab-parallel gradients: each rank computes ``d lm_weight`` for its own shard (complete)
and ``d hidden`` summed over its own shard only: a per-rank *partial* that the caller
reduces (SUM over the TP group), as Megatron's copy-to-tensor-parallel-region mapping
does in its backward. The loss and all per-token statistics are identical on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class TileStats(NamedTuple):
    """Per-tile partials of one chunk of rows (see the module docstring).

    ``m``, ``s``: ``[n, n_tiles]``; ``u``: ``[n, n_tiles]`` or ``None`` without entropy;
    ``tz``: ``[n]``; ``buf``: the engine's saved ``exp(z - m_tile)`` ``[n, V_local]`` when
    the gradient pass follows, else ``None``.
    """

    m: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor | None
    tz: torch.Tensor
    buf: torch.Tensor | None


class RowStats(NamedTuple):
    lse: torch.Tensor  # [n]
    logp: torch.Tensor  # [n], target log-prob (meaningless on ignored rows; the caller masks)
    entropy: torch.Tensor | None  # [n]


def reduce_row_stats(st: TileStats, tp_group=None) -> RowStats:
    """Row ``lse``, target ``logp`` and entropy from tile partials, reduced over ``tp_group``."""
    row_max = st.m.amax(dim=1)
    if tp_group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    shift = st.m - row_max[:, None]  # <= 0
    c = torch.exp(shift)
    parts = [(c * st.s).sum(dim=1), st.tz]
    if st.u is not None:
        parts.append((c * (st.u + shift * st.s)).sum(dim=1))
    if tp_group is not None:
        packed = torch.stack(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        parts = list(packed.unbind(0))
    sum_exp, target_logit = parts[0], parts[1]
    log_sum = torch.log(sum_exp)
    lse = row_max + log_sum
    entropy = log_sum - parts[2] / sum_exp if st.u is not None else None
    return RowStats(lse, target_logit - lse, entropy)


def min_over_group(value: int, device: torch.device, tp_group=None) -> int:
    """``min`` of an int over the TP group (ranks must agree on their chunking)."""
    if tp_group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp_group)
    return int(t.item())
