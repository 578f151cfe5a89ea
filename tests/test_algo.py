"""Advantages, reward controls, surrogate and aggregation: hand-computed cases, plus a
float64 gradient check of the eager loss. Tolerances: float64 results to 1e-12; float32
results to 1e-6 (relative)."""

from __future__ import annotations

import math

import pytest
import torch

from visurf_kernels import LossSpec, policy_loss_from_logp
from visurf_kernels.reference import fused_policy_loss_reference, logprobs_reference

from visurf_engine.algo.advantages import group_advantages
from visurf_engine.algo.gold import choose_styles, control_gold_rewards
from visurf_engine.algo.members import build_members, sequence_weights
from visurf_engine.algo.mismatch import mismatch_sums
from visurf_engine.algo.paradigms import PARADIGMS, RLVR, SFT, VISURF, GroupRewards, get_paradigm
from visurf_engine.rewards import GroundingReward, get_reward, score_batch

G = get_reward("grounding")
W = torch.tensor([G.weights[c] for c in G.components])  # think, answer_format, accuracy (x3), non_repeat
THINK = G.components.index("think_format")


def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]]), eps=0.0)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]))
    # [0, 0, 4]: mean 4/3, unbiased std sqrt(((4/3)^2 * 2 + (8/3)^2) / 2) = sqrt(16/3)
    s = math.sqrt(16 / 3)
    assert torch.allclose(adv[1], torch.tensor([-4 / 3 / s, -4 / 3 / s, 8 / 3 / s]), rtol=1e-6)
    dr = group_advantages(torch.tensor([[1.0, 2.0, 6.0]]), norm_by_std=False)
    assert torch.allclose(dr, torch.tensor([[-2.0, -1.0, 3.0]]))


def test_all_equal_group_gives_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: the flat-group guard must still give exact zeros
    adv = group_advantages(torch.tensor([[0.1, 0.1, 0.1], [5.0, 5.0, 5.0]]))
    assert (adv == 0).all()
    with pytest.raises(ValueError, match="members>=2"):
        group_advantages(torch.tensor([[1.0]]))


class FixedComponents(GroundingReward):
    """Grounding weights (1, 1, 3, 1); a completion's components are looked up by its text."""

    name = "fixed_components"
    TABLE = {"a": (1.0, 1.0, 1 / 9, 0.0), "b": (0.0, 0.0, 4 / 9, 1.0)}  # both total 7/3

    def score(self, completion, solution):
        return dict(zip(self.components, self.TABLE[completion]))


def test_equal_totals_from_different_components_are_exact_ties():
    spec = FixedComponents()
    texts = ["a", "b", "a", "b"]
    sb = score_batch(spec, texts, [[]] * 4, ["x"] * 4)
    assert sb.total.unique().numel() == 1 and sb.total[0].item() == pytest.approx(7 / 3, abs=1e-9)
    assert (group_advantages(sb.total.view(1, 4)) == 0).all()  # float32 sums gave +-0.102 here
    assert spec.total(dict(zip(spec.components, spec.TABLE["b"]))) == sb.total[0].item()
    # the gold scored "b" ties the best rollout "a": smoothed, and the augmented group is flat
    rollouts = score_batch(spec, ["a"] * 3, [[]] * 3, ["x"] * 3).total.view(1, 3)
    gold_comps = score_batch(spec, ["b"], [[]], ["x"]).components
    gold, smoothed = control_gold_rewards(gold_comps, rollouts, spec.weight_vector(), None, eliminate=False, smooth=True)
    assert smoothed.item() and gold.item() == rollouts[0, 0].item()
    r_adv, g_adv = VISURF.advantages(GroupRewards(1, rollouts, gold, smoothed), norm_by_std=True, eps=1e-6)
    assert (r_adv == 0).all() and g_adv.item() == 0


