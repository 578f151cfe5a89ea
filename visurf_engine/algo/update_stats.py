"""What one update logs, accumulated over its micro-batches (``UpdateStats``).

Per micro-batch the kernel reports per-token ``logp``, ``clipped`` and ``entropy`` for the
members' completion tokens; over an update (``n`` optimizer steps) the metrics are

    loss       mean over the optimizer steps of the summed micro-batch losses
    grad_norm  mean over the optimizer steps
    clip_frac  clipped tokens / all tokens
    entropy    mean over the rollout tokens (the gold's left out: the paper's Figure 5)
    kl         mean KL estimate to the reference over the rollout tokens (with a KL penalty)
    mismatch/  the rollout/trainer mismatch on the sampled tokens (``algo.mismatch``), when the
               rollout engine reports log-probs
"""

from __future__ import annotations

from collections import defaultdict

import torch
from visurf_kernels import kl_penalty

from .members import Members, per_token
from .mismatch import mismatch_sums

MISMATCH = {"abs": "mismatch/logp_abs", "kl": "mismatch/kl", "truncated": "mismatch/tis_truncated"}


class UpdateStats:
    def __init__(self, kl_estimator: str, tis_cap: float | None):
        self.kl_estimator, self.tis_cap = kl_estimator, tis_cap
        self.sums, self.mismatch = defaultdict(float), defaultdict(float)

    def add(self, members: Members, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """One micro-batch: ``members`` and the kernel's detached ``loss`` and per-token ``stats``."""
        s, logp = self.sums, stats["logp"]
        rollout_tok = per_token(~members.gold, members.lengths).to(logp.device)
        s["loss"] += loss.item()
        s["clipped"] += stats["clipped"].float().sum().item()
        s["tokens"] += float(members.lengths.sum())
        s["entropy"] += stats["entropy"][rollout_tok].sum().item()
        s["rollout_tokens"] += rollout_tok.sum().item()
        if members.ref_logp is not None:
            s["kl"] += kl_penalty(logp, torch.cat(members.ref_logp).to(logp.device), self.kl_estimator)[rollout_tok].sum().item()
            s["kl_tokens"] += rollout_tok.sum().item()
        if members.rollout_logp is not None:
            trainer_logp = torch.cat(members.old_logp) if members.old_logp is not None else logp
            for k, v in mismatch_sums(trainer_logp, torch.cat(members.rollout_logp), self.tis_cap).items():
                self.mismatch[k] += v

    def add_step(self, grad_norm: float) -> None:
        self.sums["grad_norm"] += grad_norm

    def metrics(self, steps: int) -> dict[str, float]:
        s = self.sums
        out = {"loss": s["loss"] / steps, "grad_norm": s["grad_norm"] / steps, "clip_frac": s["clipped"] / max(s["tokens"], 1)}
        out["entropy"] = s["entropy"] / s["rollout_tokens"] if s["rollout_tokens"] else float("nan")
        if s["kl_tokens"]:
            out["kl"] = s["kl"] / s["kl_tokens"]
        if self.mismatch["tokens"]:
            out |= {MISMATCH[k]: v / self.mismatch["tokens"] for k, v in self.mismatch.items() if k != "tokens"}
        return out
