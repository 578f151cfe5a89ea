"""Eager reference of the policy-loss contract: materialised logits, plain torch ops.

This is the single oracle of the codebase. Tests run it in float64 and compare every
other backend against it; the trainer may also use it (``loss.backend=reference``) on
tiny models. It never runs vocab-parallel.

Shapes: ``hidden[N, H]``, ``lm_weight[V, H]``, per-token ``targets[N]`` (int64),
``old_logp[N]``, ``adv[N]``, ``w[N]`` and the optional per-token ``objective[N]`` (integer
codes of ``OBJECTIVES``; a bool tensor means ``logprob`` where True, ``ppo`` elsewhere).
``old_logp=None`` means on-policy (one update per batch): ``old_logp = logp`` detached,
so ``rho = 1`` and the old-log-prob pass can be skipped.

Per token ``t`` (``z_t = hidden_t @ lm_weight^T / temperature``, ``p_t = exp(logp_t)``, ``sg``:
stop-gradient):

    logp_t  = z_t[target_t] - logsumexp(z_t)
    H_t     = logsumexp(z_t) - sum_v softmax(z_t)_v * z_t,v
    rho_t   = exp(logp_t - old_logp_t)
    obj_t   = by objective_t:
      ppo      min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),
               max(., c A_t) if dual_clip = c is set and A_t < 0      (the default)
      logprob  A_t logp_t                  (SFT; ViSurf's ``gold_loss: logprob``)
      shaped   A_t p_t / (p_t + gamma)     (LUFFY's policy shaping of an off-policy token, the
                                            behaviour probability taken as 1; no clip;
                                            gamma = shaping_gamma)
      dft      A_t sg(p_t) logp_t          (DFT's reward-rectified SFT)
      phi      A_t sg(p_t (1 - p_t)) logp_t  (CHORD-phi's token weighting of SFT)
    loss_t  = -obj_t + beta * KL_t       (beta = kl_coef; KL against ref_logp, ``kl_penalty``)
    w_t     = w_t * min(exp(old_logp_t - rollout_logp_t), C)    if tis_cap = C is set (TIS)
    loss    = sum_t w_t * loss_t

Their gradients in ``logp_t``: ``logprob`` ``A``; ``shaped`` ``A gamma p / (p + gamma)^2``;
``dft`` ``A p``; ``phi`` ``A p (1 - p)``; ``ppo`` ``rho A`` unclipped, 0 clipped.

**Truncated importance sampling** (``tis_cap``, ``truncated_is_ratio``). The rollout engine
(e.g. vLLM in bf16, other kernels) samples token ``a_t`` from ``pi_rollout``, which is not
exactly the trainer's old policy ``pi_old`` (the same weights through the trainer's kernels).
The PPO gradient is an expectation under ``pi_old``; reweighting each token by ``pi_old(a_t) /
pi_rollout(a_t)``, truncated at ``C`` to bound the variance, corrects for the difference
(Yao et al., 2025). The ratio is a constant (no gradient). It is formed from ``old_logp`` as
the loss sees it, so on-policy (``old_logp=None``) it is this call's own ``logp`` detached:
computed inside the kernel contract, it costs no extra forward pass. ``rollout_logp_t`` NaN
marks a token the engine did not sample (the gold answer): its ratio is 1.

Rows whose target equals ``ignore_index`` contribute nothing and report ``logp = 0``,
``entropy = 0`` and ``clipped = False``; rows with ``w_t = 0`` contribute nothing to the
loss even where ``loss_t`` is not finite. ``clipped_t`` is true where the surrogate's
gradient is cut by a clip (the PPO clip fraction numerator; dual-clip included).
"""

from __future__ import annotations

import torch

