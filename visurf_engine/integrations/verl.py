"""ViSurf inside verl (written and tested against verl 0.9.1): registrations and the gold injection.

Importing this module registers, in verl's own registries (every verl process must import it:
``VERL_USE_EXTERNAL_MODULES=visurf_engine.integrations.verl``):

- policy loss ``visurf`` (``actor.policy_loss.loss_mode=visurf``): ``visurf_kernels.
  policy_loss_from_logp`` (PPO clip ``[1 - clip_ratio_low, 1 + clip_ratio_high]``, dual clip
  ``clip_ratio_c``; ``null`` turns it off) on verl's ``[bs, T]`` log-probs, aggregated by a
  per-token weight from ``algo.members.sequence_weights`` for verl's ``loss_agg_mode`` and
  ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
  ``loss_scale_factor``): ``token-mean`` ``w = dp / T_global``, ``seq-mean-token-mean``
  ``w = dp / (S_global L_s)``, ``seq-mean-token-sum-norm`` ``w = dp / (S_global L_max)``; verl's
  rollout-correction weights multiply ``w``. Gold rows take the same clipped surrogate (with
  one update per batch, gradient ``-A* grad log pi(y*)``): verl's ``ppo_loss`` passes the loss
  only ``old_log_probs``, ``log_probs``, ``advantages``, ``response_mask`` and
  ``rollout_is_weights``, so no per-row gold flag reaches it and ``-A* log pi`` for the gold is
  not expressible without patching ``verl.workers.utils.losses.ppo_loss``.
- advantage estimator ``visurf`` (``algorithm.adv_estimator=visurf``): ``algo.advantages.
  group_advantages`` over each ``uid`` group, gold included (G + 1 members; ``norm_adv_by_std_in_grpo``
  false: Dr.GRPO). verl passes an estimator only rewards, mask, ``uid`` and config, so it
  cannot tell the gold from the rollouts: the reward controls happen before it (below).
- fused-kernel backend ``visurf`` (``actor_rollout_ref.model.use_fused_kernels=True``,
  ``fused_kernel_options.impl_backend=visurf``): ``visurf_forward`` replaces the model's forward
  as verl's own ``torch`` / ``triton`` backends do, returning per-token ``log_probs`` (with a
  gradient) and ``entropy`` through ``visurf_kernels.fused_logprobs_grad``, no ``[B, T, V]``
  logits. verl hands its forward only the model inputs (the advantages reach ``ppo_loss``
  after it returns), so the loss itself cannot run inside the kernel (our
  ``fused_policy_loss``) without patching verl's engine (``FSDPEngine.forward_step``): this
  backend is the log-prob kernel, and the surrogate runs on its output.
- agent loop ``visurf_gold``: verl's single-turn agent loop whose "generation" returns the gold
  text's tokens (``extra_info["visurf_gold_text"]``), so the gold trajectory goes through verl's
  own prompt rendering, multimodal processing, padding, position ids and reward loop.

``ViSurfRolloutManager(inner, tokenizer, reward_spec, n=G + 1)`` wraps the trainer's rollout
manager (``trainer.async_rollout_manager``, the object whose ``generate_sequences`` the
trainer calls with each prompt repeated ``rollout.n = G + 1`` times in a row):

1. generates the first G rows of each group through ``inner`` (verl computes their rewards in
   the agent loop, ``rm_scores``);
2. renders and aligns the gold from those rollouts (``algo.gold.make_gold``; ``auto`` without
   the log-likelihood fallback, which would need a policy forward pass here, so an
   unrecognisable group takes the dataset's style) and runs the G + 1-th row of each group
   through ``inner`` with ``agent_name=visurf_gold``; ``extra_info["visurf_gold"]`` tells the
   reward function (``compute_score``) to *eliminate* the think component;
3. *smooths* the gold's reward with the group's rollout rewards (``control_gold_rewards``),
   and returns all rows in the input order, so each ``uid`` group has G + 1 members.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss
from verl.workers.rollout.replica import TokenOutput

from verl.models.transformers import monkey_patch
from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

from visurf_kernels import LossSpec, fused_logprobs_grad, policy_loss_from_logp

from ..algo.advantages import group_advantages
from ..algo.gold import control_gold_rewards, make_gold
from ..algo.members import AGGREGATIONS, sequence_weights
from ..rewards import RewardSpec, get_reward, score_batch

GOLD_FLAG = "visurf_gold"  # extra_info key: this row is the gold (the reward function eliminates)
GOLD_TEXT = "visurf_gold_text"  # extra_info key: the rendered gold completion
GOLD_AGENT = "visurf_gold"  # agent loop name


# -- the policy loss --------------------------------------------------------------------------


def loss_spec(config) -> LossSpec:
    """``LossSpec`` from verl's actor config: clip range and dual clip (``clip_ratio_c``)."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return LossSpec(eps_low=low, eps_high=high, dual_clip=config.get("clip_ratio_c", 3.0))