def test_eliminate_and_smooth_controls():
    gold_comps = torch.tensor([[1.0, 1.0, 1.0, 1.0]] * 3)  # a perfect gold answer, as scored on its text
    rollouts = torch.tensor([[2.0, 2.0, 3.0, 3.0],  # all worse than the gold: no smoothing
                             [6.0, 1.0, 1.0, 1.0],  # best rollout (6) >= gold (5): smoothed to mean 2.25
                             [5.0, 5.0, 5.0, 5.0]])  # ties count as "at least as good"
    gold, smoothed = control_gold_rewards(gold_comps, rollouts, W, THINK, eliminate=True, smooth=True)
    assert gold.tolist() == [5.0, 2.25, 5.0]
    assert smoothed.tolist() == [False, True, True]
    gold_no_elim, _ = control_gold_rewards(gold_comps, rollouts, W, THINK, eliminate=False, smooth=False)
    assert gold_no_elim.tolist() == [6.0, 6.0, 6.0]  # keeps the thinking-format reward it scored
    no_think = gold_comps.clone()
    no_think[:, THINK] = 0.0  # a gold that fails the format check is not credited either way
    assert control_gold_rewards(no_think, rollouts, W, THINK, eliminate=False, smooth=False)[0].tolist() == [5.0] * 3
    gold_no_smooth, flags = control_gold_rewards(gold_comps, rollouts, W, THINK, eliminate=True, smooth=False)
    assert gold_no_smooth.tolist() == [5.0, 5.0, 5.0] and not flags.any()


def test_smoothed_gold_advantage_is_exactly_zero_and_rollouts_unchanged():
    rollouts = torch.tensor([[0.3, 0.7, 0.1, 0.9]])
    gold, smoothed = control_gold_rewards(torch.tensor([[0.0, 0.1, 0.1, 0.0]]), rollouts, W, THINK, eliminate=True, smooth=True)
    assert smoothed.item()
    r_adv, g_adv = VISURF.advantages(GroupRewards(1, rollouts, gold, smoothed), norm_by_std=True, eps=1e-6)
    assert g_adv.item() == 0.0
    # with r* = mean, the G+1 mean is the rollout mean and the unbiased std shrinks by sqrt((G-1)/G)
    r = rollouts.double()[0]
    expected = (r - r.mean()) / (r.std() * math.sqrt(3 / 4) + 1e-6)
    assert torch.allclose(r_adv[0].double(), expected, rtol=1e-6)


def test_visurf_gold_advantage_positive_when_rollouts_fail():
    rollouts = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    gold = torch.tensor([5.0])
    r_adv, g_adv = VISURF.advantages(GroupRewards(1, rollouts, gold, torch.tensor([False])), norm_by_std=True, eps=0.0)
    # group [3,3,3,3,5]: mean 3.4, unbiased std sqrt(0.8)
    assert math.isclose(g_adv.item(), 1.6 / math.sqrt(0.8), rel_tol=1e-6)
    assert torch.allclose(r_adv, torch.full((1, 4), -0.4 / math.sqrt(0.8)))


def test_rlvr_and_sft_advantages():
    r_adv, g_adv = RLVR.advantages(GroupRewards(2, torch.tensor([[0.0, 1.0], [1.0, 1.0]])), norm_by_std=False, eps=0.0)
    assert g_adv is None and r_adv.tolist() == [[-0.5, 0.5], [0.0, 0.0]]
    r_adv, g_adv = SFT.advantages(GroupRewards(3), norm_by_std=True, eps=1e-6)
    assert r_adv is None and g_adv.tolist() == [1.0, 1.0, 1.0]


def phase_of(paradigm, step, sft_steps):
    return get_paradigm(paradigm).phase(step, sft_steps).name


def test_phase_of_paradigms():
    assert set(PARADIGMS) == {"sft", "rlvr", "visurf", "sft_then_rlvr", "luffy", "chord", "dft", "hpt"}
    assert [phase_of("sft_then_rlvr", s, 2) for s in range(4)] == ["sft", "sft", "rlvr", "rlvr"]
    assert phase_of("visurf", 0, 2) == "visurf" and phase_of("rlvr", 9, 2) == "rlvr" and phase_of("sft", 9, 2) == "sft"
    with pytest.raises(ValueError, match="unknown paradigm"):
        get_paradigm("ppo")


