"""The step loop (DESIGN.md §4): rollout -> rewards -> advantages -> (old log-probs) ->
update -> weight sync -> log / evaluate / checkpoint.

One ``Trainer`` runs every paradigm: ``sft`` (gold only), ``rlvr`` (G rollouts),
``visurf`` (G rollouts + the reward-controlled gold), ``sft_then_rlvr`` (phases by step).
Data parallel: each rank takes 1/world of the step's prompts, loss weights are normalised
over the global batch and gradients are SUM-reduced before the optimizer step.
``model.backend=megatron``: the update runs on megatron-core (``parallel.tp`` x
``parallel.pp`` model parallel, data parallel over the rest; ``models.megatron.learner``),
the HF model is the rollout / scoring / evaluation replica and receives the weights after
every update; the ranks of one model-parallel group train on the same members.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .algo.loss import loss_inputs, members_logprobs, members_loss
from .algo.paradigms import Member, assign_advantages, build_members, phase_of, sequence_weights
from .algo.reward_control import choose_style, control_gold_rewards
from .base_model import embedded_base_model
from .config import Config
from .data import LoadResult, Row, load_rows, shapes
from .eval.evaluate import evaluate, evaluate_probe
from .models.hf import load_pretrained
from .models.policy import Policy, Prompts
from .parallel.data_parallel import World, all_reduce_grads, all_reduce_sum, barrier
from .rewards import get_reward, score_batch
from .rollout.hf import HFRollout
from .telemetry import MetricsLogger

log = logging.getLogger(__name__)


class PromptSampler:
    """Epoch-wise seeded permutations of the training rows; its state is two integers."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _perm(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self, k: int) -> list[int]:
        out, perm = [], self._perm()
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                perm = self._perm()
            take = min(k - len(out), self.n - self.pos)
            out += perm[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def load_datasets(cfg: Config, spec) -> tuple[list[Row], list[Row], int]:
    """``(train rows, eval rows, number of skipped bad rows)``."""
    d = cfg.data
    if d.task == "shapes":
        return (
            shapes.make_split(d.train_size, seed=d.seed, absent_ratio=d.absent_ratio),
            shapes.make_split(d.eval_size, seed=d.seed + 1, absent_ratio=d.absent_ratio),
            0,
        )
    results: list[LoadResult] = [load_rows(p, spec.parse_solution, d.on_bad_row) for p in (d.train_path, d.eval_path) if p]
    for bad in (b for res in results for b in res.skipped):
        log.warning("skipped bad row: %s", bad)
    train = results[0].rows
    evals = results[1].rows if d.eval_path else train[: d.eval_size]
    return train, evals[: d.eval_size], sum(len(r.skipped) for r in results)


class Trainer:
    def __init__(self, cfg: Config, world: World = World()):
        self.cfg, self.world = cfg, world
        t, a = cfg.train, cfg.algo
        self.dp = world  # the data-parallel view: prompts are split over it
        if cfg.model.backend == "megatron":
            from .parallel.megatron import init_megatron  # megatron-core: the optional [megatron] extra

            self.dp = init_megatron(world, cfg.parallel.tp, cfg.parallel.pp, t.seed)
        if t.batch_size % self.dp.size:
            raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the data-parallel size {self.dp.size}")
        # Built (or found in the cache) before seeding: building draws from the global RNG,
        # and a run must not depend on whether the cache already existed.
        path = cfg.model.path or embedded_base_model(cfg, progress=t.progress and world.is_main)
        _seed_everything(t.seed + self.dp.rank)
        self.spec = get_reward(cfg.data.reward)
        self.train_rows, self.eval_rows, self.skipped_rows = load_datasets(cfg, self.spec)
        # forgetting probe: held-out count / colour questions, never in the post-training data
        self.probe_rows = shapes.make_probe_split(cfg.data.probe_size, seed=cfg.data.seed + 1)
        dtype = torch.float32 if cfg.model.dtype != "bfloat16" else torch.bfloat16
        model, processor = load_pretrained(path, dtype=dtype, image_processor=cfg.model.image_processor)
        self.policy = Policy(model.to(world.device), processor, world.device)
        self.rollout = HFRollout(self.policy, cfg.rollout)
        self.learner = None
        if cfg.model.backend == "megatron":
            from .models.megatron.convert import Layout
            from .models.megatron.learner import MegatronLearner

            layout = Layout.from_hf_config(model.config, cfg.parallel.tp, cfg.parallel.pp)
            self.learner = MegatronLearner(model, layout, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
            self.optimizer = self.learner.optimizer
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.sampler = PromptSampler(len(self.train_rows), t.seed)
        self.sft_steps = a.sft_steps if a.sft_steps >= 0 else t.steps // 2
        self.weights = torch.tensor([self.spec.weights[c] for c in self.spec.components])
        self.think_index = self.spec.components.index(self.spec.think_component) if self.spec.think_component else None
        self.out = Path(t.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.start_step, self.base_eval = 0, None
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if t.resume and latest is not None:
            state = ckpt.load_checkpoint(latest, model, self.optimizer, world.rank)
            if self.learner is not None:
                self.learner.load_from(model)
            self.sampler.load(state["sampler"])
            self.start_step, self.base_eval = state["step"], state.get("base_eval")
            log.info("resumed from %s at step %d", latest, self.start_step)
        elif latest is not None:
            raise FileExistsError(
                f"{self.ckpt_root} already holds a run; pass train.resume=true to continue it, "
                "or choose another train.output_dir"
            )
        self.metrics = MetricsLogger(self.out, enabled=world.is_main, resume=self.start_step > 0)
        if self.skipped_rows:
            self.metrics.log(0, {"data/skipped_rows": self.skipped_rows})

    # -- one step -------------------------------------------------------------------------
    def _autocast(self):
        if self.world.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gold_texts(self, rows: list[Row], rollout_texts: list[list[str]] | None, prompts: Prompts) -> tuple[list[str], list[str]]:
        """The gold completion text of each prompt, rendered under the *align* control."""
        a, texts, styles = self.cfg.algo, [], []
        for b, row in enumerate(rows):
            candidates = {s: self.spec.render(row.solution, s) for s in self.spec.styles}

            def loglik(cands: list[str], b=b) -> list[float]:
                members = [Member(b, self.policy.encode_text(c), 0.0) for c in cands]
                logp = members_logprobs(self.policy, prompts, members, temperature=self.cfg.rollout.temperature, backend=self.cfg.loss.backend)
                return [float(x.sum()) for x in torch.split(logp, [len(m.tokens) for m in members])]

            style = choose_style(
                self.spec, rollout_texts[b] if rollout_texts else [], candidates,
                align=a.align, align_style=a.align_style, loglik=loglik,
            )
            texts.append(candidates[style])
            styles.append(style)
        return texts, styles

    def step(self, step: int) -> dict[str, float]:
        cfg, a, world = self.cfg, self.cfg.algo, self.dp
        timer = _Timer()
        per_rank = cfg.train.batch_size // world.size
        idx = self.sampler.next(cfg.train.batch_size)[world.rank * per_rank : (world.rank + 1) * per_rank]
        rows = [self.train_rows[i] for i in idx]
        phase = phase_of(a.paradigm, step, self.sft_steps)
        m: dict[str, float] = {"phase/sft": float(phase == "sft")}
        with timer("encode"):
            prompts = self.policy.encode([r.problem for r in rows], [r.image for r in rows])
        rollouts = rollout_rewards = rollout_texts = None
        failures = 0
        if phase != "sft":
            with timer("rollout"), self._autocast():
                rollouts = self.rollout.sample(prompts)
            with timer("reward"):
                g = cfg.rollout.n
                flat = self.policy.tokenizer.batch_decode([c for group in rollouts for c in group], skip_special_tokens=True)
                rollout_texts = [flat[b * g : (b + 1) * g] for b in range(len(rows))]
                sb = score_batch(self.spec, flat, [r.solution for r in rows for _ in range(g)], [r.id for r in rows for _ in range(g)])
                rollout_rewards = sb.total.view(len(rows), g)
                failures += len(sb.failures)
                m |= {f"reward/{n}": float(v) for n, v in zip(sb.names, sb.components.mean(0))}
                m |= {"reward/rollout_mean": rollout_rewards.mean().item(), "reward/rollout_max": rollout_rewards.max(1).values.mean().item()}
        gold_tokens = gold_rewards = smoothed = None
        if phase in ("sft", "visurf"):
            with timer("gold"):
                gold_texts, styles = self._gold_texts(rows, rollout_texts, prompts)
                gold_tokens = [self.policy.encode_text(t) for t in gold_texts]
                m["gold/aligned_share"] = float(np.mean([s != self.spec.dataset_style for s in styles]))
                if phase == "visurf":
                    gsb = score_batch(self.spec, gold_texts, [r.solution for r in rows], [f"{r.id}:gold" for r in rows])
                    failures += len(gsb.failures)
                    gold_rewards, smoothed = control_gold_rewards(
                        gsb.components, rollout_rewards, self.weights, self.think_index, eliminate=a.eliminate, smooth=a.smooth
                    )
                    m |= {"reward/gold": gold_rewards.mean().item(), "gold/smooth_rate": smoothed.float().mean().item()}
        rollout_adv, gold_adv = assign_advantages(
            phase, len(rows), rollout_rewards, gold_rewards, smoothed, norm_by_std=a.norm_by_std, eps=a.adv_eps
        )
        if gold_adv is not None and phase == "visurf":
            m["adv/gold"] = gold_adv.mean().item()
        if rollout_adv is not None:
            m["adv/rollout_abs"] = rollout_adv.abs().mean().item()
        members = build_members(
            rollouts, rollout_adv, gold_tokens, gold_adv, gold_logprob_loss=phase == "sft" or a.gold_loss == "logprob"
        )
        if self.learner is not None:
            from .parallel.megatron import broadcast_from_model_parallel_source

            members = broadcast_from_model_parallel_source(members)
        with timer("update"):
            m |= self._update(prompts, members)
        self.rollout.sync_weights()
        m["reward/failures"] = float(failures)
        m["len/rollout"] = float(np.mean([len(x.tokens) for x in members if not x.gold])) if rollouts else float("nan")
        m["len/gold"] = float(np.mean([len(x.tokens) for x in members if x.gold])) if gold_tokens else float("nan")
        m["lr"] = self.optimizer.param_groups[0]["lr"]
        return m | timer.metrics()

    def _update(self, prompts: Prompts, members: list[Member]) -> dict[str, float]:
        """``updates_per_step`` optimizer steps over ``members``, micro-batched."""
        cfg, a = self.cfg, self.cfg.algo
        lengths = torch.tensor([len(x.tokens) for x in members])
        old_logp = None
        if a.updates_per_step > 1:  # later mini-batches are off-policy: keep the pre-update log-probs
            with self._autocast():
                old_logp = torch.cat(
                    [members_logprobs(self.policy, prompts, members[i : i + cfg.train.micro_batch_size],
                                      temperature=cfg.rollout.temperature, backend=cfg.loss.backend)
                     for i in range(0, len(members), cfg.train.micro_batch_size)]
                )
        token_start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        sums = defaultdict(float)
        for chunk in np.array_split(np.arange(len(members)), a.updates_per_step):
            chunk = chunk.tolist()
            counts = all_reduce_sum(torch.tensor([len(chunk), int(lengths[chunk].sum())], dtype=torch.float64), self.dp)
            weights = sequence_weights(
                lengths[chunk], a.aggregation, num_seqs=int(counts[0]), num_tokens=int(counts[1]), max_len=cfg.rollout.max_new_tokens
            )
            self.optimizer.zero_grad(set_to_none=True)
            sels = [chunk[j : j + cfg.train.micro_batch_size] for j in range(0, len(chunk), cfg.train.micro_batch_size)]
            olds = [None if old_logp is None else torch.cat([old_logp[token_start[i] : token_start[i + 1]] for i in sel]) for sel in sels]
            for sel, (loss, stats, mb_len) in zip(sels, self._backward(prompts, members, sels, weights, olds)):
                rollout_tok = torch.repeat_interleave(torch.tensor([not members[i].gold for i in sel]), mb_len).to(stats["logp"].device)
                sums["loss"] += loss.item()
                sums["clipped"] += stats["clipped"].float().sum().item()
                sums["tokens"] += float(mb_len.sum())
                sums["entropy"] += stats["entropy"][rollout_tok].sum().item()
                sums["rollout_tokens"] += rollout_tok.sum().item()
            if self.learner is not None:
                sums["grad_norm"] += self.learner.step(cfg.train.grad_clip)
            else:
                all_reduce_grads(self.policy.model, self.world)
                sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), cfg.train.grad_clip).item()
                self.optimizer.step()
        if self.learner is not None:  # weight sync: the HF replica samples the next step
            self.learner.export_to(self.policy.model)
        n = a.updates_per_step
        out = {"loss": sums["loss"] / n, "grad_norm": sums["grad_norm"] / n, "clip_frac": sums["clipped"] / max(sums["tokens"], 1)}
        out["entropy"] = sums["entropy"] / sums["rollout_tokens"] if sums["rollout_tokens"] else float("nan")
        return out

    def _backward(self, prompts: Prompts, members: list[Member], sels: list[list[int]], weights: torch.Tensor, olds: list):
        """Forward + backward of micro-batches ``sels`` (member indices; ``weights`` over their
        concatenation, ``olds`` their old log-probs); ``(loss, stats, lengths)`` per micro-batch."""
        cfg, a = self.cfg, self.cfg.algo
        kw = dict(temperature=cfg.rollout.temperature, eps_low=a.eps_low, eps_high=a.eps_high,
                  dual_clip=a.dual_clip, backend=cfg.loss.backend, with_entropy=True)
        starts = np.cumsum([0] + [len(sel) for sel in sels]).tolist()
        mbs = [([members[i] for i in sel], weights[s : s + len(sel)], old) for sel, s, old in zip(sels, starts, olds)]
        if self.learner is not None:  # megatron: every micro-batch through the pipeline schedule
            return self.learner.forward_backward([loss_inputs(self.policy, prompts, *mb) for mb in mbs], **kw)
        out = []
        for mb, w, old in mbs:
            with self._autocast():
                loss, stats, mb_len = members_loss(self.policy, prompts, mb, w, old_logp=old, **kw)
            loss.backward()
            out.append((loss.detach(), stats, mb_len))
        return out

    # -- the run --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, plus the forgetting probe's when ``data.probe_size`` > 0 (rank 0
        evaluates; the others wait)."""
        result = {}
        if self.world.is_main:
            with self._autocast():
                result = evaluate(self.policy, self.rollout, self.spec, self.eval_rows)
                if self.probe_rows:
                    result |= evaluate_probe(self.policy, self.rollout, self.probe_rows)
        barrier(self.world)
        return result

    def save(self, step: int) -> None:
        state = {"step": step, "sampler": self.sampler.state(), "base_eval": self.base_eval, "config": self.cfg.to_dict()}
        sharded = self.learner is not None  # megatron: each rank's optimizer holds its own shards
        tmp = ckpt.save_checkpoint(self.ckpt_root, step, self.policy.model, None if sharded else self.optimizer, state, self.world.rank)
        barrier(self.world)
        ckpt.save_rng(tmp, self.world.rank)
        if sharded:
            ckpt.save_optimizer_shard(tmp, self.world.rank, self.optimizer)
        barrier(self.world)
        if self.world.is_main:
            ckpt.commit_checkpoint(self.ckpt_root, step)
        barrier(self.world)

    def run(self) -> dict[str, dict[str, float]]:
        """Train to ``train.steps``; returns ``{"base": ..., "final": ...}`` held-out metrics."""
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
            if t.eval_every and done % t.eval_every == 0 and done < t.steps:
                self.metrics.log(done, {f"eval/{k}": v for k, v in self.evaluate().items()})
            if t.save_every and done % t.save_every == 0 or done == t.steps:
                self.save(done)
        final = self.evaluate()
        self.metrics.log(t.steps, {f"eval/{k}": v for k, v in final.items()})
        self.metrics.close()
        return {"base": self.base_eval, "final": final}


class _Timer:
    """Wall time per named phase of a step (``time/<phase>`` metrics)."""

    def __init__(self):
        self.times, self.t0 = {}, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return self.times | {"time/step": time.perf_counter() - self.t0}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