from .spec import LossSpec


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` at the sampled token, ``d = ref_logp - logp``:

        k1 = -d                 (unbiased, high variance; gradient 1)
        k2 = d^2 / 2            (gradient -d)
        k3 = exp(d) - d - 1     (unbiased, >= 0, low variance: verl's low_var_kl, TRL's; gradient 1 - exp(d))
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    return torch.expm1(d) - d


def truncated_is_ratio(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(train_logp - rollout_logp), cap)`` per token, detached; 1 where ``rollout_logp``
    is NaN (a token the rollout engine did not sample)."""
    ratio = torch.exp(train_logp.detach() - rollout_logp).clamp(max=cap)
    return torch.where(torch.isnan(rollout_logp), torch.ones_like(ratio), ratio)


OBJECTIVES = ("ppo", "logprob", "shaped", "dft", "phi")  # per-token objective codes 0, 1, 2, 3, 4


def objective_codes(objective: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
    """``objective`` as int64 codes (a bool mask: ``logprob`` where True); None stays None."""
    if objective is None:
        return None
    if objective.shape != (n,):
        raise ValueError(f"objective must be [N] = [{n}], got {tuple(objective.shape)}")
    return objective.to(device=device, dtype=torch.int64)


def _surrogate(logp, old_logp, adv, spec: LossSpec):
    """Per-token PPO-clip objective and clip flags (all ``[N]``)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - spec.eps_low, 1.0 + spec.eps_high) * adv
    obj = torch.minimum(unclipped, clipped_obj)
    clipped = clipped_obj < unclipped
    if spec.dual_clip is not None:
        floor = spec.dual_clip * adv
        dual = (adv < 0) & (obj < floor)
        obj = torch.where(dual, floor, obj)
        clipped = clipped | dual
    return obj, clipped


def token_objective(logp, old_logp, adv, spec: LossSpec, codes: torch.Tensor | None):
    """Per-token objective ``obj_t`` and clip flags of the module docstring (``codes``: int64
    ``OBJECTIVES`` codes, None: all ``ppo``). Each branch is evaluated only on its own tokens
    (the others see a harmless 0), so no branch's non-finite value or gradient leaks."""
    obj, clipped = _surrogate(logp, old_logp, adv, spec)
    if codes is None:
        return obj, clipped
    zero = torch.zeros_like(logp)
    for code, name in enumerate(OBJECTIVES[1:], 1):
        mine = codes == code
        lp = torch.where(mine, logp, zero)
        p = torch.exp(lp)
        if name == "logprob":
            value = adv * lp
        elif name == "shaped":
            value = adv * p / (p + spec.shaping_gamma)
        elif name == "dft":
            value = adv * p.detach() * lp
        else:  # phi
            value = adv * (p * (1 - p)).detach() * lp
        obj = torch.where(mine, value, obj)
    return obj, clipped & (codes == 0)


def policy_loss_from_logp(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    w: torch.Tensor,
    spec: LossSpec,
    objective: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, per-token loss and clip flags given per-token log-probs ``logp[N]``.

    Shared by every backend: once ``logp`` is known the rest is elementwise (each token's
    objective, ``spec``'s clip range, dual clip, shaping gamma, KL penalty, which needs
    ``ref_logp[N]`` when ``kl_coef > 0``, and TIS cap, which uses ``rollout_logp[N]`` when
    ``tis_cap`` is set). Returns ``(loss scalar, loss_t[N], clipped[N] bool)``.
    """
    if spec.tis_cap is not None and rollout_logp is not None:
        w = w * truncated_is_ratio(old_logp, rollout_logp.to(old_logp.dtype), spec.tis_cap)
    obj, clipped = token_objective(logp, old_logp, adv, spec, objective_codes(objective, logp.shape[0], logp.device))
    loss_t = -obj
    if spec.kl_coef:
        if ref_logp is None:
            raise ValueError("LossSpec.kl_coef > 0 needs the reference policy's per-token log-probs (ref_logp)")
        loss_t = loss_t + spec.kl_coef * kl_penalty(logp, ref_logp.to(logp.dtype), spec.kl_estimator)
    loss = torch.where(w != 0, w * loss_t, torch.zeros_like(loss_t)).sum()
    return loss, loss_t, clipped


def logprobs_reference(
    hidden: torch.Tensor, lm_weight: torch.Tensor, targets: torch.Tensor, spec: LossSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``logp[N]`` and (``spec.with_entropy``) entropy ``H[N]`` from materialised logits.

    Computes in ``promote_types(dtype, float32)``, so float64 inputs give a float64 oracle.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ lm_weight.to(dtype).T / spec.temperature  # [N, V]
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != spec.ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logits.gather(1, safe_t[:, None]).squeeze(1) - lse
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = None
    if spec.with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def fused_policy_loss_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    w: torch.Tensor,
    spec: LossSpec,
    objective: torch.Tensor | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, stats)`` of the module docstring; autograd flows to ``hidden`` and ``lm_weight``.

    ``stats``: ``logp[N]`` (detached), ``clipped[N]`` bool, ``entropy[N]`` if requested.
    """
    logp, entropy = logprobs_reference(hidden, lm_weight, targets, spec)
    dtype = logp.dtype
    valid = targets != spec.ignore_index
    w = torch.where(valid, w.to(dtype), torch.zeros((), dtype=dtype, device=w.device))
    old = logp.detach() if old_logp is None else old_logp.to(dtype)
    loss, _, clipped = policy_loss_from_logp(logp, old, adv.to(dtype), w, spec, objective, ref_logp=ref_logp,
                                             rollout_logp=rollout_logp)  # fmt: skip
    stats = {"logp": logp.detach(), "clipped": clipped & valid}
    if entropy is not None:
        stats["entropy"] = entropy.detach()
    return loss, stats