def test_build_members_orders_groups_and_flags_gold():
    members = build_members([[[1], [2, 3]], [[4], [5]]], torch.tensor([[0.5, -0.5], [0.0, 0.0]]),
                            [[9, 9], [8]], torch.tensor([1.5, 0.0]), gold_objective=1)
    assert list(zip(members.prompt.tolist(), members.tokens, members.adv.tolist(), members.gold.tolist(),
                    members.objective.tolist())) == [
        (0, [1], 0.5, False, 0), (0, [2, 3], -0.5, False, 0), (0, [9, 9], 1.5, True, 1),
        (1, [4], 0.0, False, 0), (1, [5], 0.0, False, 0), (1, [8], 0.0, True, 1)]
    kept = build_members([[[1], [2, 3]], [[4], [5]]], torch.tensor([[0.5, -0.5], [0.0, 0.0]]), [[9, 9], [8]],
                         torch.tensor([1.5, 0.0]), gold_objective=3, gold_part=1,
                         keep_rollouts=torch.tensor([True, False]), keep_gold=torch.tensor([False, True]))  # fmt: skip
    assert kept.tokens == [[1], [2, 3], [8]] and kept.prompt.tolist() == [0, 0, 1] and kept.part.tolist() == [0, 0, 1]
    assert kept.objective.tolist() == [0, 0, 3] and kept.adv.tolist() == [0.5, -0.5, 0.0]


def test_members_carry_rollout_logprobs_nan_for_the_gold():
    lp = [[torch.tensor([-0.1]), torch.tensor([-0.2, -0.3])], [torch.tensor([-0.4]), torch.tensor([-0.5])]]
    members = build_members([[[1], [2, 3]], [[4], [5]]], torch.zeros(2, 2), [[9, 9], [8]], torch.zeros(2),
                            rollout_logp=lp)  # fmt: skip
    flat = torch.cat(members.rollout_logp)
    assert torch.isnan(flat).tolist() == [False, False, False, True, True, False, False, True]
    assert flat[~torch.isnan(flat)].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
    part = members.select([4, 2])
    assert part.tokens == [[5], [9, 9]] and part.rollout_logp[0].tolist() == pytest.approx([-0.5])
    assert torch.isnan(part.rollout_logp[1]).all() and part.old_logp is None
    no_logp = build_members([[[1]]], torch.zeros(1, 1), [[9]], torch.zeros(1))
    assert no_logp.rollout_logp is None and no_logp.select([1]).rollout_logp is None


def test_tis_weights_hand_computed_and_gold_ratio_one():
    """On-policy (rho = 1) the loss is ``-sum_t w_t min(pi_old / pi_rollout, C) A_t``; a NaN rollout
    log-prob (the gold) weighs 1; without ``tis_cap`` the rollout log-probs change nothing."""
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    rollout = torch.log(torch.tensor([0.25, 0.5, 1.0, float("nan")], dtype=torch.float64))  # ratios 2, 1, 0.5, gold
    adv = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    w = torch.full((4,), 0.25, dtype=torch.float64)
    loss, _, _ = policy_loss_from_logp(logp, logp, adv, w, LossSpec(tis_cap=1.5), rollout_logp=rollout)
    assert math.isclose(loss.item(), -0.25 * (1.5 * 1.0 + 1.0 * -2.0 + 0.5 * 3.0 + 1.0 * 4.0), rel_tol=1e-15)
    plain, _, _ = policy_loss_from_logp(logp, logp, adv, w, LossSpec(), rollout_logp=rollout)
    assert math.isclose(plain.item(), -0.25 * adv.sum().item(), rel_tol=1e-15)


