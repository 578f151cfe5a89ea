"""ViSurfGRPOTrainer on the real TRL (1.16), on CPU: a tiny Qwen2.5-VL and a tiny text LM.

- a few steps train (finite loss, parameters move), the gold is member G + 1 (its tokens are
  the rendered gold, no generation) and the advantages are those ``algo`` computes from the
  same rewards (TRL's normalisation: eps 1e-4);
- smoothing: a group whose rollouts beat the gold gives the gold advantage exactly 0;
- with ViSurf off, our fused loss equals TRL's own loss and gradients on the same batch, for
  each loss type (fp32; tolerances at the asserts).
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_testing.integrations import require, shapes_rows, text_dataset, tiny_text_lm, tiny_vlm, vlm_dataset

trl = require("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from visurf_engine.algo.gold import control_gold_rewards  # noqa: E402
from visurf_engine.algo.paradigms import GroupRewards, mixed_group_advantages  # noqa: E402
from visurf_engine.integrations.trl import ViSurfGRPOTrainer, ViSurfOptions  # noqa: E402
from visurf_engine.rewards import get_reward  # noqa: E402

M = 4  # num_generations: G = 3 rollouts + the gold


def grpo_args(tmp_path, **kw) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * M, num_generations=M, max_completion_length=8,
                max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                gradient_checkpointing=False, bf16=False, seed=0)  # fmt: skip (fp32: the comparisons' tolerances)
    return GRPOConfig(**(base | kw))


class Spy(ViSurfGRPOTrainer):
    """Keeps the last generation batch, and the reward rows before and after the reward controls."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.raw_rewards = GRPOTrainer._calculate_rewards(self, inputs, prompts, completions, completion_ids_list)
        self.rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self.rewards

    def _generate_and_score_completions(self, inputs):
        self.batch = super()._generate_and_score_completions(inputs)
        self.rows = inputs
        return self.batch


def train(trainer) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.args.max_steps and all(math.isfinite(x) for x in losses), losses
    moved = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in moved and len(moved) > len(before) // 2, f"{len(moved)} of {len(before)} moved"
    return before


def check_gold(trainer, expected_think_index: int | None):
    """The last batch: gold rows hold the rendered gold, and the advantages are algo's."""
    b, spec = trainer.batch, trainer.reward_spec
    gold = b["visurf_gold"]
    assert gold.tolist() == [i % M == M - 1 for i in range(len(gold))]
    tok = trainer._tokenizer
    for i in gold.nonzero().squeeze(1).tolist():
        ids = b["completion_ids"][i][b["completion_mask"][i].bool()].tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        assert ids[-1] == tok.eos_token_id and text in {spec.render(spec.parse_solution(trainer.rows[i]["solution"]), s)
                                                        for s in spec.styles}  # fmt: skip
    # algo on the same (raw) rewards: the controls, then the augmented-group advantages
    raw, w = trainer.raw_rewards.view(-1, M, trainer.raw_rewards.shape[1]), trainer.reward_weights
    rollout = raw[:, :-1] @ w
    r_star, smoothed = control_gold_rewards(raw[:, -1], rollout, w, expected_think_index, eliminate=True, smooth=True)
    adv_rollout, adv_gold = mixed_group_advantages(GroupRewards(len(r_star), rollout, r_star, smoothed), norm_by_std=True, eps=1e-4)
    ours = torch.cat([adv_rollout, adv_gold[:, None]], dim=1).flatten()
    torch.testing.assert_close(b["advantages"], ours, rtol=1e-5, atol=1e-5)  # float32 mean / std of <= 4 values
    assert torch.equal(b["advantages"][gold][smoothed], torch.zeros(int(smoothed.sum())))
    torch.testing.assert_close(trainer.rewards.view(-1, M, raw.shape[2])[:, -1] @ w, r_star.float())  # TRL's rewards: fp32
    return smoothed


def test_vlm_visurf_steps(tmp_path):
    """Tiny Qwen2.5-VL, grounding reward (one TRL reward function per component), gold on,
    fused loss: two optimizer steps."""
    rows = shapes_rows(4)
    model, processor = tiny_vlm(rows)
    trainer = Spy(model=model, args=grpo_args(tmp_path), train_dataset=vlm_dataset(rows), processing_class=processor,
                  reward_spec="grounding")  # fmt: skip
    train(trainer)
    assert trainer.reward_func_names == list(get_reward("grounding").components)
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(trainer.batch)
    check_gold(trainer, expected_think_index=0)


def rewards_with_smoothing():
    """``think_format`` (1 for all; the gold's is eliminated) and ``bonus``: the gold gets 10 when
    the object is present and 0 when absent, a rollout 3 or 4 by its length's parity, so a
    group with an absent object is smoothed and one with a present object is not."""

    def think_format(prompts, completions, **kw):
        return [1.0] * len(completions)

    def bonus(prompts, completions, solution, **kw):
        gold = [c.startswith("<think></think><answer>") for c in completions]
        return [(10.0 if s != "[]" else 0.0) if g else 3.0 + len(c) % 2 for c, s, g in zip(completions, solution, gold)]

    return [think_format, bonus]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-loss", "trl-loss"])
def test_text_lm_visurf_smoothing(tmp_path, fused):
    """Tiny Qwen2ForCausalLM, plain-text prompts, custom reward functions; the absent-object
    groups are smoothed (gold advantage exactly 0); TRL's own loss takes the gold rows too."""
    rows = shapes_rows(4)
    model, tok = tiny_text_lm(rows)
    args = grpo_args(tmp_path, per_device_train_batch_size=4 * M)  # every step: all 4 rows, one of them absent
    trainer = Spy(model=model, reward_funcs=rewards_with_smoothing(), args=args,
                  train_dataset=text_dataset(rows), processing_class=tok, reward_spec="grounding",
                  visurf=ViSurfOptions(fused_loss=fused))  # fmt: skip
    train(trainer)
    smoothed = check_gold(trainer, expected_think_index=0)
    absent = torch.tensor([trainer.rows[i]["solution"] == "[]" for i in range(M - 1, len(trainer.rows), M)])
    assert torch.equal(smoothed, absent) and absent.any() and not absent.all()