def token_weights(response_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
                  global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:  # fmt: skip
    """Per-token ``w[bs, T]`` such that ``sum(w * loss_mat)`` is verl's ``agg_loss`` (module docstring);
    the counts are global (``global_batch_info``) or, on one data-parallel rank, this micro-batch's."""
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"visurf policy loss: loss_agg_mode {loss_agg_mode!r} unsupported; choose one of {AGGREGATIONS}")
    lengths = response_mask.sum(-1)
    if (batch_num_tokens is None or global_batch_size is None) and dp_size > 1:
        raise ValueError("visurf policy loss: global batch_num_tokens / global_batch_size are required when dp_size > 1")
    tokens = float(batch_num_tokens if batch_num_tokens is not None else lengths.sum()) / dp_size
    seqs = float(global_batch_size if global_batch_size is not None else (lengths > 0).sum()) / dp_size
    max_len = loss_scale_factor if loss_scale_factor is not None else response_mask.shape[-1]
    w = sequence_weights(lengths.cpu(), loss_agg_mode, num_seqs=seqs, num_tokens=tokens, max_len=max_len)
    return w.to(response_mask.device)[:, None] * response_mask


@register_policy_loss("visurf")
def visurf_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                       config=None, rollout_is_weights=None) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """verl's ``PolicyLossFn`` over our surrogate; all tensors ``[bs, T]`` (module docstring)."""
    mask = response_mask.bool()
    w = token_weights(mask.float(), loss_agg_mode, **config.global_batch_info)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights
    loss, _, clipped = policy_loss_from_logp(log_prob[mask], old_log_prob[mask], advantages[mask], w[mask],
                                             loss_spec(config))  # fmt: skip
    n = max(int(mask.sum()), 1)
    return loss, {"actor/pg_clipfrac": clipped.float().sum().item() / n,
                  "actor/ppo_kl": (old_log_prob - log_prob)[mask].sum().item() / n}  # fmt: skip


# -- the advantage estimator ------------------------------------------------------------------