def test_mismatch_sums_hand_computed():
    trainer = torch.log(torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    rollout = torch.log(torch.tensor([0.25, 1.0, float("nan")], dtype=torch.float64))  # d = -log 2, log 2, (gold)
    out = mismatch_sums(trainer, rollout, cap=1.5)
    k3 = [2 - 1 - math.log(2), 0.5 - 1 + math.log(2)]  # r - 1 + d with r = exp(-d)
    assert out["tokens"] == 2 and math.isclose(out["abs"], 2 * math.log(2), rel_tol=1e-12)
    assert math.isclose(out["kl"], sum(k3), rel_tol=1e-12) and min(k3) > 0 and out["truncated"] == 1
    assert "truncated" not in mismatch_sums(trainer, rollout) and mismatch_sums(trainer, trainer)["kl"] == 0


def test_sequence_weights_three_aggregations():
    lengths = torch.tensor([2, 4])
    tm = sequence_weights(lengths, "token-mean", num_seqs=4, num_tokens=10, max_len=8)
    assert torch.allclose(tm, torch.tensor([0.1, 0.1]))
    sm = sequence_weights(lengths, "seq-mean-token-mean", num_seqs=4, num_tokens=10, max_len=8)
    assert torch.allclose(sm, torch.tensor([1 / 8, 1 / 16]))
    dr = sequence_weights(lengths, "seq-mean-token-sum-norm", num_seqs=4, num_tokens=10, max_len=8)
    assert torch.allclose(dr, torch.tensor([1 / 32, 1 / 32]))


def test_surrogate_hand_computed_clip_and_dual_clip():
    old = torch.zeros(5, dtype=torch.float64)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 5.0, 5.0], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0, -1.0], dtype=torch.float64)
    w = torch.ones(5, dtype=torch.float64)
    _, loss_t, clipped = policy_loss_from_logp(logp, old, adv, w, LossSpec(eps_low=0.2, eps_high=0.2))
    # ratio 1.5, A=1 -> 1.2 (clipped); ratio .5, A=-1 -> min(-.5, -.8) = -.8 (clipped);
    # ratio 1.1, A=2 -> 2.2 (inside); ratio 5, A=-1 -> min(-5, -1.2) = -5 (not clipped)
    assert torch.allclose(-loss_t, torch.tensor([1.2, -0.8, 2.2, -5.0, -5.0], dtype=torch.float64))
    assert clipped.tolist() == [True, True, False, False, False]
    _, loss_t, clipped = policy_loss_from_logp(logp, old, adv, w, LossSpec(eps_low=0.2, eps_high=0.2, dual_clip=3.0))
    assert torch.allclose(-loss_t[3:], torch.tensor([-3.0, -3.0], dtype=torch.float64))  # max(-5, 3 * -1)
    assert clipped.tolist() == [True, True, False, True, True]
    lp_mask = torch.tensor([True, False, False, False, False])
    _, loss_t, clipped = policy_loss_from_logp(logp, old, adv, w, LossSpec(eps_low=0.2, eps_high=0.2), lp_mask)
    assert math.isclose(loss_t[0].item(), -math.log(1.5)) and not clipped[0]  # -A * logp, no clip


