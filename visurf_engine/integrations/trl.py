"""ViSurf and the fused loss inside TRL's ``GRPOTrainer`` (written and tested against TRL 1.16.0).

``ViSurfGRPOTrainer(model, args=GRPOConfig(num_generations=G + 1, ...), reward_spec=...,
visurf=ViSurfOptions(...), train_dataset=..., processing_class=...)`` has two independent
switches (``docs/design.md`` §1 for the math, ``docs/embedding.md`` for the user's view):

**gold** -- the ViSurf group. ``num_generations`` counts the gold: TRL's sampler repeats each
prompt G + 1 times in a row; the first G rows of each group are generated, the last is the
gold answer from the dataset column ``gold_column`` and is never generated.

- render + align: ``algo.gold.make_gold`` (``auto``: the style most of the group's G rollouts
  are written in, else the candidate with the highest mean per-token log-likelihood under the
  policy, from one batched no-grad pass through ``visurf_kernels.fused_logprobs``);
- score: TRL's own reward functions, on all G + 1 rows (by default one per component of the
  ``RewardSpec``: ``reward_funcs_from_spec``);
- eliminate + smooth: ``algo.gold.control_gold_rewards`` on the gold rows of TRL's gathered
  ``rewards_per_func[R, K]`` (K functions, weights ``reward_weights``). The gold row is
  rewritten so that its weighted sum is the controlled ``r*``: its think column zeroed, or,
  when smoothed, the group's per-function rollout mean (``sum_k w_k mean_i r_ik = mean_i r_i``);
- advantages: TRL's own normalisation over the G + 1 (``scale_rewards="group"``:
  ``(r - mu) / (sigma + 1e-4)``, unbiased sigma, i.e. ``algo.advantages.group_advantages``
  with ``eps=1e-4``); a smoothed gold's advantage (0 up to rounding) is then set to exactly 0,
  as ``algo.paradigms.mixed_group_advantages`` does.

The gold's tokens take the PPO surrogate (``gold_loss="ppo"``; with one update per batch its
gradient is ``-A* grad log pi(y*)``) or, with the fused loss, any other per-token objective of
``visurf_kernels.OBJECTIVES``: ``"logprob"`` (``-A* log pi``), ``"shaped"`` (LUFFY),
``"dft"``, ``"phi"`` (CHORD-phi's weighting).

**fused_loss** -- the policy loss through ``visurf_kernels.fused_policy_loss`` from the
backbone's last hidden states and the LM head weight: no ``[B, T, V]`` logits and no autograd
graph through per-token log-probs (the gradients come out of the kernel's forward). TRL's loss
types become the per-token weight ``w`` (``loss = sum_t w_t loss_t``), per micro-batch of B
rows with completion lengths ``L_b`` and ``ga`` accumulation steps (``algo.members.
sequence_weights`` computes each):

    grpo     w = 1 / (B L_b ga)                            seq-mean-token-mean
    bnpo     w = 1 / (sum_b L_b ga)                         token-mean (micro-batch tokens)
    dapo     w = 1 / (num_items / processes * ga / spg)      token-mean (generation-batch tokens)
    dr_grpo  w = 1 / (B max_completion_length ga)           seq-mean-token-sum-norm

``epsilon`` / ``epsilon_high``, ``temperature``, TRL's old log-probs and vLLM's
importance-sampling ratio (a per-token factor of ``w``) carry over; ``dual_clip`` is ours.
What the fused path cannot express raises at init, naming the setting (``_FUSED_UNSUPPORTED``).

VLMs: Qwen2-VL-style inputs (``pixel_values`` rows per image from ``image_grid_thw``) are
threaded through generation, the align pass and the loss, ``mm_token_type_ids`` included
(without it Qwen2.5-VL silently falls back to 1-D positions). The processor's tokenizer must
pad on the left, as TRL's prompt ids are (``_check_padding_side``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import pad

from visurf_kernels import OBJECTIVES, LossSpec, fused_logprobs, fused_policy_loss

from ..algo.gold import control_gold_rewards, make_gold
from ..algo.members import per_token, sequence_weights
from ..rewards import RewardSpec, get_reward, score_batch

# TRL loss type -> our aggregation (module docstring)
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
              "dr_grpo": "seq-mean-token-sum-norm"}  # fmt: skip
# model inputs besides the token ids that TRL's batches may carry, passed to the backbone as they are
FORWARD_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids", "pixel_attention_mask",
                "image_sizes", "spatial_shapes", "image_position_ids")  # fmt: skip


@dataclass(frozen=True)
class ViSurfOptions:
    """What ``ViSurfGRPOTrainer`` changes (module docstring); the names follow ``config.AlgoConfig``."""

    gold: bool = True  # the gold joins each group as member G + 1
    gold_column: str = "solution"  # dataset column holding the gold answer (``RewardSpec.parse_solution`` input)
    align: bool = True
    align_style: str = "auto"
    eliminate: bool = True
    smooth: bool = True
    gold_loss: str = "ppo"  # the gold tokens' objective: a visurf_kernels.OBJECTIVES name (ppo | logprob | shaped | dft | phi)
    fused_loss: bool = True  # the policy loss through visurf_kernels
    dual_clip: float | None = None
    loss_backend: str = "auto"  # visurf_kernels backend: auto | triton | torch | reference

    def __post_init__(self):
        if self.gold_loss not in OBJECTIVES:
            raise ValueError(f"ViSurfOptions.gold_loss: choose one of {OBJECTIVES}, got {self.gold_loss!r}")
        if self.gold_loss != "ppo" and not self.fused_loss:
            raise ValueError(f"ViSurfOptions.gold_loss={self.gold_loss!r} needs fused_loss=True (TRL's own loss has no "
                             "per-row objective)")  # fmt: skip
        LossSpec(dual_clip=self.dual_clip, backend=self.loss_backend)  # validates both


def reward_funcs_from_spec(spec: RewardSpec, solution_column: str = "solution") -> list[Callable]:
    """One TRL reward function per component of ``spec``, named after it (TRL logs
    ``rewards/<component>/mean``; ``reward_weights`` are ``spec.weights``). Each reads the
    completion text (plain or the last message's content) and the ``solution_column`` of the
    row; the batch is scored once (``score_batch``: a failing sample scores 0, logged) and
    cached for the other components of the same call."""
    last: dict[str, Any] = {}

    def components(completions, solutions) -> torch.Tensor:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        key = (texts, [repr(s) for s in solutions])
        if last.get("key") != key:
            parsed = [spec.parse_solution(s) for s in solutions]
            last.update(key=key, comps=score_batch(spec, texts, parsed, [f"trl:{i}" for i in range(len(texts))]).components)
        return last["comps"]

    def component_reward(k: int, name: str) -> Callable:
        def reward(prompts, completions, **kwargs):
            if solution_column not in kwargs:
                raise KeyError(f"reward {spec.name!r}: the dataset has no column {solution_column!r}")
            return components(completions, kwargs[solution_column])[:, k].tolist()

        reward.__name__ = name
        return reward

    return [component_reward(k, name) for k, name in enumerate(spec.components)]


def _num_images(images) -> list[int] | None:
    return [len(x) if x else 0 for x in images] if images is not None else None


def select_rows(fields: dict[str, Any], rows: Sequence[int], num_images: list[int] | None) -> dict[str, Any]:
    """The multimodal fields of TRL's generation batch for ``rows`` (repeats allowed).

    ``pixel_values`` holds ``prod(image_grid_thw[i])`` patch rows per image and each row has
    ``num_images[r]`` images; per-token fields (lists of per-row lists) are indexed by row.
    Other layouts (image-indexed or tiled pixel values) are not supported for gold rows.
    """
    out = {}
    if "pixel_values" in fields:
        if "image_grid_thw" not in fields or num_images is None:
            raise NotImplementedError("ViSurf gold rows: pixel_values without image_grid_thw (only Qwen2-VL-style inputs)")
        grid = torch.as_tensor(fields["image_grid_thw"])
        pixels = torch.as_tensor(fields["pixel_values"])
        per_image = torch.split(pixels, grid.prod(-1).tolist())
        first = [0] + torch.tensor(num_images).cumsum(0).tolist()
        images = [list(range(first[r], first[r + 1])) for r in rows]
        out["pixel_values"] = torch.cat([per_image[i] for img in images for i in img])
        out["image_grid_thw"] = grid[[i for img in images for i in img]]
    for k, v in fields.items():
        if k in ("pixel_values", "image_grid_thw"):
            continue
        if not (isinstance(v, list) and (not v or isinstance(v[0], list))):
            raise NotImplementedError(f"ViSurf gold rows: multimodal field {k!r} ({type(v).__name__}) is not supported")
        out[k] = [v[r] for r in rows]
    return out


class ViSurfGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the ViSurf gold member and/or the fused policy loss (module docstring).

    ``reward_spec`` (a ``RewardSpec`` or a registered name) renders, aligns and, unless
    ``reward_funcs`` is given, scores. With ``reward_funcs`` of your own, the function named
    ``reward_spec.think_component`` is the one *eliminate* zeroes for the gold.
    """

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *,
                 reward_spec: RewardSpec | str, visurf: ViSurfOptions = ViSurfOptions(), **kwargs):  # fmt: skip
        self.reward_spec = get_reward(reward_spec) if isinstance(reward_spec, str) else reward_spec
        self.visurf = visurf
        if reward_funcs is None:
            reward_funcs = reward_funcs_from_spec(self.reward_spec, visurf.gold_column)
            if args is not None and args.reward_weights is None:
                args.reward_weights = [self.reward_spec.weights[c] for c in self.reward_spec.components]
        super().__init__(model, reward_funcs, args, **kwargs)
        self._forward_redirection = _ForwardRedirection()
        self._rows: list[dict] = []  # the dataset rows of the generation batch being built
        self._smoothed: torch.Tensor | None = None  # [groups] of that batch, all processes
        self.loss_spec = LossSpec(temperature=self.temperature, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                                  dual_clip=visurf.dual_clip, with_entropy=True, backend=visurf.loss_backend)  # fmt: skip
        self._check_padding_side()
        if visurf.gold:
            self._check_gold()
        if visurf.fused_loss:
            self._check_fused()

    # -- checks ---------------------------------------------------------------------------

    def _check_padding_side(self):
        if self._is_vlm and self._tokenizer.padding_side != "left":
            raise ValueError("ViSurfGRPOTrainer: the processor's tokenizer must pad on the left (TRL left-pads the "
                             "prompt ids, and the processor's mm_token_type_ids must line up with them); set "
                             "processor.tokenizer.padding_side = 'left'")  # fmt: skip

    def _check_gold(self):
        a, m = self.args, self.num_generations
        problems = {
            "num_generations": m < 3 and f"{m}: counts the gold, so it must be G + 1 >= 3",
            "per_device_train_batch_size * steps_per_generation": (a.per_device_train_batch_size * a.steps_per_generation) % m
            and "must be a multiple of num_generations (each process holds whole groups)",
            "multi_objective_aggregation": self.multi_objective_aggregation != "sum_then_normalize"
            and f"{self.multi_objective_aggregation!r}: smoothing compares weighted totals, use 'sum_then_normalize'",
            "rollout_func": self.rollout_func is not None and "set: the gold rows come from _generate_single_turn",
            "tools / environment_factory": (self.tools or self.environment_factories) and "tool calls are not supported",
        }  # fmt: skip
        self._raise_unsupported("the ViSurf gold", problems)
        think = self.reward_spec.think_component
        self._think = self.reward_func_names.index(think) if think in self.reward_func_names else None
        if self.visurf.eliminate and think is not None and self._think is None:
            raise ValueError(f"ViSurf eliminate: no reward function is named {think!r} (the think-format component "
                             f"of reward {self.reward_spec.name!r}); reward functions: {self.reward_func_names}")  # fmt: skip

    def _check_fused(self):
        a = self.args
        problems = {
            "loss_type": self.loss_type not in LOSS_TYPES and f"{self.loss_type!r}; supported: {sorted(LOSS_TYPES)}",
            "beta": self.beta != 0.0 and f"{self.beta}: the fused loss has no KL term",
            "importance_sampling_level": self.importance_sampling_level != "token" and "sequence-level ratios",
            "delta": a.delta is not None and "two-sided clipping",
            "top_entropy_quantile": self.top_entropy_quantile < 1.0 and "needs per-token entropies before the loss",
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None and "needs current log-probs first",
            "entropy_coef": self._entropy_bonus_enabled and "the kernel's entropy has no gradient",
            "router_aux_loss_coef": self.aux_loss_enabled and "MoE aux loss",
        }  # fmt: skip
        self._raise_unsupported("fused_loss=True", problems)
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("fused_loss=True: the LM head has a bias, which visurf_kernels does not take")

    @staticmethod
    def _raise_unsupported(what: str, problems: dict[str, Any]):
        bad = [f"{k}: {v}" for k, v in problems.items() if v]
        if bad:
            raise ValueError(f"ViSurfGRPOTrainer: not supported with {what}: " + "; ".join(bad))

    # -- the gold member ------------------------------------------------------------------

    def _gold_step(self) -> bool:
        return self.visurf.gold and self.model.training

    def _generate_and_score_completions(self, inputs):
        """TRL's step, with the gold rows' flags ``visurf_gold[B]`` added and a smoothed gold's
        advantage set to exactly 0."""
        if not self._gold_step():
            return super()._generate_and_score_completions(inputs)
        self._rows = inputs
        out = super()._generate_and_score_completions(inputs)
        m, n = self.num_generations, len(inputs)
        gold = (torch.arange(n) % m == m - 1).to(out["advantages"].device)
        groups = slice(self.accelerator.process_index * n // m, (self.accelerator.process_index + 1) * n // m)
        smoothed = torch.zeros_like(gold)
        smoothed[gold] = self._smoothed[groups].to(gold.device)
        out["advantages"] = out["advantages"].masked_fill(smoothed, 0.0)
        out["visurf_gold"] = gold
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Generates the G rollout rows of each group only; the last row gets the gold's tokens
        (no sampling log-probs: ``None``, which TRL's importance sampling treats as ratio 1)."""
        if not self._gold_step():
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        m, rows = num_generations, len(prompt_ids)
        num_images = _num_images(images)
        rollout_rows = [i for i in range(rows) if i % m != m - 1]
        gold_rows = list(range(m - 1, rows, m))
        completions, logprobs = super()._generate_single_turn(
            [prompt_ids[i] for i in rollout_rows], [images[i] for i in rollout_rows] if images is not None else None,
            select_rows(multimodal_fields, rollout_rows, num_images), m - 1, has_tool_images,
        )  # fmt: skip
        gold = self._gold_tokens(prompt_ids, multimodal_fields, num_images, completions, gold_rows)
        ids, lps = [], ([] if logprobs is not None else None)
        for b, g in enumerate(gold):
            ids += list(completions[b * (m - 1) : (b + 1) * (m - 1)]) + [g]
            if lps is not None:
                lps += list(logprobs[b * (m - 1) : (b + 1) * (m - 1)]) + [[None] * len(g)]
        return ids, lps

    def _gold_tokens(self, prompt_ids, fields, num_images, rollout_ids, gold_rows) -> list[list[int]]:
        """Render and align the gold of each group (``make_gold``, unscored: TRL scores it)."""
        spec, o, g = self.reward_spec, self.visurf, self.num_generations - 1
        texts = self._tokenizer.batch_decode(rollout_ids, skip_special_tokens=True)
        solutions = [spec.parse_solution(self._rows[r][o.gold_column]) for r in gold_rows]

        def loglik(groups: list[int], candidates: list[str]) -> list[float]:
            return self._loglik([gold_rows[b] for b in groups], candidates, prompt_ids, fields, num_images)

        groups = [texts[b * g : (b + 1) * g] for b in range(len(gold_rows))]
        gold = make_gold(spec, solutions, [f"trl:{r}" for r in gold_rows], groups, None, align=o.align,
                         align_style=o.align_style, eliminate=o.eliminate, smooth=o.smooth, scored=False,
                         loglik=loglik)  # fmt: skip
        self._log("visurf/aligned_share", sum(s != spec.dataset_style for s in gold.styles) / len(gold.styles))
        return [self._encode_completion(t) for t in gold.texts]

    def _encode_completion(self, text: str) -> list[int]:
        """Completion token ids of ``text``, ending with the end-of-turn token as a sampled one does."""
        return self._tokenizer(text, add_special_tokens=False)["input_ids"] + [self._tokenizer.eos_token_id]

    @torch.no_grad()
    def _loglik(self, rows, candidates, prompt_ids, fields, num_images) -> list[float]:
        """``mean_t log pi(candidate_t | prompt of row r)`` (``algo.gold.LogLik``) for each (row, candidate), one batch."""
        completions = [self._encode_completion(c) for c in candidates]
        batch = self._batch([prompt_ids[r] for r in rows], completions, select_rows(fields, rows, num_images))
        model = self.accelerator.unwrap_model(self.model)
        hidden, targets, mask = self._completion_hidden(model, batch)
        weight = model.get_output_embeddings().weight
        logp, _ = fused_logprobs(hidden.to(weight.dtype), weight, targets, self.loss_spec.replace(with_entropy=False))
        return [float(x.mean()) for x in torch.split(logp, mask.sum(1).tolist())]

    def _batch(self, prompts: list[list[int]], completions: list[list[int]], fields: dict[str, Any]) -> dict[str, Any]:
        """A batch in the layout of TRL's ``_generate_and_score_completions`` output: prompts
        left-padded, completions right-padded, per-token fields over prompt + completion."""
        device, pad_id = self.accelerator.device, self._tokenizer.pad_token_id

        def padded(seqs, value, side):
            return pad([torch.tensor(s) for s in seqs], padding_value=value, padding_side=side).to(device)

        batch = {
            "prompt_ids": padded(prompts, pad_id, "left"),
            "prompt_mask": padded([[1] * len(p) for p in prompts], 0, "left"),
            "completion_ids": padded(completions, pad_id, "right"),
            "completion_mask": padded([[1] * len(c) for c in completions], 0, "right"),
        }
        width = batch["completion_ids"].size(1)
        for k, v in fields.items():
            batch[k] = padded([list(x) + [0] * width for x in v], 0, "left") if isinstance(v, list) else v.to(device)
        return batch

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's ``rewards_per_func[R, K]`` (all processes), the gold rows under the reward
        controls (module docstring); NaN (a function returning None) scores 0 for the gold."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self._gold_step():
            return rewards
        o, k = self.visurf, rewards.shape[1]
        groups = rewards.view(-1, self.num_generations, k).clone()
        rollout, gold = groups[:, :-1], groups[:, -1].nan_to_num(0.0)
        weights = self.reward_weights.to(rewards.device)
        r_star, smoothed = control_gold_rewards(gold, (rollout * weights).nansum(-1), weights, self._think,
                                                eliminate=o.eliminate, smooth=o.smooth)  # fmt: skip
        if o.eliminate and self._think is not None:
            gold[:, self._think] = 0.0
        groups[:, -1] = torch.where(smoothed[:, None], rollout.nanmean(1), gold)
        self._smoothed = smoothed
        self._log("visurf/gold_reward", r_star.mean().item())
        self._log("visurf/smooth_rate", smoothed.float().mean().item())
        return groups.view(-1, k)

    def _log(self, name: str, value: float):
        self._metrics["train" if self.model.training else "eval"][name].append(value)

    # -- the fused loss -------------------------------------------------------------------

    def _completion_hidden(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden[N, H], targets[N], mask[B, C])``: the backbone's last hidden state at the
        position before each completion token (what the LM head turns into its logits)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        extra = {k: batch[k] for k in FORWARD_KEYS if batch.get(k) is not None}
        with self.accelerator.autocast():  # mixed precision as TRL's own forward passes
            out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        c = batch["completion_ids"].size(1)
        mask = batch["completion_mask"].bool()
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()
        return out.last_hidden_state[:, -c - 1 : -1][mask], batch["completion_ids"][mask], mask

    def _token_weights(self, mask: torch.Tensor, inputs) -> torch.Tensor:
        """Per-token ``w[N]`` of TRL's loss type on this micro-batch (module docstring)."""
        train = self.model.training
        ga = self.current_gradient_accumulation_steps if train else 1
        lengths, b = mask.sum(1), mask.size(0)
        num_tokens = float(lengths.sum()) * ga
        if self.loss_type == "dapo":
            num_tokens = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes
            num_tokens *= ga / self.args.steps_per_generation if train else 1
        w = sequence_weights(lengths.cpu(), LOSS_TYPES[self.loss_type], num_seqs=b * ga, num_tokens=num_tokens,
                             max_len=self.max_completion_length)  # fmt: skip
        w = per_token(w, lengths.cpu()).to(mask.device)
        if "importance_sampling_ratio" in inputs:
            w = w * inputs["importance_sampling_ratio"].expand_as(mask)[mask]
        return w

    def _fused_loss(self, model, inputs):
        hidden, targets, mask = self._completion_hidden(model, inputs)
        weight = model.get_output_embeddings().weight
        adv = inputs["advantages"]
        adv = (adv[:, None] if adv.dim() == 1 else adv).expand_as(mask)[mask]
        old = inputs.get("old_per_token_logps")
        gold = inputs.get("visurf_gold")
        objective = None
        if gold is not None and self.visurf.gold_loss != "ppo":  # the gold rows' objective, ppo elsewhere
            objective = gold[:, None].expand_as(mask)[mask].long() * OBJECTIVES.index(self.visurf.gold_loss)
        loss, stats = fused_policy_loss(hidden.to(weight.dtype), weight, targets, old[mask] if old is not None else None,
                                        adv, self._token_weights(mask, inputs), self.loss_spec, objective)  # fmt: skip
        return loss, stats

    def _compute_loss(self, model, inputs):
        """TRL's loss (``fused_loss=False``) or ours through the DDP/FSDP wrapper (so its forward
        hooks fire); logs ``entropy`` and ``clip_ratio/region_mean`` as TRL does."""
        if not self.visurf.fused_loss:
            return super()._compute_loss(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        loss, stats = self._forward_redirection(model, unwrapped, self._fused_loss, unwrapped, inputs)
        n = torch.tensor(float(stats["logp"].numel()), device=stats["logp"].device)
        totals = torch.stack([stats["entropy"].sum(), stats["clipped"].float().sum(), n])
        ent, clipped, n = self.accelerator.reduce(totals, reduction="sum").tolist()
        self._log("entropy", ent / max(n, 1.0))
        self._log("clip_ratio/region_mean", clipped / max(n, 1.0))
        return loss
