"""The step of the design (``docs/design.md`` §4), top to bottom:

    sample -> rollout -> score -> gold -> advantages -> (reference log-probs) -> learner update
    -> weight sync -> log / evaluate / checkpoint

One ``Trainer`` runs every registered paradigm (``algo.paradigms``: the step's phase says what
it trains on), with one learner (``learners.build_learner``) and one rollout engine
(``rollout.build_rollout``), both chosen at construction and never asked which. Each rank
takes 1/dp of the step's prompts (dp: the learner's data-parallel view of the world); loss
weights are normalised over the global batch; the ranks of one model-parallel replica train on
the same members (``learner.share``) and every rank runs the learner's passes on the same
number of micro-batches (``learners.lockstep_split``). The base model must exist
(``tasks.prepare_base_model``): building a trainer never trains. ``algo.kl_coef > 0`` adds the
frozen reference's log-probs (``learners.build_reference``). On CUDA the memory plan is checked
first (``plan.check_memory``). A non-finite loss or grad norm skips the optimizer step on every
rank; ``nonfinite.SkipCounter`` counts it and stops the run after ``train.max_skipped_steps``.
``trainer.cfg`` has ``rollout.backend=auto`` resolved (``rollout.auto``); checkpoints record the config as given.

``step`` returns the step's metrics, among them each phase's wall time and peak memory
(``time/<phase>``, ``mem/<phase>``: ``telemetry.PhaseTimer``) and this rank's token counts:
``tokens/generated`` (rollout completions), ``tokens/trained`` (every member's completion, the
gold's included) and ``tokens/prompt`` (the prompt in front of each member).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .algo.gold import make_gold
from .algo.members import Members, member_weights, part_counts
from .algo.paradigms import GroupRewards, Phase, get_paradigm
from .algo.update_stats import UpdateStats
from .config import Config
from .data import PromptSampler, Row, fetch_rows
from .eval.evaluate import evaluate
from .learners import build_learner, build_reference, lockstep_split, make_micro_batch, parallel_world
from .lr_schedule import lr_at
from .models.hf import load_processor
from .models.policy import Batching, Policy, Prompts
from .models.precision import Precision
from .parallel.world import World, all_reduce_sum
from .plan import check_memory
from .rewards import get_reward, score_batch
from .rng import seed_everything
from .rollout import build_rollout
from .rollout.auto import resolve_for_run
from .tasks import base_model_path, load_task
from .tasks.shapes.probe import probe_row_metrics
from .nonfinite import NonFiniteError, SkipCounter
from .telemetry import MetricsLogger, PhaseTimer

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, world: World = World()):
        self.given_cfg, self.world = cfg, world
        t = cfg.train
        torch.set_num_threads(t.threads or torch.get_num_threads())
        self.dp = parallel_world(cfg, world)
        if t.batch_size % self.dp.size:
            raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the data-parallel size {self.dp.size}")
        path = base_model_path(cfg)
        self.cfg = cfg = resolve_for_run(cfg, world.device.type, path, log_choice=world.is_main)
        seed_everything(t.seed + self.dp.rank)
        self.spec = get_reward(cfg.data.reward)
        self.data = load_task(cfg, self.spec)
        if world.device.type == "cuda" and t.memory_check:
            self.plan = check_memory(cfg, path, world.size, world.device)
        precision = Precision.of(cfg.model.dtype, cfg.model.compute_dtype, world.device)
        self.loss_spec = cfg.loss_spec()
        processor = load_processor(path, cfg.model.image_processor)
        self.learner = build_learner(cfg, path, processor, precision, self.loss_spec, self.dp)
        self.policy = self.learner.policy
        self.reference = build_reference(cfg, path, self.learner)  # None without a KL penalty
        if t.pack and not self.learner.packs:
            log.info("model.backend=%s trains padded rows: train.pack does not apply", cfg.model.backend)
        self.batching = Batching(pack=t.pack and self.learner.packs, vision_once=t.vision_once,
                                 max_tokens=t.max_tokens_per_micro_batch, max_seqs=t.micro_batch_size,
                                 share_prompts=t.share_prompts)  # fmt: skip
        self.paradigm = get_paradigm(cfg.algo.paradigm)
        self.knobs = dataclasses.asdict(cfg.algo)  # what the paradigm's phases read
        self.sft_steps = cfg.algo.sft_steps if cfg.algo.sft_steps >= 0 else t.steps // 2
        self.sampler = PromptSampler(len(self.data.train), t.seed)
        self.out = Path(t.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.start_step, self.base_eval, self.final_eval = 0, None, None
        self.skips = SkipCounter(t.max_skipped_steps, world.rank)  # the non-finite guard's skipped steps
        self._resume()
        self.rollout = build_rollout(cfg, self.policy, path, self.learner, self.batching)  # holds the resumed weights
        self.metrics = MetricsLogger(self.out, enabled=world.is_main, resume_step=self.start_step or None)
        if self.data.skipped and not self.start_step:
            self.metrics.log(0, {"data/skipped_rows": self.data.skipped})

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return
        if not self.cfg.train.resume:
            raise FileExistsError(f"{self.ckpt_root} already holds a run; pass train.resume=true to continue it, "
                                  "or choose another train.output_dir")  # fmt: skip
        state = ckpt.load_checkpoint(latest, self.learner, self.world.rank)
        self.sampler.load(state["sampler"])
        self.start_step, self.base_eval = state["step"], state.get("base_eval")
        self.skips.load(state.get("skips", self.skips.state()))
        if self.start_step == self.cfg.train.steps:
            self.final_eval = state.get("final_eval")
        log.info("resumed from %s at step %d", latest, self.start_step)

    # -- one step -------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, a, dp = self.cfg, self.cfg.algo, self.dp
        timer = PhaseTimer(self.world.device)
        phase = self.paradigm.phase(step, self.sft_steps)
        m: dict[str, float] = {"phase/sft": float(phase.name == "sft"), "reward/failures": 0.0}
        scales = phase.scales(step, self.knobs)
        self.learner.set_lr(lr_at(step, cfg.train))
        with timer("data"):
            rows, m["data/bad_images"] = self._rows(step)
        with timer("encode"):
            prompts = self.policy.encode([r.problem for r in rows], [r.image for r in rows])
        rollouts = rollout_logp = texts = gold_tokens = None
        rewards = GroupRewards(len(rows))
        if phase.rollouts:
            with timer("rollout"):
                sampled = self.rollout.sample(prompts, cfg.rollout.n)
            rollouts, rollout_logp = sampled.tokens, sampled.logprobs
            with timer("reward"):
                texts, rewards, scored, failures = self._score_rollouts(rows, rollouts)
                m |= scored
                m["reward/failures"] += failures
        if phase.gold:
            with timer("gold"):
                gold_tokens, rewards, scored, failures = self._gold(phase, rows, prompts, texts, rewards)
                m |= scored
                m["reward/failures"] += failures
        rollout_adv, gold_adv = phase.advantages(rewards, norm_by_std=a.norm_by_std, eps=a.adv_eps)
        if phase.scored_gold:
            m["adv/gold"] = gold_adv.mean().item()
        if rollout_adv is not None:
            m["adv/rollout_abs"] = rollout_adv.abs().mean().item()
        members = self.learner.share(phase.members(self.knobs, rewards, rollouts, rollout_adv, gold_tokens, gold_adv,
                                                   rollout_logp))  # fmt: skip
        m |= {"members/rollouts": float((~members.gold).sum()), "members/gold": float(members.gold.sum())}
        if len(scales) > 1:
            m["loss/sft_scale"] = scales[1]
        if self.reference is not None:
            with timer("reference"):
                ref = self.reference.logprobs(prompts, members.prompt.tolist(), members.tokens, self.batching)
                members.ref_logp = list(torch.split(ref, members.lengths.tolist()))
        if a.updates_per_step > 1:  # later mini-batches are off-policy: keep the pre-update log-probs
            with timer("old_logprobs"):
                old = self.learner.logprobs(prompts, members.prompt.tolist(), members.tokens, self.batching)
                members.old_logp = list(torch.split(old, members.lengths.tolist()))
        with timer("update"):
            m |= self._update(step, prompts, members, members.labels([r.id for r in rows]), scales)
        with timer("sync"):
            self.rollout.sync_weights(self.learner.export_weights())
        lengths, gold = members.lengths.numpy(), members.gold.numpy()
        m["len/rollout"] = float(np.mean(lengths[~gold])) if (~gold).any() else float("nan")
        m["len/gold"] = float(np.mean(lengths[gold])) if gold.any() else float("nan")
        m["tokens/generated"] = float(sum(len(c) for group in rollouts for c in group)) if rollouts else 0.0
        m["tokens/prompt"] = float(sum(len(prompts.input_ids[p]) for p in members.prompt.tolist()))
        m |= {"tokens/trained": float(lengths.sum()), "lr": self.learner.lr}
        return m | timer.metrics()

    def _rows(self, step: int) -> tuple[list[Row], float]:
        """This rank's share of the step's prompts, images decoded, and the number of rows (over
        all ranks) whose image did not decode: they raise or, under ``data.on_bad_row=skip``,
        are replaced by ``PromptSampler.replacement`` draws (the same on every rank and on resume)."""
        per_rank = self.cfg.train.batch_size // self.dp.size
        first = self.dp.rank * per_rank
        indices = self.sampler.next(self.cfg.train.batch_size)[first : first + per_rank]
        rows, bad = fetch_rows(self.data.train, indices, self.cfg.data.on_bad_row,
                               lambda slot, attempt: self.sampler.replacement(step, first + slot, attempt))  # fmt: skip
        for b in bad:
            log.warning("step %d: skipped bad row, drew another: %s", step + 1, b)
        return rows, float(all_reduce_sum(torch.tensor([float(len(bad))], dtype=torch.float64), self.dp)[0])

    def _score_rollouts(self, rows: list[Row], rollouts: list[list[list[int]]]):
        """Decoded texts ``[B][G]``, the rollouts' ``GroupRewards``, their metrics and failure count."""
        g = self.cfg.rollout.n
        flat = self.policy.tokenizer.batch_decode([c for group in rollouts for c in group], skip_special_tokens=True)
        sb = score_batch(self.spec, flat, [r.solution for r in rows for _ in range(g)], [r.id for r in rows for _ in range(g)])
        reward = sb.total.view(len(rows), g)
        m = {f"reward/{n}": float(v) for n, v in zip(sb.names, sb.components.mean(0))}
        m |= {"reward/rollout_mean": reward.mean().item(), "reward/rollout_max": reward.max(1).values.mean().item()}
        solved = self.spec.solved(sb.components).view(len(rows), g)
        return [flat[b * g : (b + 1) * g] for b in range(len(rows))], GroupRewards(len(rows), reward, solved=solved), m, len(sb.failures)

    def _gold(self, phase: Phase, rows: list[Row], prompts: Prompts, texts, rewards: GroupRewards):
        """The gold's tokens, the group rewards with the gold's, its metrics and failure count."""
        a = self.cfg.algo

        def loglik(idx: list[int], candidates: list[str]) -> list[float]:  # per-token mean; rank-local (the rollout engine)
            tokens = [self.policy.encode_text(c) for c in candidates]
            return [float(x.mean()) for x in self.rollout.logprobs(prompts, idx, tokens)]

        c = phase.controls  # off: the gold in the dataset's style, scored raw
        gold = make_gold(self.spec, [r.solution for r in rows], [r.id for r in rows], texts, rewards.rollout,
                         align=a.align and c, align_style=a.align_style, eliminate=a.eliminate and c, smooth=a.smooth and c,
                         scored=phase.scored_gold, loglik=loglik)  # fmt: skip
        m = {"gold/aligned_share": float(np.mean([s != self.spec.dataset_style for s in gold.styles]))}
        if phase.scored_gold:
            m |= {"reward/gold": gold.rewards.mean().item(), "gold/smooth_rate": gold.smoothed.float().mean().item()}
            rewards = GroupRewards(len(rows), rewards.rollout, gold.rewards, gold.smoothed, rewards.solved)
        return [self.policy.encode_text(t) for t in gold.texts], rewards, m, gold.failures

    def _update(self, step: int, prompts: Prompts, members: Members, labels: list[str],
                scales: tuple[float, ...]) -> dict[str, float]:  # fmt: skip
        """``algo.updates_per_step`` optimizer steps over ``members`` (sample ids ``labels``; loss
        parts scaled by ``scales``), in micro-batches (with more than one, against the pre-update
        log-probs ``step`` put in ``members.old_logp``).

        With the engine's sampling log-probs it also measures the rollout/trainer mismatch on
        this rank's rollout tokens (``algo.mismatch``) against the pre-update log-probs: the
        update's own ``logp`` (one update per step) or the old-log-prob pass, no extra forward."""
        cfg, a = self.cfg, self.cfg.algo
        stats_of_update = UpdateStats(a.kl_estimator, self.loss_spec.tis_cap)
        for chunk in np.array_split(np.arange(len(members)), a.updates_per_step):
            part = members.select(chunk.tolist())
            counts = all_reduce_sum(part_counts(part, len(scales)), self.dp)
            weights = member_weights(part, a.aggregation, counts, scales, cfg.rollout.max_new_tokens)
            tokens = (part.lengths + torch.tensor([len(prompts.input_ids[p]) for p in part.prompt.tolist()])).tolist()
            micro = [(part.select(r), weights[r.start : r.stop]) for r in lockstep_split(self.batching, tokens, self.dp)]
            batches = [make_micro_batch(self.policy, prompts, x, w, self.batching) for x, w in micro]
            finite = True
            for (x, _), (loss, stats) in zip(micro, self.learner.forward_backward(batches)):
                finite &= math.isfinite(loss.item())
                stats_of_update.add(x, loss, stats)
            update = self.learner.step(cfg.train.grad_clip, loss_finite=finite)
            stats_of_update.add_step(update.grad_norm)
            self.skips.count(step, update.skipped, update.grad_norm, [labels[j] for j in chunk])
        out = stats_of_update.metrics(a.updates_per_step)
        return out | {"train/skipped_steps": self.skips.total}

    # -- the run --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, plus the forgetting probe's when the task has one, on every rank
        (each generates for its share of the rows: ``eval.evaluate``)."""
        result = evaluate(self.policy, self.rollout, self.data.eval,
                          lambda texts, rows: self.spec.metrics(texts, [r.solution for r in rows]), self.world)  # fmt: skip
        if self.data.probe:
            result |= evaluate(self.policy, self.rollout, self.data.probe, probe_row_metrics, self.world)
        return result

    def save(self, step: int) -> None:
        """Checkpoint ``step``, after making the metrics logged so far durable (``telemetry``)."""
        state = {"step": step, "sampler": self.sampler.state(), "base_eval": self.base_eval,
                 "final_eval": self.final_eval, "skips": self.skips.state(), "config": self.given_cfg.to_dict()}  # fmt: skip
        self.metrics.sync()
        ckpt.save(self.ckpt_root, step, self.learner, state, self.world, keep=self.cfg.train.keep_checkpoints)

    def run(self) -> dict[str, dict[str, float]]:
        """Train to ``train.steps``; returns ``{"base": ..., "final": ...}`` held-out metrics.

        At step N the order is: train line, evaluation line (the final evaluation at the last
        step), checkpoint; so checkpoint N holds everything logged at steps <= N and nothing
        later, the rule a resumed run's metrics are cut back by (``telemetry``).
        """
        t = self.cfg.train
        if self.base_eval is None:
            self.base_eval = self.evaluate()
            self.metrics.log(0, {f"eval/{k}": v for k, v in self.base_eval.items()})
        bar = tqdm(
            range(self.start_step, t.steps), initial=self.start_step, total=t.steps,
            desc=f"{self.cfg.algo.paradigm}", disable=not (t.progress and self.world.is_main), dynamic_ncols=True,
        )
        self.policy.model.train()
        for step in bar:
            m = self.step(step)
            self.metrics.log(step + 1, m)
            bar.set_postfix(reward=f"{m.get('reward/rollout_mean', float('nan')):.2f}", loss=f"{m['loss']:.3f}")
            done = step + 1
            try:
                self.skips.check(done, ckpt.latest_checkpoint(self.ckpt_root))
            except NonFiniteError:
                self.metrics.close()
                raise
            if done == t.steps:
                self.final_eval = self.evaluate()
                self.metrics.log(done, {f"eval/{k}": v for k, v in self.final_eval.items()})
            elif t.eval_every and done % t.eval_every == 0:
                self.metrics.log(done, {f"eval/{k}": v for k, v in self.evaluate().items()})
            if t.save_every and done % t.save_every == 0 or done == t.steps:
                self.save(done)
        if self.final_eval is None:  # resumed at train.steps from a checkpoint of a longer run
            self.final_eval = self.evaluate()
            self.metrics.log(t.steps, {f"eval/{k}": v for k, v in self.final_eval.items()})
        self.metrics.close()
        return {"base": self.base_eval, "final": self.final_eval}