def test_eager_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1234)
    n, h, v = 7, 5, 11
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(v, (n,), generator=g)
    targets[2] = -100  # ignored row
    old = torch.randn(n, dtype=torch.float64, generator=g) * 0.1 - 2.0
    adv = torch.randn(n, dtype=torch.float64, generator=g)
    w = torch.rand(n, dtype=torch.float64, generator=g)
    mask = torch.tensor([False, True, False, False, True, False, False])

    def f(hh, ww):
        return fused_policy_loss_reference(hh, ww, targets, old, adv, w, spec, mask)[0]

    spec = LossSpec(temperature=0.7, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-8)
    # on-policy (old_logp=None): ratio 1, gradient = -sum_t w_t A_t grad logp_t
    spec = LossSpec(temperature=0.7)
    loss, stats = fused_policy_loss_reference(hidden, weight, targets, None, adv, w, spec)
    loss.backward()
    grad_ppo = hidden.grad.clone()
    hidden.grad = None
    valid = targets != -100
    logp = fused_policy_loss_reference(hidden, weight, targets, None, adv, w, spec)[1]["logp"]
    assert math.isclose(loss.item(), -(w * adv)[valid].sum().item(), rel_tol=1e-12)
    lp, _ = logprobs_reference(hidden, weight, targets, spec)
    (-(w * adv * lp).sum()).backward()
    assert torch.allclose(grad_ppo, hidden.grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(logp, lp.detach())


def test_choose_style_align_controls():
    spaced = '<think>x</think><answer>[{"bbox_2d": [4, 4, 24, 24]}]</answer>'
    compact = '<answer>[{"bbox_2d":[4,4,24,24]}]</answer>'
    sol = [{"bbox_2d": [32, 4, 52, 24]}]
    cands = {s: G.render(sol, s) for s in G.styles}
    calls = []

    def loglik(groups, texts):
        calls.append((groups, texts))
        return [0.0 if t == cands["spaced"] else -5.0 for t in texts]

    def choose_style(spec, rollout_texts, candidates, **kw):  # one group
        return choose_styles(spec, [rollout_texts], [candidates], **kw)[0]

    kw = dict(align_style="auto", loglik=loglik)
    assert choose_style(G, [spaced, spaced, compact], cands, align=True, **kw) == "spaced"
    assert choose_style(G, [spaced, compact, compact], cands, align=True, **kw) == "compact"
    assert not calls
    assert choose_style(G, ["garbage", "<answer>[]</answer>"], cands, align=True, **kw) == "spaced"  # loglik fallback
    assert calls == [([0, 0], [cands["compact"], cands["spaced"]])]
    assert choose_style(G, [spaced], cands, align=False, **kw) == "compact"  # dataset style
    assert choose_style(G, [compact], cands, align=True, align_style="spaced", loglik=None) == "spaced"
    with pytest.raises(ValueError, match="align_style"):
        choose_style(G, [], cands, align=True, align_style="pretty", loglik=None)


def test_trainer_align_fallback_ranks_renderings_by_mean_token_loglik():
    """Rollouts in no recognisable style: ``Trainer._gold``'s ``loglik`` ranks the candidate
    renderings by their mean per-token log-prob (``algo.gold.LogLik``). The stub policy writes
    spaced JSON: its spaces are likely tokens (-0.1), every other character costs -1 in both
    renderings. The spaced rendering is longer, so its sum is the lower one: a sum would pick
    the compact rendering only because it is shorter."""
    from types import SimpleNamespace

    from visurf_engine.config import load_config
    from visurf_engine.trainer import Trainer

    def logp(token: int) -> float:
        return -0.1 if token == ord(" ") else -1.0

    class Policy:  # one token per character
        def encode_text(self, text):
            return [ord(c) for c in text]

    class Rollout:  # the engine that scores the renderings (rank-local)
        def logprobs(self, prompts, idx, tokens):
            return [torch.tensor([logp(t) for t in seq]) for seq in tokens]

    sol = [{"bbox_2d": [32, 4, 52, 24]}]
    per_token = {s: [logp(ord(c)) for c in G.render(sol, s)] for s in G.styles}
    spaced, compact = per_token["spaced"], per_token["compact"]
    assert len(spaced) > len(compact) and sum(spaced) < sum(compact)  # the sum ranks compact first
    assert sum(spaced) / len(spaced) > sum(compact) / len(compact)  # the likelier per token: spaced
    trainer = Trainer.__new__(Trainer)  # only what _gold reads
    trainer.cfg, trainer.spec, trainer.policy, trainer.rollout = load_config(), G, Policy(), Rollout()
    tokens, _, m, _ = trainer._gold(SimpleNamespace(scored_gold=False, controls=True), [SimpleNamespace(solution=sol, id="r")],
                                    None, [["garbage", "<answer>?</answer>"]], GroupRewards(1))  # fmt: skip
    assert ["".join(map(chr, t)) for t in tokens] == [G.render(sol, "spaced")] and m["gold/aligned_share"] == 1.0


def test_choose_styles_scores_every_unrecognised_group_in_one_call():
    spaced = '<think>x</think><answer>[{"bbox_2d": [4, 4, 24, 24]}]</answer>'
    sols = [[{"bbox_2d": [32, 4, 52, 24]}], [], [{"bbox_2d": [4, 32, 24, 52]}]]
    cands = [{s: G.render(sol, s) for s in G.styles} for sol in sols]
    calls = []

    def loglik(groups, texts):  # group 0 prefers compact, group 2 spaced
        calls.append(groups)
        return [float((g == 0) == ("[{\"bbox_2d\":[" in t)) for g, t in zip(groups, texts)]

    styles = choose_styles(G, [["garbage"], [spaced], ["<answer>[]</answer>"]], cands, align=True, align_style="auto",
                           loglik=loglik)
    assert styles == ["compact", "spaced", "spaced"] and calls == [[0, 0, 2, 2]]


def test_luffy_normalises_over_the_mixed_group_without_reward_controls_and_shapes_the_gold():
    from visurf_engine.algo.paradigms import LUFFY

    r = GroupRewards(2, rollout=torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]]), gold=torch.tensor([3.0, 2.0]))
    adv_r, adv_g = LUFFY.advantages(r, norm_by_std=True, eps=0.0)
    group = torch.tensor([1.0, 0.0, 0.0, 3.0])  # prompt 0: three rollouts and the gold, one group
    want = (group - group.mean()) / group.std()
    assert torch.allclose(adv_r[0], want[:3]) and math.isclose(adv_g[0].item(), want[3].item(), rel_tol=1e-6)
    assert adv_r[1].tolist() == [0.0, 0.0, 0.0] and adv_g[1].item() == 0.0  # a flat group: all zero
    assert not LUFFY.controls and LUFFY.gold_objective_of({"gold_loss": "ppo"}) == "shaped"


