"""Fused policy loss: the torch backend and the public API against the float64 oracle.

Tolerances per input dtype are in ``kernel_testing.TOLERANCES`` (logp and
entropy: abs error 1e-6 per unit of max |logit|; gradients: relative Frobenius error
1e-10 float64, 1e-5 float32, 2e-3 fp16, 1e-2 bf16, plus 2e-7 per unit of max |logit|).
Every case draws fresh random inputs from its own seed. The Triton kernels: ``test_kernels_triton.py``; vocab-parallel:
``test_kernels_tp.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from visurf_kernels import (
    BACKENDS,
    OBJECTIVES,
    FusedPolicyLoss,
    LossSpec,
    fused_logprobs,
    fused_logprobs_grad,
    fused_policy_loss,
    kl_penalty,
    policy_loss_from_logp,
    resolve_backend,
    truncated_is_ratio,
)
from visurf_kernels.chunked import TorchTiles

from visurf_kernels.reference import logprobs_reference

from kernel_testing import CASES, compare, engine_loss, make_case, oracle, run_loss

# "tiled": small tiles and chunks, so every case spans several vocab tiles and row chunks.
ENGINES = {"default": TorchTiles(), "tiled": TorchTiles(block_vocab=64, chunk_tokens=16)}


@pytest.mark.parametrize("engine", ENGINES, ids=str)
@pytest.mark.parametrize("name", CASES, ids=str)
def test_torch_backend_matches_oracle(name, engine):
    seed, n, h, v, dtype, opts = CASES[name]
    case = make_case(seed, n, h, v, dtype, **opts)
    ref = oracle(case)
    assert ref["zmax"] > (5e3 if "extreme" in name else 1.0)
    out = run_loss(engine_loss(ENGINES[engine]), case)
    assert out["dh"].dtype == dtype and out["dw"].dtype == dtype
    compare(out, ref, dtype)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["dh"]).all() and torch.isfinite(out["dw"]).all()


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_public_api_matches_oracle(backend):
    case = make_case(201, 40, 24, 190, torch.float32, temperature=1.3, dual_clip=3.0, logprob_frac=0.2)
    ref = oracle(case)
    compare(run_loss(fused_policy_loss, case, backend=backend), ref, torch.float32)
    logp, entropy = fused_logprobs(
        case.hidden, case.lm_weight, case.targets, LossSpec(temperature=1.3, with_entropy=True, backend=backend)
    )
    compare({**{k: ref[k] for k in ("loss", "clipped")}, "logp": logp, "entropy": entropy}, ref, torch.float32)
    assert fused_logprobs(case.hidden, case.lm_weight, case.targets, LossSpec(backend=backend))[1] is None


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_on_policy_without_old_logp(backend):
    case = make_case(250, 35, 16, 120, torch.float32, dual_clip=3.0, logprob_frac=0.3)
    case.old_logp = None  # rho = 1: the gradient is -w A dlogp on every row
    ref = oracle(case)
    assert not ref["clipped"].any()
    compare(run_loss(fused_policy_loss, case, backend=backend), ref, torch.float32)
    compare(run_loss(engine_loss(ENGINES["tiled"]), case), ref, torch.float32)


@pytest.mark.parametrize("fn", ["tiled", "reference"])
@pytest.mark.parametrize("policy", ["off-policy", "on-policy"])
def test_tis_weights_match_the_float64_reference(policy, fn):
    """``tis_cap = C``: loss and gradients equal the float64 oracle run with the weights
    ``w_t * min(exp(old_t - rollout_t), C)`` formed in float64 from the same log-probs (on-policy:
    the oracle's own ``logp``); a NaN rollout log-prob (the gold) weighs 1; without the cap the
    rollout log-probs change nothing."""
    cap = 2.0
    case = make_case(601, 44, 16, 150, torch.float32, dual_clip=3.0, logprob_frac=0.2)
    if policy == "on-policy":
        case.old_logp = None
    train = oracle(case)["logp"] if case.old_logp is None else case.old_logp.double()
    g = torch.Generator().manual_seed(7)
    rollout = (train + 1.2 * torch.randn(train.shape, generator=g, dtype=torch.float64)).float()
    gold = torch.rand(train.shape, generator=g) < 0.25
    rollout[gold] = float("nan")
    ratio = torch.where(gold, 1.0, torch.exp(train - rollout.double()).clamp(max=cap))
    assert (ratio == cap).any() and (ratio < 0.5).any() and (ratio[gold] == 1).all()
    torch.testing.assert_close(truncated_is_ratio(train, rollout.double(), cap), ratio, rtol=0, atol=0)

    loss_fn = engine_loss(ENGINES["tiled"]) if fn == "tiled" else fused_policy_loss
    h = case.hidden.clone().requires_grad_()
    wt = case.lm_weight.clone().requires_grad_()
    loss, stats = loss_fn(*case.args(h, wt, tis_cap=cap, backend="torch" if fn == "tiled" else fn), rollout_logp=rollout)
    loss.backward()
    weighted = dataclasses.replace(case, w=case.w.double() * ratio)
    compare({"loss": loss.detach(), "dh": h.grad, "dw": wt.grad, **stats}, oracle(weighted), torch.float32)
    uncapped = loss_fn(*case.args(backend="torch" if fn == "tiled" else fn), rollout_logp=rollout)[0]
    torch.testing.assert_close(uncapped.double(), oracle(case)["loss"], rtol=1e-5, atol=1e-7)


def test_masked_rows_cost_nothing_and_ignored_rows_report_zero():
    case = make_case(301, 48, 16, 97, torch.float32, masked_frac=0.4, ignore_frac=0.25)
    out = run_loss(engine_loss(ENGINES["tiled"]), case)
    compare(out, oracle(case), torch.float32)
    zero_rows = (case.w == 0) | (case.targets == -100)
    assert zero_rows.any() and not zero_rows.all()
    assert (out["dh"][zero_rows] == 0).all()
    live = ~zero_rows & ~out["clipped"]
    assert live.any() and (out["dh"][live] != 0).any(dim=1).all()
    ignored = case.targets == -100
    assert (out["logp"][ignored] == 0).all() and (out["entropy"][ignored] == 0).all()
    assert not out["clipped"][ignored].any()


@pytest.mark.parametrize("what", ["w-zero", "all-ignored"])
def test_all_masked_batch_is_zero_with_zero_grads(what):
    case = make_case(302, 20, 12, 70, torch.float32)
    if what == "w-zero":
        case.w = torch.zeros_like(case.w)
    else:
        case.targets = torch.full_like(case.targets, -100)
    ref = oracle(case)
    for fn in (engine_loss(ENGINES["tiled"]), fused_policy_loss):
        out = run_loss(fn, case)
        assert out["loss"].item() == 0.0
        assert (out["dh"] == 0).all() and (out["dw"] == 0).all()
        compare(out, ref, torch.float32)  # logp / entropy / clip flags still reported


def test_backward_scales_by_upstream_gradient_and_runs_once():
    case = make_case(401, 30, 16, 80, torch.float32, dual_clip=3.0)
    ref = oracle(case)
    h = case.hidden.clone().requires_grad_()
    wt = case.lm_weight.clone().requires_grad_()
    loss, _ = fused_policy_loss(*case.args(h, wt, backend="torch"))
    (-2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, -2.5 * ref["dh"].float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(wt.grad, -2.5 * ref["dw"].float(), rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_gradients_only_where_required():
    case = make_case(402, 30, 16, 80, torch.float32)
    ref = oracle(case)
    h = case.hidden.clone().requires_grad_()
    loss, stats = fused_policy_loss(*case.args(h, backend="torch"))
    loss.backward()
    assert case.lm_weight.grad is None
    torch.testing.assert_close(h.grad, ref["dh"].float(), rtol=1e-4, atol=1e-7)

    class StatsOnly(TorchTiles):
        def grads(self, *args, **kwargs):
            raise AssertionError("gradient pass under no_grad")

    leaf = case.lm_weight.clone().requires_grad_()
    with torch.no_grad():
        loss, _ = engine_loss(StatsOnly())(*case.args(lm_weight=leaf))
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "tiled", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_logprobs_grad_matches_oracle(backend, dtype):
    """``fused_logprobs_grad``: logp, entropy and the gradients of ``sum_t c_t logp_t`` (c_t
    random, some 0, some targets ignored) against float64 autograd through the logits."""
    case = make_case(601, 45, 24, 150, dtype, temperature=0.8)
    c = torch.randn(45, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * (case.w != 0)
    h_ref = case.hidden.detach().double().requires_grad_()
    w_ref = case.lm_weight.detach().double().requires_grad_()
    spec = case.spec.replace(backend="torch" if backend == "tiled" else backend)
    logp_ref, ent_ref = logprobs_reference(h_ref, w_ref, case.targets, spec)
    (logp_ref * c).sum().backward()
    h = case.hidden.clone().requires_grad_()
    wt = case.lm_weight.clone().requires_grad_()
    if backend == "tiled":
        from visurf_kernels import function

        logp, ent = function.logprobs_grad(ENGINES["tiled"], h, wt, case.targets, spec)
    else:
        logp, ent = fused_logprobs_grad(h, wt, case.targets, spec)
    assert logp.dtype == torch.float32 and not ent.requires_grad
    (logp * c.to(logp.dtype)).sum().backward()
    torch.testing.assert_close(logp.double(), logp_ref.detach(), rtol=0, atol=1e-5)  # logp is float32
    torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=0, atol=1e-5)
    for got, ref in ((h.grad, h_ref.grad), (wt.grad, w_ref.grad)):
        assert got.dtype == dtype and (got.double() - ref).norm() <= 1e-5 * ref.norm()


def test_module_wrapper():
    case = make_case(501, 26, 16, 64, torch.float32, dual_clip=3.0, logprob_frac=0.3)
    module = FusedPolicyLoss(case.spec.replace(backend="torch"))
    assert "dual_clip=3.0" in repr(module) and not list(module.parameters())
    h = case.hidden.clone().requires_grad_()
    wt = case.lm_weight.clone().requires_grad_()
    loss, stats = module(*case.inputs(h, wt), objective=case.objective)
    loss.backward()
    compare({"loss": loss.detach(), "dh": h.grad, "dw": wt.grad, **stats}, oracle(case), torch.float32)


def test_dispatch():
    assert BACKENDS == ("auto", "triton", "torch", "reference")
    case = make_case(601, 8, 8, 16, torch.float32)
    assert resolve_backend("auto", case.hidden) == "torch"
    assert resolve_backend("triton", case.hidden) == "triton"
    with pytest.raises(ValueError, match="unknown loss backend"):
        resolve_backend("cuda", case.hidden)
    with pytest.raises(ValueError, match="vocab-parallel"):
        resolve_backend("reference", case.hidden, tp_group=object())
    with pytest.raises(TypeError, match="share a dtype"):
        fused_policy_loss(case.hidden.double(), *case.inputs()[1:], LossSpec(backend="torch"))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_value_and_gradient_float64(estimator):
    """Each estimator of KL(pi || pi_ref) at the sampled token against its formula and its
    analytic gradient in logp (float64: 1e-12), on fresh random log-probs."""
    g = torch.Generator().manual_seed(700)
    logp = (-torch.rand(257, generator=g, dtype=torch.float64) * 8).requires_grad_()
    ref = logp.detach() + torch.randn(257, generator=g, dtype=torch.float64)
    d = ref - logp.detach()
    value = {"k1": -d, "k2": d.square() / 2, "k3": d.exp() - d - 1}[estimator]
    grad = {"k1": torch.ones_like(d), "k2": -d, "k3": 1 - d.exp()}[estimator]
    kl = kl_penalty(logp, ref, estimator)
    torch.testing.assert_close(kl.detach(), value, rtol=1e-12, atol=1e-12)
    (g_logp,) = torch.autograd.grad(kl.sum(), logp)
    torch.testing.assert_close(g_logp, grad, rtol=1e-12, atol=1e-12)
    if estimator == "k3":
        assert (kl >= 0).all()


def test_kl_coef_zero_is_bit_identical_and_kl_needs_a_reference():
    case = make_case(701, 37, 16, 150, torch.float32, dual_clip=3.0, logprob_frac=0.2)
    plain = run_loss(fused_policy_loss, case, backend="torch")
    with_ref = fused_policy_loss(*case.args(backend="torch"), ref_logp=torch.randn(37))  # kl_coef 0: ignored
    assert torch.equal(with_ref[0], plain["loss"])
    with pytest.raises(ValueError, match="ref_logp"):
        fused_policy_loss(*case.args(backend="torch", kl_coef=0.1))
    with pytest.raises(ValueError, match="kl_estimator"):
        LossSpec(kl_estimator="k4")


def _closed_form(name: str, logp, old, adv, spec: LossSpec):
    """Each objective's ``obj_t`` and ``d obj_t / d logp_t``, written out (``reference`` docstring)."""
    p, rho = torch.exp(logp), torch.exp(logp - old)
    if name == "ppo":
        lo, hi = 1 - spec.eps_low, 1 + spec.eps_high
        clipped = torch.where(adv >= 0, rho > hi, rho < lo)
        return torch.where(clipped, rho.clamp(lo, hi) * adv, rho * adv), torch.where(clipped, 0.0, rho * adv)
    g = spec.shaping_gamma
    return {
        "logprob": (adv * logp, adv),
        "shaped": (adv * p / (p + g), adv * g * p / (p + g) ** 2),
        "dft": (adv * p * logp, adv * p),
        "phi": (adv * p * (1 - p) * logp, adv * p * (1 - p)),
    }[name]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_against_its_closed_form(name):
    """Value and gradient of every per-token objective on random float64 log-probs (from ~0 to
    -40: probabilities from ~1 to ~4e-18) against the formulas, for every token given that code."""
    g = torch.Generator().manual_seed(7 + OBJECTIVES.index(name))
    n = 57
    logp = -(torch.rand(n, generator=g, dtype=torch.float64) ** 3) * 40
    old = logp - (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)  # ratios in [0.6, 1.65]: clipped and not
    adv, w = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    spec = LossSpec(eps_low=0.2, eps_high=0.28, shaping_gamma=0.17)
    lp = logp.clone().requires_grad_()
    codes = torch.full((n,), OBJECTIVES.index(name))
    loss, loss_t, clipped = policy_loss_from_logp(lp, old, adv, w, spec, codes)
    (grad,) = torch.autograd.grad(loss, lp)
    obj, dobj = _closed_form(name, logp, old, adv, spec)
    torch.testing.assert_close(loss_t, -obj, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss, (w * -obj).sum(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, -w * dobj, rtol=1e-12, atol=1e-15)
    assert clipped.any() == (name == "ppo")  # only the surrogate clips (and these ratios reach its clip)


def test_a_bool_objective_is_the_logprob_mask():
    g = torch.Generator().manual_seed(3)
    logp, adv, w = -torch.rand(20, generator=g).double() * 5, torch.randn(20, generator=g).double(), torch.rand(20).double()
    mask = torch.rand(20, generator=g) < 0.5
    a = policy_loss_from_logp(logp, logp, adv, w, LossSpec(), mask)
    b = policy_loss_from_logp(logp, logp, adv, w, LossSpec(), mask.long())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=r"objective must be \[N\] = \[20\]"):
        policy_loss_from_logp(logp, logp, adv, w, LossSpec(), mask[:5])
