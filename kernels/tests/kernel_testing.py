"""Test support for the kernels (used by ``test_kernels*.py`` beside it; on ``sys.path``
through ``conftest.py``, so spawned ranks import it too).

- ``make_case``: fresh random inputs, deterministic per seed. ``old_logp`` is placed so the
  ratios ``rho = exp(logp - old_logp)`` cover the unclipped, clipped and dual-clipped
  regions but stay ``margin`` (in log space) away from every clip boundary, so clip flags
  and gradients are well defined for every backend's rounding.
- ``oracle``: ``reference.fused_policy_loss_reference`` in float64 on the case's inputs
  (already rounded to their dtype) upcast to float64, with autograd gradients.
- ``compare``: every output against the oracle, tolerances per input dtype (``TOLERANCES``).
- ``CASES``: the standard case table; ``engine_loss``: ``fused_policy_loss`` on explicit tiles.
- ``run_loss``: a loss function on a case with autograd, its outputs and gradients.
- ``tp_worker``: one rank of the vocab-parallel test (gloo, CPU).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch

from visurf_kernels import IGNORE_INDEX, OBJECTIVES, LossSpec, policy_loss_from_logp
from visurf_kernels.function import policy_loss
from visurf_kernels.reference import fused_policy_loss_reference

# name -> (seed, N, H, V, dtype, make_case options); shapes are deliberately not multiples of
# any tile; "extreme" cases have max |logit| ~ 1e4.
CASES = {
    "fp64-exact": (101, 37, 19, 211, torch.float64, {"temperature": 0.7, "dual_clip": 3.0}),
    "fp32": (102, 53, 24, 300, torch.float32, {}),
    "fp32-temp-dual-logprob": (103, 41, 17, 157, torch.float32, {"temperature": 1.7, "dual_clip": 2.5, "logprob_frac": 0.3}),
    "bf16": (104, 45, 32, 259, torch.bfloat16, {"temperature": 0.8}),
    "fp16": (105, 29, 16, 131, torch.float16, {"dual_clip": 3.0}),
    "fp32-extreme-logits": (106, 33, 20, 173, torch.float32, {"logit_scale": 2500.0}),
    "bf16-extreme-logits": (107, 33, 20, 173, torch.bfloat16, {"logit_scale": 2500.0, "temperature": 0.5}),
    "fp32-kl-k3": (108, 39, 24, 211, torch.float32, {"kl_coef": 0.1, "kl_estimator": "k3", "logprob_frac": 0.2}),
    "fp64-kl-k2-dual": (109, 27, 16, 97, torch.float64, {"kl_coef": 0.5, "kl_estimator": "k2", "dual_clip": 3.0}),
    "bf16-kl-k1": (110, 45, 32, 259, torch.bfloat16, {"kl_coef": 0.05, "kl_estimator": "k1"}),
    # every per-token objective (ppo, logprob, shaped, dft, phi) mixed in one batch
    "fp64-objectives": (111, 43, 18, 137, torch.float64, {"objective_frac": 0.7, "dual_clip": 3.0}),
    "fp32-objectives": (112, 51, 24, 229, torch.float32, {"objective_frac": 0.7, "kl_coef": 0.1}),
    "bf16-objectives": (113, 45, 32, 259, torch.bfloat16, {"objective_frac": 0.8, "temperature": 0.9}),
    "fp32-extreme-objectives": (114, 33, 20, 173, torch.float32, {"objective_frac": 0.7, "logit_scale": 2500.0}),
}


def engine_loss(engine):
    """A ``fused_policy_loss`` running the tile engine ``engine`` (explicit tiles / chunks)."""
    return functools.partial(policy_loss, engine)


@dataclass
class Case:
    hidden: torch.Tensor  # [N, H]
    lm_weight: torch.Tensor  # [V, H]
    targets: torch.Tensor  # [N] int64, IGNORE_INDEX on ignored rows
    old_logp: torch.Tensor | None  # [N] float32 (None: on-policy)
    adv: torch.Tensor  # [N] float32
    w: torch.Tensor  # [N] float32, 0 on masked rows
    objective: torch.Tensor | None  # [N] bool (logprob where True) or int64 codes of OBJECTIVES
    spec: LossSpec = field(default_factory=LossSpec)  # temperature, clip range, dual clip, entropy, KL
    ref_logp: torch.Tensor | None = None  # [N] float32, the KL penalty's reference (when spec.kl_coef > 0)

    def inputs(self, hidden=None, lm_weight=None):
        h = self.hidden if hidden is None else hidden
        wt = self.lm_weight if lm_weight is None else lm_weight
        return (h, wt, self.targets, self.old_logp, self.adv, self.w)

    def args(self, hidden=None, lm_weight=None, **spec_changes):
        """Positional arguments of ``fused_policy_loss``: inputs, spec (with changes), objective."""
        return (*self.inputs(hidden, lm_weight), self.spec.replace(**spec_changes), self.objective)


def make_case(
    seed: int,
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype = torch.float32,
    *,
    temperature: float = 1.0,
    logit_scale: float = 4.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    ignore_frac: float = 0.1,
    masked_frac: float = 0.2,
    logprob_frac: float = 0.0,
    objective_frac: float = 0.0,
    shaping_gamma: float = 0.1,
    argmax_frac: float = 0.3,
    with_entropy: bool = True,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    margin: float = 0.02,
    device: str | torch.device = "cpu",
) -> Case:
    """Random case; logits ``z`` have standard deviation ``logit_scale`` (max ~3-4x that).
    ``logprob_frac``: that share of tokens takes the ``logprob`` objective (a bool mask);
    ``objective_frac``: that share takes one of the non-``ppo`` objectives at random (int codes)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (logit_scale * temperature / math.sqrt(h))
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    z = hidden.double() @ weight.double().T / temperature
    targets = torch.randint(0, v, (n,), generator=g)
    targets = torch.where(torch.rand(n, generator=g) < argmax_frac, z.argmax(dim=1), targets)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE_INDEX
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.where(torch.rand(n, generator=g) < masked_frac, 0.0, 0.1 + torch.rand(n, generator=g, dtype=torch.float64))
    objective = torch.rand(n, generator=g) < logprob_frac if logprob_frac > 0 else None
    if objective_frac > 0:
        picked = torch.randint(1, len(OBJECTIVES), (n,), generator=g)
        objective = torch.where(torch.rand(n, generator=g) < objective_frac, picked, 0)

    safe = targets.clamp(min=0)
    logp = z.gather(1, safe[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    hi = math.log(dual_clip) + 0.5 if dual_clip is not None else 0.6
    log_ratio = -0.6 + (hi + 0.6) * torch.rand(n, generator=g, dtype=torch.float64)
    bounds = [math.log(1 - eps_low), math.log(1 + eps_high)] + ([math.log(dual_clip)] if dual_clip else [])
    for b in bounds:
        d = log_ratio - b
        log_ratio = torch.where(d.abs() < margin, b + margin * torch.where(d < 0, -1.0, 1.0), log_ratio)
    old_logp = logp - log_ratio
    ref_logp = logp + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) if kl_coef else None  # a nearby policy

    spec = LossSpec(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                    with_entropy=with_entropy, kl_coef=kl_coef, kl_estimator=kl_estimator,
                    shaping_gamma=shaping_gamma)  # fmt: skip
    dev = torch.device(device)
    return Case(
        hidden.to(dev),
        weight.to(dev),
        targets.to(dev),
        old_logp.float().to(dev),
        adv.float().to(dev),
        w.float().to(dev),
        objective.to(dev) if objective is not None else None,
        spec,
        ref_logp.float().to(dev) if ref_logp is not None else None,
    )


def oracle(case: Case) -> dict:
    """Float64 reference: loss, logp, entropy, clipped, per-token loss, dh, dw, max |z|."""
    h = case.hidden.detach().double().requires_grad_()
    wt = case.lm_weight.detach().double().requires_grad_()
    ref_logp = case.ref_logp.double() if case.ref_logp is not None else None
    loss, stats = fused_policy_loss_reference(h, wt, case.targets, case.old_logp, case.adv, case.w, case.spec,
                                              case.objective, ref_logp=ref_logp)  # fmt: skip
    loss.backward()
    valid = case.targets != IGNORE_INDEX
    _, loss_t, _ = policy_loss_from_logp(
        stats["logp"],
        stats["logp"] if case.old_logp is None else case.old_logp.double(),
        case.adv.double(),
        case.w.double(),
        case.spec,
        case.objective,
        ref_logp=ref_logp,
    )
    with torch.no_grad():
        zmax = (h @ wt.T / case.spec.temperature).abs().max().item()
    return {
        "loss": loss.detach(),
        "loss_scale": torch.where(valid, case.w.double() * loss_t, 0.0).abs().sum().item(),
        "zmax": zmax,
        "dh": h.grad,
        "dw": wt.grad,
        **stats,
    }


# Per input dtype: ``stat`` -- logp / entropy abs error per unit of max(1, max |z|) (stats are
# float32; logits accumulate in fp32 for every dtype); ``loss`` -- loss error per unit of
# max(1, max|z|) * sum_t |w_t loss_t|; ``grad`` + ``grad_z`` * max|z| bounds
# ||d - d_ref||_F / ||d_ref||_F (16-bit: the gradient GEMM operands and the returned
# gradients are rounded to 16 bits; ``grad_z``: a logit's fp32 rounding moves softmax by
# ~eps32 * |z|, which matters for extreme logits).
TOLERANCES = {
    torch.float64: {"stat": 2e-7, "loss": 1e-12, "grad": 1e-10, "grad_z": 1e-14},
    torch.float32: {"stat": 1e-6, "loss": 1e-6, "grad": 1e-5, "grad_z": 2e-7},
    torch.float16: {"stat": 1e-6, "loss": 1e-6, "grad": 2e-3, "grad_z": 2e-7},
    torch.bfloat16: {"stat": 1e-6, "loss": 1e-6, "grad": 1e-2, "grad_z": 2e-7},
}


def compare(out: dict, ref: dict, dtype: torch.dtype, *, tol: dict | None = None) -> None:
    """Asserts ``out`` (loss, logp, clipped, [entropy], [dh], [dw]) matches ``ref`` = ``oracle``."""
    tol = {**TOLERANCES[dtype], **(tol or {})}
    scale = max(1.0, ref["zmax"])
    for key in ("logp", "entropy"):
        if key in ref:
            assert out[key].dtype == torch.float32, (key, out[key].dtype)
            err = (out[key].double() - ref[key]).abs().max().item()
            assert err <= tol["stat"] * scale, f"{key}: max abs err {err:.3e} > {tol['stat'] * scale:.3e}"
    assert torch.equal(out["clipped"].cpu(), ref["clipped"].cpu()), "clip flags differ"
    err = abs(out["loss"].double().item() - ref["loss"].item())
    bound = tol["loss"] * scale * ref["loss_scale"] + 1e-30
    assert err <= bound, f"loss: err {err:.3e} > {bound:.3e}"
    for key in ("dh", "dw"):
        if out.get(key) is not None:
            diff = (out[key].double() - ref[key]).norm().item()
            norm = ref[key].norm().item()
            rel = tol["grad"] + tol["grad_z"] * ref["zmax"]
            assert diff <= rel * norm + 1e-30, f"{key}: rel err {diff / max(norm, 1e-300):.3e} > {rel:.1e}"


def run_loss(fn, case: Case, **spec_changes) -> dict:
    """Runs ``fn(*case.args(...))`` (a ``fused_policy_loss``-like) with autograd, the case's spec
    with ``spec_changes`` (e.g. ``backend="torch"``); returns outputs and grads."""
    h = case.hidden.detach().clone().requires_grad_()
    wt = case.lm_weight.detach().clone().requires_grad_()
    kl = {"ref_logp": case.ref_logp} if case.ref_logp is not None else {}
    loss, stats = fn(*case.args(h, wt, **spec_changes), **kl)
    loss.backward()
    return {"loss": loss.detach(), "dh": h.grad, "dw": wt.grad, **stats}


def shard_bounds(vocab: int, world: int) -> list[tuple[int, int]]:
    """Contiguous, possibly uneven vocab shards ``[lo, hi)`` of a ``world``-way split."""
    per = -(-vocab // world)
    return [(r * per, min(vocab, (r + 1) * per)) for r in range(world)]


def tp_worker(rank: int, world: int, port: int, out_dir: str, runs: dict, case_args: dict) -> None:
    """One rank of the vocab-parallel test: its shard of ``lm_weight``; writes ``rank{r}.pt``.

    ``runs``: label -> ``(backend, tiles)``; ``tiles=None`` goes through the public API,
    else the backend's tile engine is built from the ``tiles`` kwargs (here, after
    ``TRITON_INTERPRET`` is set for a CPU-only machine).
    """
    if any(b == "triton" for b, _ in runs.values()) and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    from visurf_kernels import fused_logprobs, fused_policy_loss
    from visurf_kernels.chunked import TorchTiles
    from visurf_kernels.function import logprobs

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        case = make_case(**case_args)
        lo, hi = shard_bounds(case.lm_weight.shape[0], world)[rank]
        tp = {"tp_group": dist.group.WORLD, "vocab_start": lo}
        results = {}
        for label, (backend, tiles) in runs.items():
            if tiles is None:
                loss_fn, logp_fn = fused_policy_loss, fused_logprobs
            else:
                if backend == "triton":
                    from visurf_kernels.triton_policy_loss import TritonTiles as engine_cls
                else:
                    engine_cls = TorchTiles
                loss_fn = engine_loss(engine_cls(**tiles))
                logp_fn = functools.partial(logprobs, engine_cls(**tiles))
            h = case.hidden.clone().requires_grad_()
            wt = case.lm_weight[lo:hi].clone().requires_grad_()
            loss, stats = loss_fn(*case.args(h, wt, backend=backend), **tp)
            loss.backward()
            logp, entropy = logp_fn(case.hidden, wt.detach(), case.targets, case.spec.replace(backend=backend), **tp)
            results[label] = {
                "loss": loss.detach(),
                "dh": h.grad,
                "dw": wt.grad,
                **stats,
                "nograd_logp": logp,
                "nograd_entropy": entropy,
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
