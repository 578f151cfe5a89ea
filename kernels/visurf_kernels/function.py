"""Driver shared by the tile engines, and the ``autograd.Function`` that computes the
gradients during the forward pass.

Shapes: ``hidden[N, H]``, ``lm_weight[V_local, H]`` (rows ``vocab_start ..`` of the full
vocabulary), per-token ``targets[N]``, ``old_logp[N]`` (or None: on-policy, ``rho = 1``),
``adv[N]``, ``w[N]``, the optional per-token ``objective[N]`` codes and the optional per-token log-probs
``TokenRefs(ref_logp[N], rollout_logp[N])`` of the KL penalty's reference policy
(``spec.kl_coef > 0``) and of the rollout engine (TIS weights, ``spec.tis_cap``). Math:
``reference.py``;
``y = hidden @ lm_weight^T``, ``z = y / T``.

Because the loss ``L = sum_t w_t loss_t`` is a scalar, its gradients are produced in the
forward pass (Liger's trick) and ``backward`` only scales them by the upstream gradient:

    g_t        = dL / dlogp_t          (autograd of ``policy_loss_from_logp`` on [n] vectors:
                                        -w_t rho_t A_t unclipped, 0 clipped or dual-clipped,
                                        -w_t A_t on ``logprob`` rows; each objective's own)
    dL/dy_t,v  = (g_t / T) (onehot(target_t)_v - softmax(z_t)_v)
    d hidden   = dL/dy @ lm_weight,     d lm_weight = (dL/dy)^T @ hidden

The entropy is reported only: it has no gradient. Rows are processed in chunks of
``n`` tokens; per chunk an engine (``TorchTiles`` / ``TritonTiles``) computes softmax
partials over vocab tiles (``stats``, keeping ``exp(z - m_tile)`` for the chunk), the
driver reduces them (``vocab_parallel.reduce_row_stats``, over TP ranks too) and forms the
per-row / per-tile gradient scales, and the engine runs the two gradient GEMMs
(``grads``). Three GEMM-sized passes in all; the largest temporary is the chunk buffer
``[n, V_local]`` with ``n = max(min_chunk_tokens, N / 16)``.

Row selection, done once per call: rows whose target is ``ignore_index`` are skipped
(``logp = entropy = 0``, not clipped, no loss); rows with ``w = 0`` get their statistics
from a pass without the gradient GEMMs (they cost nothing in the gradient); with no row
left the loss is 0 and the gradients are zero. ``lm_weight``'s gradient is accumulated
over chunks in fp32 (or written directly in its dtype when one chunk covers all rows) and
returned in the weight's dtype; ``hidden``'s in hidden's dtype. With a ``tp_group``,
``d hidden`` is this rank's partial (see ``vocab_parallel``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .reference import objective_codes, policy_loss_from_logp
from .spec import LossSpec
from .vocab_parallel import min_over_group, reduce_row_stats


class TokenRefs(NamedTuple):
    """Optional per-token log-probs of other policies: the KL reference's and the rollout engine's."""

    ref_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None

    def select(self, idx: torch.Tensor, dtype: torch.dtype) -> dict:
        """The rows ``idx`` in ``dtype``, as ``policy_loss_from_logp``'s keyword arguments."""
        return {k: v.index_select(0, idx).to(dtype) if v is not None else None for k, v in self._asdict().items()}


class Shard(NamedTuple):
    """Where this rank's ``lm_weight`` rows sit in the vocabulary (``tp_group=None``: all of it)."""

    tp_group: Any = None
    vocab_start: int = 0


