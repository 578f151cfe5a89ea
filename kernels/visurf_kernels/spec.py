"""``LossSpec``: the options of the policy loss, held once.

Every entry point (``fused_policy_loss``, ``fused_logprobs``, ``FusedPolicyLoss``,
``policy_loss_from_logp``) takes one, so a new option is one field here and one use where
the math needs it. How the LM-head weight is sharded (``tp_group``, ``vocab_start``) is not
an option of the loss but a property of the call's inputs, so it stays a call argument.

Fields (math in ``reference``):

- ``temperature``: logits are ``z = hidden @ lm_weight^T / temperature``;
- ``eps_low``, ``eps_high``: the PPO clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio;
- ``dual_clip``: ``c > 1`` bounds the objective of negative-advantage tokens below by ``c A``;
- ``tis_cap``: ``C > 0`` turns on truncated importance sampling against the rollout engine: each
  token's weight ``w_t`` is multiplied by ``min(pi_old(a_t) / pi_rollout(a_t), C)`` (detached),
  given the engine's per-token ``rollout_logp`` (``None``: no correction);
- ``with_entropy``: also report the per-token entropy (no gradient);
- ``ignore_index``: target value of rows that are not completion tokens;
- ``backend``: ``auto`` | ``triton`` | ``torch`` | ``reference`` (see the package docstring);
- ``shaping_gamma``: the ``gamma`` of the ``shaped`` per-token objective ``p / (p + gamma)``
  (LUFFY's policy shaping; ``reference``);
- ``kl_coef``, ``kl_estimator``: a KL penalty ``kl_coef * KL_t`` added to every token's loss,
  against a reference policy's log-probs ``ref_logp`` (``reference.kl_penalty``: ``k1``,
  ``k2``, ``k3`` = verl's ``low_var_kl`` = TRL's estimator); ``kl_coef = 0`` (default) adds
  nothing and needs no ``ref_logp``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BACKENDS = ("auto", "triton", "torch", "reference")
KL_ESTIMATORS = ("k1", "k2", "k3")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossSpec:
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    tis_cap: float | None = None
    with_entropy: bool = False
    ignore_index: int = IGNORE_INDEX
    backend: str = "auto"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    shaping_gamma: float = 0.1

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"LossSpec.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"LossSpec: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"LossSpec.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"LossSpec.tis_cap must be > 0 (or None), got {self.tis_cap}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown loss backend {self.backend!r}; choose one of {BACKENDS}")
        if not self.shaping_gamma > 0:
            raise ValueError(f"LossSpec.shaping_gamma must be > 0, got {self.shaping_gamma}")
        if self.kl_coef < 0 or self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossSpec: need kl_coef >= 0 and kl_estimator in {KL_ESTIMATORS}, got {self.kl_coef}, "
                             f"{self.kl_estimator!r}")  # fmt: skip

    def replace(self, **changes) -> LossSpec:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
