"""The rollout/trainer mismatch on the sampled tokens (``docs/design.md`` §1).

A rollout engine with its own kernels (vLLM, maybe in bf16) samples token ``a_t`` from
``pi_rollout``; the trainer's loss sees the same tokens under ``pi_old``, the same weights
through the trainer's kernels (the pre-update log-probs: the update's own ``logp`` when there
is one update per step, else the old-log-prob pass). Per rollout token, with
``d_t = log pi_rollout(a_t) - log pi_old(a_t)`` and the importance ratio ``r_t = exp(-d_t)``:

    |d_t|                 the mean absolute log-prob difference
    k3_t = r_t - 1 + d_t  an estimator of KL(pi_rollout || pi_old) from samples of pi_rollout
                          (Schulman's k3: unbiased and never negative)
    [r_t > C]             the share of tokens whose truncated ratio min(r_t, C) hits the cap C
                          (``algo.rollout_correction=tis``; ``visurf_kernels.truncated_is_ratio``)

Tokens without a rollout log-prob (NaN: the gold, which no engine sampled) are left out.
"""

from __future__ import annotations

import torch


def mismatch_sums(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float | None = None) -> dict[str, float]:
    """Sums over the tokens ``[N]`` with a rollout log-prob: ``tokens``, ``abs`` (of ``|d_t|``),
    ``kl`` (of ``k3_t``) and, given a ``cap``, ``truncated`` (tokens with ``r_t > cap``); float64."""
    rollout_logp = rollout_logp.to(trainer_logp.device)
    keep = ~torch.isnan(rollout_logp)
    d = (rollout_logp[keep].double() - trainer_logp[keep].double()).cpu()
    ratio = torch.exp(-d)
    out = {"tokens": float(keep.sum()), "abs": d.abs().sum().item(), "kl": (ratio - 1 + d).sum().item()}
    if cap is not None:
        out["truncated"] = float((ratio > cap).sum())
    return out