@register_adv_est("visurf")
def visurf_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                     epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                     **unused) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``group_advantages`` over each ``uid`` group of the outcome rewards ``sum_t r_t``;
    returns ``(advantages, returns)``, both the advantage broadcast over the response mask."""
    if config is not None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = token_level_rewards.sum(-1)
    adv = torch.zeros_like(scores)
    groups: dict[Any, list[int]] = {}
    for i, uid in enumerate(index):
        groups.setdefault(uid, []).append(i)
    for uid, rows in groups.items():
        if len(rows) < 2:
            raise ValueError(f"visurf advantage: uid {uid!r} has {len(rows)} member; a group needs >= 2")
        a = group_advantages(scores[rows][None], norm_by_std=norm_adv_by_std_in_grpo, eps=epsilon)
        adv[rows] = a[0].to(adv.dtype)
    adv = adv[:, None] * response_mask
    return adv, adv


# -- the fused-kernel forward ------------------------------------------------------------------


def visurf_forward(self, input_ids=None, labels=None, temperature: float = 1.0, shift_labels=None, **kwargs):
    """verl's fused forward contract: the backbone (verl's own backbone call for Qwen2-VL /
    Qwen2.5-VL, else its dense one), then for every position ``t`` the log-prob (and entropy)
    of token ``t + 1`` (``shift_labels`` when verl pre-rolled them, else the rolled ``labels`` /
    ``input_ids``) at ``temperature``, shaped like the ids."""
    if self.config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from verl.models.transformers.qwen2_vl import qwen2_vl_forward

        outputs = qwen2_vl_forward(self, input_ids, **kwargs)
    else:
        outputs = forward_base_model(self, input_ids=input_ids, **kwargs)
    hidden = outputs[0]
    if shift_labels is not None:
        rolled = shift_labels
    else:
        rolled = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
    weight = self.lm_head.weight
    logp, entropy = fused_logprobs_grad(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight, rolled.reshape(-1),
                                        LossSpec(temperature=float(temperature), with_entropy=True))  # fmt: skip
    return CausalLMOutputForPPO(log_probs=logp.view(rolled.shape), entropy=entropy.view(rolled.shape),
                                hidden_states=outputs.hidden_states)  # fmt: skip


def install_forward_backend() -> None:
    """Teach verl's ``patch_forward_with_backends`` the ``visurf`` backend (idempotent; the
    other backends are verl's, unchanged). verl looks the function up at call time, so
    replacing the module attribute reaches ``apply_monkey_patch``."""
    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "visurf", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
        if not (use_fused_kernels and fused_kernels_backend == "visurf"):
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        model._verl_fused_kernels_backend = "visurf"
        model.__class__.forward = visurf_forward

    patch_forward_with_backends.visurf = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


install_forward_backend()


# -- the reward function ----------------------------------------------------------------------


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, reward: str = "grounding", **unused):
    """verl's ``custom_reward_function`` (``reward.custom_reward_function.path`` this file,
    ``name: compute_score``; ``reward_kwargs.reward`` the ``RewardSpec`` name): the components
    and their weighted total ``score``; a gold row (``extra_info[GOLD_FLAG]``) scores its think
    component 0 (*eliminate*). A failing sample scores 0 (``score_batch``)."""
    spec = get_reward(reward)
    comps = score_batch(spec, [solution_str], [spec.parse_solution(ground_truth)], [str(data_source)]).components[0]
    if (extra_info or {}).get(GOLD_FLAG) and spec.think_component is not None:
        comps[spec.components.index(spec.think_component)] = 0.0
    out = {c: float(v) for c, v in zip(spec.components, comps)}
    return out | {"score": spec.total(out)}


# -- the gold trajectory ----------------------------------------------------------------------


class _GoldServer:
    """Stands in for the LLM server: "generates" the given token ids."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids

    async def generate(self, **unused) -> TokenOutput:
        return TokenOutput(token_ids=self.token_ids, stop_reason="completed")


@register(GOLD_AGENT)
class GoldAgentLoop(SingleTurnAgentLoop):
    """The single-turn agent loop with the gold's tokens as its response (no sampling, no
    behaviour log-probs), so the gold row is built exactly as verl builds a rollout row."""

    async def run(self, sampling_params: dict[str, Any], **kwargs):
        text = kwargs["extra_info"][GOLD_TEXT]
        self.server_manager = _GoldServer(self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id])
        return await super().run(sampling_params, **kwargs)