def test_chord_mu_schedule_and_separately_normalised_parts():
    from visurf_engine.algo.members import member_weights, part_counts
    from visurf_engine.algo.paradigms import CHORD

    knobs = {"chord_mu": (0.9, 0.1, 4), "chord_phi": False}
    assert [round(CHORD.scales(s, knobs)[1], 6) for s in (0, 2, 4, 9)] == [0.9, 0.5, 0.1, 0.1]
    assert CHORD.scales(2, knobs)[0] == pytest.approx(0.5)
    assert CHORD.gold_objective_of(knobs) == "logprob" and CHORD.gold_objective_of(knobs | {"chord_phi": True}) == "phi"
    r = GroupRewards(1, rollout=torch.tensor([[1.0, 0.0]]))
    adv_r, adv_g = CHORD.advantages(r, norm_by_std=False, eps=0.0)
    assert adv_r.tolist() == [[0.5, -0.5]] and adv_g.tolist() == [1.0]  # GRPO over the rollouts; SFT on the gold
    members = CHORD.members(knobs, r, [[[1, 2, 3], [4]]], adv_r, [[7, 8]], adv_g)
    assert members.part.tolist() == [0, 0, 1] and members.objective.tolist() == [0, 0, 1]
    w = member_weights(members, "token-mean", part_counts(members, 2), (0.5, 0.5), max_len=8)
    # L = 0.5 * mean over the 4 rollout tokens + 0.5 * mean over the 2 gold tokens
    assert w.tolist() == pytest.approx([0.5 / 4, 0.5 / 4, 0.5 / 2])


def test_hpt_switches_at_the_threshold():
    from visurf_engine.algo.paradigms import HPT

    solved = torch.tensor([[True, False, False, False], [False, False, False, False], [True, True, False, False]])
    r = GroupRewards(3, rollout=torch.rand(3, 4), solved=solved)
    for threshold, rl in ((0.0, [True, False, True]), (0.25, [False, False, True]), (0.5, [False, False, False])):
        keep_r, keep_g = HPT.select(r, {"hpt_threshold": threshold})
        assert keep_r.tolist() == rl and keep_g.tolist() == [not x for x in rl]
    adv_r, adv_g = HPT.advantages(r, norm_by_std=True, eps=1e-6)
    members = HPT.members({"hpt_threshold": 0.0, "gold_loss": "ppo"}, r, [[[1]] * 4] * 3, adv_r, [[7], [8], [9]], adv_g)
    assert members.prompt.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2] and members.gold.tolist() == [False] * 4 + [True] + [False] * 4
    assert members.objective.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0] and members.adv[4].item() == 1.0


def test_dft_and_visurf_gold_objectives():
    from visurf_engine.algo.paradigms import DFT, VISURF

    assert DFT.gold_objective_of({"gold_loss": "ppo"}) == "dft" and not DFT.rollouts
    assert VISURF.gold_objective_of({"gold_loss": "dft"}) == "dft" and VISURF.gold_objective_of({"gold_loss": "ppo"}) == "ppo"
