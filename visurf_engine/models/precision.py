"""The mixed-precision contract of training (``model.dtype``, ``model.compute_dtype``).

- **master** (``model.dtype``, float32 by default): the dtype of the trained parameters, their
  gradients and the optimizer state. ``bfloat16`` trains in pure bf16 (no master copy).
- **compute** (``model.compute_dtype``; ``auto``: bfloat16 on CUDA, float32 elsewhere): the dtype
  of every forward's matrix products. With compute < master the forward runs under autocast
  (``hf``: over the master weights; ``fsdp``: the all-gathered parameters are cast once,
  ``MixedPrecisionPolicy``) and the fused loss receives ``hidden`` and the LM head's weight in the
  compute dtype (``head_inputs``): the LM-head GEMM runs in bf16 with fp32 accumulation inside
  the kernel, as in every peer (Liger, verl, TRL), and its gradient flows back through the cast
  into the fp32 master weight. Without the cast the final RMSNorm's fp32 output (the residual
  stream stays fp32 under autocast) would send the loss down its fp32 (tf32x3) path with an fp32
  ``[n, V]`` buffer: another kernel than the one ``bench/kernels.py`` measures.

Gradients are reduced in float32 (``fsdp``: ``reduce_dtype``; ``hf``: the master gradients).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    master: torch.dtype = torch.float32
    compute: torch.dtype = torch.float32

    @classmethod
    def of(cls, master: str, compute: str, device: torch.device) -> Precision:
        """From the config names (``model.dtype``, ``model.compute_dtype``) on ``device``."""
        if compute == "auto":
            compute = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        return cls(DTYPES[master], DTYPES[compute])

    @property
    def mixed(self) -> bool:
        """Whether the forward computes in a narrower dtype than the weights are kept in."""
        return self.compute != self.master

    def autocast(self, device: torch.device):
        """The context every forward runs in: autocast to the compute dtype when mixed."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.compute)

    def head_inputs(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden[N, H]`` and the LM head ``weight[V, H]`` in the compute dtype (differentiable casts)."""
        return hidden.to(self.compute), weight.to(self.compute)
