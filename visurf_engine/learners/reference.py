"""The KL penalty's reference policy (``algo.kl_coef > 0``): the model post-training starts from,
frozen, in the compute dtype (``model.compute_dtype``: bf16 on CUDA), without gradients or
optimizer state; with ``algo.kl_coef = 0`` it does not exist. Its per-token log-probs of a step's
members come from one no-grad fused pass (``logprobs``, the learner's signature). A learner whose
weights are sharded gives the reference the same sharding (``FSDPLearner.reference``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from visurf_kernels import LossSpec

from ..models.hf import load_model
from ..models.policy import Batching, Policy, Prompts
from ..models.precision import Precision
from ..parallel.world import World
from .forward import PolicyForward, forward_logprobs


class Reference:
    def __init__(self, module: PolicyForward, policy: Policy, world: World | None = None):
        """``module``: the frozen model's forward; ``policy``: collates the batches; ``world``:
        the ranks that hold shards of ``module`` (None: a whole replica per rank)."""
        self.module, self.policy, self.world = module, policy, world

    @classmethod
    def load(cls, path: str | Path, policy: Policy, spec: LossSpec) -> Reference:
        """A whole replica of the checkpoint at ``path`` on the policy's device, in its compute dtype."""
        dtype = policy.precision.compute
        model = load_model(path, dtype=dtype, device=policy.device)
        model.eval().requires_grad_(False)
        return cls(PolicyForward(model, Precision(dtype, dtype), spec), policy)

    @property
    def model(self) -> torch.nn.Module:
        return self.module.model

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                 batching: Batching) -> torch.Tensor:  # fmt: skip
        return forward_logprobs(self.module, self.policy, prompts, idx, completions, batching, self.world)