def check_loss_matches(trainer, loss_type: str, atol: float):
    """Our fused ``_compute_loss`` vs TRL's on one batch with off-policy old log-probs (clipping
    active) and completion lengths made to differ (so the loss types differ). Measured on CPU:
    loss relative difference ~2e-7, gradient max difference ~4e-7 of the largest gradient."""
    trainer.loss_type = loss_type
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, inputs["completion_mask"].size(1) + 1, (inputs["completion_mask"].size(0),), generator=g)
    inputs["completion_mask"] = inputs["completion_mask"] * (torch.arange(inputs["completion_mask"].size(1)) < lengths[:, None])
    mask = inputs["completion_mask"].float()
    inputs["advantages"] = torch.randn(mask.shape[0], generator=g)
    inputs["old_per_token_logps"] = 0.3 * torch.randn(mask.shape, generator=g) + _current_logps(trainer, inputs)
    losses, grads = [], []
    for fn in (GRPOTrainer._compute_loss, ViSurfGRPOTrainer._compute_loss):
        model.zero_grad()
        loss = fn(trainer, model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the clip is exercised
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    scale = grads[0].abs().max()
    assert (grads[1] - grads[0]).abs().max() <= atol * scale, (grads[1] - grads[0]).abs().max() / scale


def _current_logps(trainer, inputs) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, att, inputs["completion_ids"].size(1), pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"), num_images=inputs.get("num_images"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
        )  # fmt: skip
    return logps


@pytest.fixture(scope="module")
def off_trainer(tmp_path_factory):
    """ViSurf off, fused loss on, on the tiny Qwen2.5-VL; temperature and an asymmetric clip
    range so that their mapping into ``LossSpec`` is exercised."""
    rows = shapes_rows(4)
    model, processor = tiny_vlm(rows)
    args = grpo_args(tmp_path_factory.mktemp("trl"), temperature=0.7, epsilon=0.2, epsilon_high=0.28)
    return ViSurfGRPOTrainer(model=model, args=args, train_dataset=vlm_dataset(rows), processing_class=processor,
                             reward_spec="grounding", visurf=ViSurfOptions(gold=False, loss_backend="torch"))  # fmt: skip


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_fused_loss_equals_trl_loss(off_trainer, loss_type):
    check_loss_matches(off_trainer, loss_type, atol=1e-5)


def test_unsupported_settings_raise(tmp_path):
    rows = shapes_rows(4)
    model, processor = tiny_vlm(rows)
    with pytest.raises(ValueError, match="loss_type: 'cispo'"):
        ViSurfGRPOTrainer(model=model, args=grpo_args(tmp_path, loss_type="cispo"), train_dataset=vlm_dataset(rows),
                          processing_class=processor, reward_spec="grounding")  # fmt: skip
    with pytest.raises(ValueError, match="num_generations"):
        ViSurfGRPOTrainer(model=model, args=grpo_args(tmp_path, num_generations=2, per_device_train_batch_size=4),
                          train_dataset=vlm_dataset(rows), processing_class=processor, reward_spec="grounding")  # fmt: skip
    processor.tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="pad on the left"):
        ViSurfGRPOTrainer(model=model, args=grpo_args(tmp_path), train_dataset=vlm_dataset(rows),
                          processing_class=processor, reward_spec="grounding")  # fmt: skip


@pytest.mark.parametrize("gold_loss", ["dft", "shaped", "phi"])
def test_gold_objectives_through_the_fused_loss_equal_the_elementwise_objective(tmp_path, gold_loss):
    """``ViSurfOptions.gold_loss`` beyond ppo (the kernel's per-token objectives, exposed to TRL
    users): on one batch with the gold as member G + 1, the fused loss and its gradients equal
    ``policy_loss_from_logp`` with the gold rows' objective code on TRL's own per-token log-probs
    (materialised logits) and autograd; fp32, the tolerances of ``check_loss_matches``."""
    from visurf_kernels import OBJECTIVES, policy_loss_from_logp

    rows = shapes_rows(4)
    model, tok = tiny_text_lm(rows)
    trainer = ViSurfGRPOTrainer(model=model, reward_funcs=rewards_with_smoothing(), args=grpo_args(tmp_path),
                                train_dataset=text_dataset(rows), processing_class=tok, reward_spec="grounding",
                                visurf=ViSurfOptions(gold_loss=gold_loss, loss_backend="torch"))  # fmt: skip
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    inputs["advantages"] = torch.randn(inputs["completion_mask"].shape[0], generator=torch.Generator().manual_seed(2))
    mask = inputs["completion_mask"].bool()
    codes = inputs["visurf_gold"][:, None].expand_as(mask)[mask].long() * OBJECTIVES.index(gold_loss)
    assert (codes > 0).any() and (codes == 0).any()
    model.zero_grad()
    fused = ViSurfGRPOTrainer._compute_loss(trainer, model, inputs)
    fused.backward()
    fused_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, inputs["completion_ids"].size(1))
    adv = inputs["advantages"][:, None].expand_as(mask)[mask]
    ref, _, _ = policy_loss_from_logp(logps[mask], logps[mask].detach(), adv, trainer._token_weights(mask, inputs),
                                      trainer.loss_spec, codes)  # fmt: skip
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(fused.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert (fused_grads - ref_grads).abs().max() <= 1e-5 * ref_grads.abs().max()
