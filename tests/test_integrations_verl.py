"""verl's ``visurf`` policy loss and advantage estimator, and the gold injection, on the real verl (0.9.1).

- the policy loss (called as verl's ``ppo_loss`` calls it) equals our ``algo`` weights through
  ``policy_loss_from_logp`` and verl's own ``vanilla`` loss, loss and gradient, for each
  aggregation mode, with dual-clip, with rollout-correction weights, on one rank and with
  data-parallel global counts;
- the estimator, through verl's ``compute_advantage``, equals ``algo``'s GRPO over each
  shuffled ``uid`` group;
- ``ViSurfRolloutManager`` around a stand-in rollout manager (whose gold rows run the real
  ``visurf_gold`` agent loop) returns groups of G + 1 per ``uid``: the aligned gold last,
  eliminated and smoothed, with the advantages of ``algo.paradigms.mixed_group_advantages``.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from engine_testing.integrations import require, shapes_rows, tiny_text_lm

require("verl.trainer.ppo.core_algos")

from omegaconf import OmegaConf  # noqa: E402
from verl.experimental.agent_loop.agent_loop import DictConfigWrap  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from visurf_kernels import LossSpec, policy_loss_from_logp  # noqa: E402

from visurf_engine.algo.advantages import group_advantages  # noqa: E402
from visurf_engine.algo.gold import control_gold_rewards  # noqa: E402
from visurf_engine.algo.paradigms import GroupRewards, mixed_group_advantages  # noqa: E402
from visurf_engine.integrations import verl as vi  # noqa: E402
from visurf_engine.rewards import get_reward  # noqa: E402

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor(clip_ratio_c=3.0, **global_batch_info) -> ActorConfig:
    c = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                    clip_ratio_high=0.28, clip_ratio_c=clip_ratio_c)  # fmt: skip
    c.global_batch_info.update(global_batch_info)
    return c


def random_batch(seed: int, bs: int = 6, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 1, 5, 0, 6])[:bs]  # one fully masked row: excluded from the sequence count
    mask = (torch.arange(t) < lengths[:, None]).float()
    logp = (-torch.rand(bs, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(bs, t, generator=g)  # ratios far outside the clip range, some past 3
    adv = torch.randn(bs, 1, generator=g).expand(bs, t).clone() * 2
    is_w = torch.rand(bs, t, generator=g) + 0.5
    return logp, old, adv, mask, is_w


def expected_weights(mask: torch.Tensor, mode: str, dp: int, tokens, seqs, horizon) -> torch.Tensor:
    """The aggregation as ``algo`` states it (design §1), written out: ``w[bs, T]``."""
    lengths = mask.sum(-1, keepdim=True)
    if mode == "token-mean":
        w = torch.full_like(lengths, dp / tokens)
    elif mode == "seq-mean-token-mean":
        w = dp / (seqs * lengths.clamp(min=1))
    else:
        w = torch.full_like(lengths, dp / (seqs * horizon))
    return w * mask


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dist", ["one-rank", "dp2-global"])
@pytest.mark.parametrize("is_weights", [False, True], ids=["", "rollout-is"])
def test_policy_loss_matches_algo_and_vanilla(mode, dist, is_weights):
    logp, old, adv, mask, is_w = random_batch(0)
    info = {} if dist == "one-rank" else {"dp_size": 2, "batch_num_tokens": 45, "global_batch_size": 11,
                                          "loss_scale_factor": 9}  # fmt: skip
    config = actor(**info)
    kw = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=mode, config=config,
              rollout_is_weights=is_w if is_weights else None)  # fmt: skip
    ours, metrics = get_policy_loss_fn("visurf")(**kw)
    vanilla, vmetrics = compute_policy_loss_vanilla(**kw)
    dp, tokens = info.get("dp_size", 1), info.get("batch_num_tokens", mask.sum())
    seqs, horizon = info.get("global_batch_size", (mask.sum(-1) > 0).sum()), info.get("loss_scale_factor", mask.shape[-1])
    w = expected_weights(mask, mode, dp, tokens, seqs, horizon) * (is_w if is_weights else 1)
    m = mask.bool()
    algo, _, _ = policy_loss_from_logp(logp[m], old[m], adv[m], w[m], LossSpec(eps_low=0.2, eps_high=0.28, dual_clip=3.0))
    torch.testing.assert_close(ours, algo, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, vanilla, rtol=1e-6, atol=1e-7)  # verl's seq-mean adds 1e-8 to lengths
    torch.testing.assert_close(grad_of(ours, logp), grad_of(vanilla, logp), rtol=1e-5, atol=1e-7)
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/ppo_kl"] == pytest.approx(vmetrics["actor/ppo_kl"], rel=1e-5)


def test_policy_loss_dual_clip_off_and_unsupported_modes():
    logp, _, adv, mask, _ = random_batch(1)
    old = logp.detach() - 2.0  # ratio e^2 > clip_ratio_c = 3
    m = mask.bool()
    ours, _ = vi.visurf_policy_loss(old, logp, adv, mask, "token-mean", actor(clip_ratio_c=None))
    algo, _, _ = policy_loss_from_logp(logp[m], old[m], adv[m], torch.full_like(logp[m], 1 / m.sum()),
                                       LossSpec(eps_low=0.2, eps_high=0.28))  # fmt: skip
    dual, _ = vi.visurf_policy_loss(old, logp, adv, mask, "token-mean", actor())
    torch.testing.assert_close(ours, algo)
    assert not torch.isclose(ours, dual)  # the dual clip binds on this batch
    with pytest.raises(ValueError, match="token-sum"):
        vi.visurf_policy_loss(old, logp, adv, mask, "token-sum", actor())


def uid_batch(scores: torch.Tensor, seed: int):
    """Groups ``scores[B, M]`` as a shuffled verl batch: ``(DataProto, permutation)``."""
    b, m = scores.shape
    perm = torch.randperm(b * m, generator=torch.Generator().manual_seed(seed))
    t = 5
    lengths = torch.randint(1, t + 1, (b * m,), generator=torch.Generator().manual_seed(seed + 1))
    mask = (torch.arange(t) < lengths[:, None]).float()
    rewards = torch.zeros(b * m, t)
    rewards[torch.arange(b * m), lengths - 1] = scores.flatten()[perm]
    uid = np.array([f"u{int(i) // m}" for i in perm], dtype=object)
    data = DataProto.from_single_dict({"token_level_rewards": rewards, "response_mask": mask, "uid": uid})
    return data, perm


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_advantage_estimator_matches_algo(norm_by_std):
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (5, 4), generator=g).float()
    scores[0] = 2.0  # an all-equal group: exactly zero
    data, perm = uid_batch(scores, seed=3)
    out = compute_advantage(data, "visurf", norm_adv_by_std_in_grpo=norm_by_std,
                            config=AlgoConfig(norm_adv_by_std_in_grpo=norm_by_std))  # fmt: skip
    adv = out.batch["advantages"]
    assert torch.equal(adv, adv[:, :1] * data.batch["response_mask"])
    ours = group_advantages(scores, norm_by_std=norm_by_std).flatten()[perm]
    torch.testing.assert_close(adv[:, 0], ours, rtol=1e-6, atol=1e-7)
    grpo = compute_advantage(data, "grpo", norm_adv_by_std_in_grpo=norm_by_std).batch["advantages"][:, 0]
    torch.testing.assert_close(adv[:, 0], grpo, rtol=1e-5, atol=1e-6)  # verl's GRPO: the same formula in float32


# -- the gold injection -----------------------------------------------------------------------

G, N = 3, 4  # rollouts per prompt, rollout.n = G + 1
RESPONSE_LENGTH = 48


class StandInManager:
    """The rollout manager's contract (``generate_sequences``: one output row per input row,
    verl's tensors, rewards from the reward function in ``rm_scores``, ``meta_info["timing"]``).
    Rollout rows answer in the grounding reward's ``spaced`` style with a think trace, one right
    in even groups (which then match the gold: smoothed) and the rest wrong or cut off; gold
    rows run the real ``visurf_gold`` agent loop."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []
        cfg = OmegaConf.create({"actor_rollout_ref": {"rollout": {"prompt_length": 128, "response_length": RESPONSE_LENGTH}}})
        self.gold_loop = vi.GoldAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=None, tokenizer=tokenizer,
                                          processor=None, dataset_cls=RLHFDataset,
                                          data_config=DictConfigWrap(OmegaConf.create({})))  # fmt: skip

    def response(self, i: int, row: dict) -> list[int]:
        if row.get("agent_name") == vi.GOLD_AGENT:
            out = self.gold_loop.loop.run_until_complete(self.gold_loop.run({}, **row))
            return out.response_ids
        spec = get_reward("grounding")
        solution = spec.parse_solution(row["reward_model"]["ground_truth"])
        answer = solution if (i // G) % 2 == 0 and i % G == 1 else [{"bbox_2d": [0, 0, 1, 1]}]  # right in groups 0, 2
        text = "<think>look</think>" + spec.answer(answer, "spaced")[: None if i % 3 else -2]
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        self.calls.append(len(prompts))
        nt = prompts.non_tensor_batch
        nt.setdefault("agent_name", np.array(["single_turn_agent"] * len(prompts), dtype=object))  # as verl's worker does
        rows = [{k: v[i] for k, v in nt.items()} for i in range(len(prompts))]
        responses = [self.response(i, r) for i, r in enumerate(rows)]
        ids = torch.full((len(rows), RESPONSE_LENGTH), self.tokenizer.pad_token_id)
        scores = torch.zeros(len(rows), RESPONSE_LENGTH)
        for i, (r, row) in enumerate(zip(responses, rows)):
            ids[i, : len(r)] = torch.tensor(r)
            text = self.tokenizer.decode(r, skip_special_tokens=True)
            scores[i, len(r) - 1] = vi.compute_score("shapes", text, row["reward_model"]["ground_truth"], row.get("extra_info"))["score"]
        prompt_mask = torch.ones(len(rows), 4, dtype=torch.long)
        response_mask = (ids != self.tokenizer.pad_token_id).long()
        out = DataProto.from_single_dict({"responses": ids, "attention_mask": torch.cat([prompt_mask, response_mask], 1),
                                          "response_mask": response_mask, "rm_scores": scores, **nt},
                                         meta_info={"timing": {"generate_sequences": 1.0}})  # fmt: skip
        return out


def gen_batch(rows) -> DataProto:
    """What verl's trainer hands the rollout manager: each prompt's fields repeated n times in a row."""
    nt = {
        "raw_prompt": np.array([[{"role": "user", "content": r.problem}] for r in rows], dtype=object),
        "reward_model": np.array([{"ground_truth": json.dumps(r.solution), "style": "rule"} for r in rows], dtype=object),
        "extra_info": np.array([{"index": i} for i in range(len(rows))], dtype=object),
        "uid": np.array([f"uid-{i}" for i in range(len(rows))], dtype=object),
    }
    return DataProto.from_single_dict(nt).repeat(N, interleave=True)


def test_gold_injection_groups_of_g_plus_one():
    rows = shapes_rows(4)
    _, tok = tiny_text_lm(rows)
    inner = StandInManager(tok)
    manager = vi.ViSurfRolloutManager(inner, tok, "grounding", n=N)
    batch = gen_batch(rows)
    out = manager.generate_sequences(batch)
    assert inner.calls == [len(rows) * G, len(rows)]  # no generation for the gold rows
    uid = out.non_tensor_batch["uid"]
    assert list(uid) == list(batch.non_tensor_batch["uid"]) and set(Counter(uid).values()) == {N}
    assert out.meta_info["timing"] == {"generate_sequences": 2.0}
    spec = get_reward("grounding")
    texts = vi.response_texts(out, tok)
    gold = np.arange(len(out)) % N == N - 1
    for i in np.nonzero(gold)[0]:
        solution = spec.parse_solution(out.non_tensor_batch["reward_model"][i]["ground_truth"])
        assert texts[i] == spec.render(solution, "spaced")  # aligned to the rollouts' style
        assert out.non_tensor_batch["extra_info"][i][vi.GOLD_FLAG] and out.non_tensor_batch["agent_name"][i] == vi.GOLD_AGENT
    # the rewards: eliminate in the reward function, smooth in the manager -- as algo does it
    scores = out.batch["rm_scores"].sum(-1).view(-1, N)
    raw_gold = torch.tensor([spec.total(spec.score(texts[i], spec.parse_solution(out.non_tensor_batch["reward_model"][i]["ground_truth"])))
                             for i in np.nonzero(gold)[0]])  # fmt: skip
    think = spec.weights[spec.think_component]
    r_star, smoothed = control_gold_rewards((raw_gold - think)[:, None], scores[:, :-1], torch.ones(1), None,
                                            eliminate=False, smooth=True)  # fmt: skip
    torch.testing.assert_close(scores[:, -1], r_star.float())  # verl's rm_scores are fp32
    assert smoothed.any() and not smoothed.all()  # both cases occur with these rollouts
    # the advantages through verl's compute_advantage with the visurf estimator
    out.batch["token_level_rewards"] = out.batch["rm_scores"]
    adv = compute_advantage(out, "visurf", config=AlgoConfig()).batch["advantages"][:, 0].view(-1, N)
    a_rollout, a_gold = mixed_group_advantages(GroupRewards(len(rows), scores[:, :-1], r_star, smoothed), norm_by_std=True, eps=1e-6)
    torch.testing.assert_close(adv, torch.cat([a_rollout, a_gold[:, None]], 1), rtol=1e-5, atol=1e-6)


# -- the fused-kernel forward backend ---------------------------------------------------------


def test_visurf_forward_backend_equals_verls_torch_backend():
    """``impl_backend=visurf`` through verl's ``patch_forward_with_backends`` (what
    ``apply_monkey_patch`` ends with; the whole of it cannot run beside TRL 1.16, see
    docs/embedding.md) vs verl's own ``torch`` fused backend on a tiny Qwen2ForCausalLM:
    per-token log-probs, entropy, and the parameter gradients of a log-prob-weighted sum."""
    from verl.models.transformers import monkey_patch

    model, _ = tiny_text_lm(shapes_rows(2))
    cls, original = type(model), type(model).forward
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(12).expand(2, 12),
                  temperature=0.7, return_dict=True)  # fmt: skip
    c = torch.randn(2, 12, generator=g)
    results = {}
    try:
        for backend in ("torch", "visurf"):
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
            model.zero_grad()
            out = model(**inputs)
            (out.log_probs * c).sum().backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results[backend] = (out.log_probs.detach(), out.entropy.detach(), grads)
        assert cls.forward is vi.visurf_forward
    finally:
        cls.forward = original
    (lp_t, ent_t, g_t), (lp_v, ent_v, g_v) = results["torch"], results["visurf"]
    torch.testing.assert_close(lp_v, lp_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_v, ent_t, rtol=0, atol=1e-5)
    assert (g_v - g_t).norm() <= 1e-5 * g_t.norm()