class ViSurfRolloutManager:
    """Wraps verl's rollout manager so each group of ``n`` rows holds G = n - 1 rollouts and the
    gold (module docstring). ``gold_of(row)`` reads a row's gold solution from its non-tensor
    fields (default: verl's ``reward_model["ground_truth"]``)."""

    def __init__(self, inner, tokenizer, reward_spec: RewardSpec | str, n: int, *, align: bool = True,
                 align_style: str = "auto", smooth: bool = True, gold_of=None):  # fmt: skip
        if n < 3:
            raise ValueError(f"ViSurfRolloutManager: n = rollout.n = {n} counts the gold, so it must be G + 1 >= 3")
        self.inner, self.tokenizer, self.n = inner, tokenizer, n
        self.spec = get_reward(reward_spec) if isinstance(reward_spec, str) else reward_spec
        self.align, self.align_style, self.smooth = align, align_style, smooth
        self.gold_of = gold_of or (lambda row: row["reward_model"]["ground_truth"])

    def __getattr__(self, name):  # the rest of the manager's interface (sleep, wake_up, ...)
        return getattr(self.inner, name)

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        if prompts.meta_info.get("validate", False):
            return self.inner.generate_sequences(prompts)
        m, rows = self.n, len(prompts)
        if rows % m:
            raise ValueError(f"ViSurfRolloutManager: {rows} rows is not a whole number of groups of n = {m}")
        rollout_rows = [i for i in range(rows) if i % m != m - 1]
        gold_rows = list(range(m - 1, rows, m))
        rollouts = self.inner.generate_sequences(prompts.select_idxs(rollout_rows))
        gold = self.inner.generate_sequences(self._gold_prompts(prompts, gold_rows, rollouts))
        if self.smooth:
            self._smooth(rollouts, gold)
        missing = set(rollouts.batch.keys()) ^ set(gold.batch.keys())
        if missing:
            raise ValueError(f"ViSurfRolloutManager: the gold rows lack {sorted(missing)} (e.g. rollout_log_probs: "
                             "the gold has no behaviour log-probs; turn off rollout.calculate_log_probs)")  # fmt: skip
        timing = _pop_timing(rollouts, gold)
        merged = DataProto.concat([rollouts, gold])
        merged.reorder(torch.tensor(np.argsort(rollout_rows + gold_rows, kind="stable")))
        merged.meta_info["timing"] = timing
        return merged

    def _gold_prompts(self, prompts: DataProto, gold_rows: list[int], rollouts: DataProto) -> DataProto:
        """The gold rows' inputs: agent ``visurf_gold``, ``extra_info`` with the rendered text."""
        g = self.n - 1
        texts = response_texts(rollouts, self.tokenizer)
        gold = prompts.select_idxs(gold_rows)
        nt = gold.non_tensor_batch
        solutions = [self.spec.parse_solution(self.gold_of({k: v[i] for k, v in nt.items()})) for i in range(len(gold))]
        rendered = make_gold(self.spec, solutions, [str(r) for r in gold_rows], [texts[b * g : (b + 1) * g] for b in range(len(gold))],
                             None, align=self.align, align_style=self.align_style, eliminate=True, smooth=self.smooth,
                             scored=False, loglik=None)  # fmt: skip
        infos = nt["extra_info"] if "extra_info" in nt else [None] * len(gold)
        nt["extra_info"] = np.array([dict(info or {}, **{GOLD_FLAG: True, GOLD_TEXT: t}) for info, t in zip(infos, rendered.texts)],
                                    dtype=object)  # fmt: skip
        nt["agent_name"] = np.array([GOLD_AGENT] * len(gold), dtype=object)
        return gold

    def _smooth(self, rollouts: DataProto, gold: DataProto) -> None:
        """*smooth*: ``r* := mean_i r_i`` where ``max_i r_i >= r*``, written into the gold's
        ``rm_scores`` (the outcome reward sits on its last response token, as verl puts it)."""
        if "rm_scores" not in gold.batch.keys():
            raise ValueError("ViSurfRolloutManager: smooth needs the rewards from the agent loop (rm_scores); "
                             "with a colocated reward model pass smooth=False")  # fmt: skip
        r = rollouts.batch["rm_scores"].sum(-1).view(-1, self.n - 1)
        scores = gold.batch["rm_scores"]
        r_star, _ = control_gold_rewards(scores.sum(-1)[:, None], r, torch.ones(1), None, eliminate=False, smooth=True)
        last = response_lengths(gold).clamp(min=1) - 1
        scores.zero_()
        scores[torch.arange(len(scores)), last] = r_star.to(scores.dtype)


def response_lengths(data: DataProto) -> torch.Tensor:
    """``[bs]`` valid response tokens (the response part of the attention mask)."""
    width = data.batch["responses"].shape[-1]
    return data.batch["attention_mask"][:, -width:].sum(-1)


def response_texts(data: DataProto, tokenizer) -> list[str]:
    """The decoded responses (padding dropped, special tokens skipped)."""
    ids, lengths = data.batch["responses"], response_lengths(data)
    return tokenizer.batch_decode([ids[i, : int(n)].tolist() for i, n in enumerate(lengths)], skip_special_tokens=True)


def _pop_timing(*parts: DataProto) -> dict[str, float]:
    """The parts' ``meta_info["timing"]`` summed (``DataProto.concat`` requires equal meta_info)."""
    total: dict[str, float] = {}
    for p in parts:
        for k, v in p.meta_info.pop("timing", {}).items():
            total[k] = total.get(k, 0.0) + v
    return total