def _chunk_rows(engine, n: int, device: torch.device, tp_group) -> int:
    """Rows per chunk: the engine's ``chunk_tokens`` or ``max(min_chunk_tokens, n / 16)``;
    every TP rank takes the smallest, so their collectives line up."""
    chunk = engine.chunk_tokens or max(engine.min_chunk_tokens, -(-n // 16))
    return min_over_group(max(1, min(chunk, n)), device, tp_group)


def _local_targets(targets: torch.Tensor, vocab: int, spec: LossSpec, shard: Shard) -> torch.Tensor:
    """Target column in this vocab shard, -1 where ignored or held by another rank."""
    local = targets - shard.vocab_start
    keep = (targets != spec.ignore_index) & (local >= 0) & (local < vocab)
    return torch.where(keep, local, torch.full_like(local, -1))


class _Pass:
    """One scan over a set of rows: statistics, and with ``dlogp_fn`` the gradient GEMMs."""

    def __init__(self, engine, hidden, weight, targets, spec: LossSpec, shard: Shard):
        self.engine, self.hidden, self.weight, self.spec, self.shard = engine, hidden, weight, spec, shard
        self.tgt_local = _local_targets(targets, weight.shape[0], spec, shard)
        cd = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        self.logp = hidden.new_zeros(n, dtype=cd)
        self.entropy = hidden.new_zeros(n, dtype=cd) if spec.with_entropy else None

    def chunk_rows(self, n: int) -> int:
        return _chunk_rows(self.engine, n, self.hidden.device, self.shard.tp_group)

    def run(self, rows: torch.Tensor, chunk: int, dlogp_fn=None, dh=None, dw=None):
        """Scans ``rows`` (int64 indices) ``chunk`` at a time; fills ``logp``/``entropy``,
        writes ``dh[rows]``, and writes (first chunk) then accumulates ``dw``."""
        spec, eng = self.spec, self.engine
        inv_temp = 1.0 / spec.temperature
        n = rows.numel()
        for c0 in range(0, n, chunk):
            idx = rows[c0 : c0 + chunk]
            x = self.hidden.index_select(0, idx)
            tgt = self.tgt_local.index_select(0, idx)
            st = eng.stats(x, self.weight, tgt, inv_temp, spec.with_entropy, keep=dlogp_fn is not None)
            lse, logp, entropy = reduce_row_stats(st, self.shard.tp_group)
            self.logp.index_copy_(0, idx, logp.to(self.logp.dtype))
            if entropy is not None:
                self.entropy.index_copy_(0, idx, entropy.to(self.entropy.dtype))
            if dlogp_fn is None:
                continue
            a = dlogp_fn(idx, logp) * inv_temp
            scale = torch.exp(st.m - lse[:, None]).mul_(-a[:, None])
            tgt_grad = -a * torch.expm1(logp)
            accumulate = c0 > 0 or (dw is not None and dw.dtype != self.weight.dtype)  # _grad_buffers
            dh_c = eng.grads(
                x, self.weight, st.buf, tgt, scale, tgt_grad, need_dh=dh is not None, dw=dw, accumulate=accumulate
            )
            if dh is not None:
                dh.index_copy_(0, idx, dh_c.to(dh.dtype))


def _check_inputs(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden[N, H] and lm_weight[V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and lm_weight ({weight.dtype}) must share a dtype")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")


def _grad_buffers(hidden, weight, n_rows: int, chunk: int, need_dh: bool, need_dw: bool):
    """``d hidden`` (zeros: rows outside the gradient rows stay 0) and ``d lm_weight``, each None
    when not needed. ``d lm_weight`` is written by the first chunk in the weight's dtype when
    one chunk covers all ``n_rows``; else it is accumulated in fp32 over the chunks: an fp32
    weight's accumulator written by the first chunk, a 16-bit weight's one zeroed here and
    accumulated by every chunk (the Triton kernel that stores a first fp32 ``[128, 256]`` tile
    from 16-bit inputs would need 258 KiB of shared memory, over sm_90's 227 KiB; the one that
    loads, adds and stores fits)."""
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = None
    if need_dw:
        acc_dtype = weight.dtype if n_rows <= chunk else torch.promote_types(weight.dtype, torch.float32)
        first_writes = n_rows and acc_dtype == weight.dtype
        dw = (torch.empty_like if first_writes else torch.zeros_like)(weight, dtype=acc_dtype)
    return dh, dw


def policy_loss_forward(
    engine, hidden, weight, targets, old_logp, adv, w, objective, refs: TokenRefs, spec: LossSpec, shard: Shard,
    need_dh: bool, need_dw: bool,
):  # fmt: skip
    """Loss, per-token stats, and (as requested) ``d hidden``, ``d lm_weight`` of the loss."""
    _check_inputs(hidden, weight, targets)
    p = _Pass(engine, hidden, weight, targets, spec, shard)
    cd = p.logp.dtype
    valid = targets != spec.ignore_index
    old_logp = old_logp.to(cd) if old_logp is not None else None
    adv = adv.to(cd)
    w = torch.where(valid, w.to(cd), 0.0)
    objective = objective_codes(objective, len(targets), targets.device)

    def dlogp(idx, logp):
        with torch.enable_grad():
            lp = logp.to(cd).detach().requires_grad_()
            old = old_logp[idx] if old_logp is not None else lp.detach()
            codes = objective.index_select(0, idx) if objective is not None else None
            loss, _, _ = policy_loss_from_logp(lp, old, adv[idx], w[idx], spec, codes, **refs.select(idx, cd))
            (g,) = torch.autograd.grad(loss, lp)
        return g.to(logp.dtype)

    grad_rows = valid & (w != 0) if (need_dh or need_dw) else torch.zeros_like(valid)
    rows = grad_rows.nonzero().squeeze(1)
    chunk = p.chunk_rows(rows.numel())
    dh, dw = _grad_buffers(hidden, weight, rows.numel(), chunk, need_dh, need_dw)
    p.run(rows, chunk, dlogp, dh, dw)
    stat_rows = (valid & ~grad_rows).nonzero().squeeze(1)
    p.run(stat_rows, p.chunk_rows(stat_rows.numel()))

    old = old_logp if old_logp is not None else p.logp
    all_rows = torch.arange(len(targets), device=targets.device)
    loss, _, clipped = policy_loss_from_logp(p.logp, old, adv, w, spec, objective, **refs.select(all_rows, cd))
    return loss, p.logp, clipped & valid, p.entropy, dh, (dw.to(weight.dtype) if dw is not None else None)


def policy_loss(engine, hidden, weight, targets, old_logp, adv, w, spec: LossSpec, objective=None, *,
                ref_logp=None, rollout_logp=None, tp_group=None, vocab_start: int = 0):  # fmt: skip
    """``fused_policy_loss`` on a given tile engine."""
    loss, logp, clipped, entropy = PolicyLossFunction.apply(
        hidden, weight, targets, old_logp, adv, w, objective, TokenRefs(ref_logp, rollout_logp), engine, spec,
        Shard(tp_group, vocab_start), torch.is_grad_enabled(),
    )
    stats = {"logp": logp, "clipped": clipped}
    if spec.with_entropy:
        stats["entropy"] = entropy
    return loss, stats


@torch.no_grad()
def logprobs(engine, hidden, weight, targets, spec: LossSpec, *, tp_group=None, vocab_start: int = 0):
    """``fused_logprobs`` on a given tile engine: ``(logp[N] float32, entropy[N] float32 | None)``."""
    _check_inputs(hidden, weight, targets)
    p = _Pass(engine, hidden, weight, targets, spec, Shard(tp_group, vocab_start))
    rows = (targets != spec.ignore_index).nonzero().squeeze(1)
    p.run(rows, p.chunk_rows(rows.numel()))
    return p.logp.float(), (p.entropy.float() if p.entropy is not None else None)


def logprobs_grad(engine, hidden, weight, targets, spec: LossSpec, *, tp_group=None, vocab_start: int = 0):
    """``fused_logprobs_grad`` on a given tile engine."""
    logp, entropy = LogProbFunction.apply(hidden, weight, targets, engine, spec, Shard(tp_group, vocab_start))
    return logp, (entropy if spec.with_entropy else None)


class LogProbFunction(torch.autograd.Function):
    """``apply(hidden, lm_weight, targets, engine, spec, shard)`` -> ``(logp, entropy)``: the
    log-probs with a gradient, for losses built on them; entropy (empty unless requested) has none.

    ``forward`` is the statistics pass of ``logprobs``; ``backward`` runs the gradient pass of
    the loss with ``g_t = dL/dlogp_t`` the upstream gradient (rows with ``g_t = 0`` skipped):
    the softmax statistics once more and the two gradient GEMMs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, engine, spec, shard):
        logp, entropy = logprobs(engine, hidden, weight, targets, spec, tp_group=shard.tp_group,
                                 vocab_start=shard.vocab_start)  # fmt: skip
        ctx.save_for_backward(hidden, weight, targets)
        ctx.engine, ctx.spec, ctx.shard = engine, spec, shard
        entropy = entropy if entropy is not None else logp.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, _g_entropy):
        hidden, weight, targets = ctx.saved_tensors
        p = _Pass(ctx.engine, hidden, weight, targets, ctx.spec, ctx.shard)
        if g_logp is None:
            g_logp = torch.zeros_like(p.logp)
        rows = ((targets != ctx.spec.ignore_index) & (g_logp != 0)).nonzero().squeeze(1)
        chunk = p.chunk_rows(rows.numel())
        dh, dw = _grad_buffers(hidden, weight, rows.numel(), chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        p.run(rows, chunk, lambda idx, logp: g_logp.index_select(0, idx).to(logp.dtype), dh, dw)
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None


class PolicyLossFunction(torch.autograd.Function):
    """``apply(hidden, lm_weight, targets, old_logp, adv, w, objective, refs, engine, spec, shard,
    grad_enabled)`` -> ``(loss, logp, clipped, entropy)``; entropy is empty unless requested.

    Gradients (to ``hidden`` and ``lm_weight`` only) are computed in ``forward`` -- only for
    inputs that require them and only when ``grad_enabled`` (``torch.is_grad_enabled()`` of
    the caller: ``forward`` itself always runs without grad mode). ``backward`` scales them
    in place by the upstream gradient, so it runs once per forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, adv, w, objective, refs, engine, spec, shard,
                grad_enabled):  # fmt: skip
        need_dh = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        loss, logp, clipped, entropy, dh, dw = policy_loss_forward(
            engine, hidden, weight, targets, old_logp, adv, w, objective, refs, spec, shard, need_dh, need_dw
        )
        ctx.grads = (dh, dw)
        logp = logp.float()
        entropy = entropy.float() if entropy is not None else logp.new_empty(0)
        ctx.mark_non_differentiable(logp, clipped, entropy)
        return loss, logp, clipped, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("the fused policy loss's backward runs once per forward (its gradients are consumed)")
        dh, dw = ctx.grads
        ctx.grads = None
        dh = dh.mul_(grad_loss.to(dh.dtype)) if dh is not None else None
        dw = dw.mul_(grad_loss.to(dw.dtype)) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None, None, None
