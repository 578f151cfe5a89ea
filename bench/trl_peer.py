"""TRL's ``GRPOTrainer`` (TRL 1.16) stepped in lockstep with the engine: the peer of ``throughput.py --peer trl``.

Plain GRPO, no ViSurf and no KL (``beta=0``: no reference model), on the engine's config:
the same checkpoint (``model.path`` or the embedded base model), task rows, reward (one TRL
reward function per component of the engine's ``RewardSpec``, weighted as the engine weights
them), G, completion budget, sampling temperature / top-p (top-k off), learning rate, AdamW
betas, weight decay and gradient clip, clip range, advantage normalisation and loss
aggregation (``grpo_args``), one optimizer step per generation (no old-log-prob pass, as the
engine with ``algo.updates_per_step=1``), no gradient checkpointing, fp32 on CPU and bf16
autocast over fp32 weights on CUDA (as the engine). Micro-batches: the engine packs up to
``train.max_tokens_per_micro_batch`` tokens into a forward; TRL takes as many padded rows per
forward as fit that budget at the longest prompt plus the completion budget (``micro_rows``:
the largest divisor of B x G that fits), accumulating gradients over the rest
(``gradient_accumulation_steps`` = ``steps_per_generation``, so it still generates once per
optimizer step and needs no old log-probs).

What differs is TRL's own path, which is what is compared: each prompt is repeated G times
and every row is processed on its own (the chat template and image processor run B x G
times, the vision tower runs once per row), the update runs right-padded rows through the
model's full-vocabulary logits (``[rows, T, V]``) and TRL's ``selective_log_softmax``, with
``attn_implementation="sdpa"``; the engine packs the members of a micro-batch into one row,
runs each prompt image through the vision tower once, and computes the loss from the hidden
states in its fused kernel. TRL's optimizer is its default (``adamw_torch_fused`` where
available); the engine's is ``torch.optim.AdamW``.

What TRL needed to accept the engine's Qwen2.5-VL checkpoint (``docs/embedding.md``): the
processor's tokenizer padding on the left; conversational prompts (``[{"role": "user",
"content": problem}]``) with the image in an ``image`` column, which TRL turns into the
``{"type": "image"}`` block the chat template renders; nothing else.

Timing (``TimedGRPOTrainer``): the step's clock starts when the bench grants the step (the
HF loop then fetches the batch) and stops at ``on_step_end`` (after the optimizer step), so a
TRL step is timed like an engine step. Phases, by TRL method: ``encode`` (``_tokenize_prompts``:
chat template + processor), ``rollout`` (``_generate_single_turn``), ``reward``
(``_calculate_rewards``), ``old_logprobs`` (``_get_per_token_logps_and_entropies`` inside the
generation step: none with these settings), ``update`` (from the end of ``_prepare_inputs`` to
``on_step_end``: forward, loss, backward, clip, optimizer step); the rest of the step (batch
fetch, padding, advantages, TRL's logging) is ``other``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from visurf_engine.config import Config
from visurf_engine.integrations.trl import reward_funcs_from_spec
from visurf_engine.models.hf import load_pretrained
from visurf_engine.rewards import get_reward
from visurf_engine.tasks import load_task
from visurf_engine.telemetry import PhaseTimer

# engine aggregation -> TRL loss type (the inverse of visurf_engine.integrations.trl.LOSS_TYPES, one micro-batch)
LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


def micro_rows(rows: int, row_tokens: int, budget: int) -> int:
    """The largest divisor of ``rows`` whose padded rows of ``row_tokens`` fit ``budget`` tokens (at least 1)."""
    return max(d for d in range(1, rows + 1) if rows % d == 0 and (d == 1 or d * row_tokens <= budget))


def grpo_args(cfg: Config, output_dir: Path, max_steps: int, cuda: bool, rows_per_micro: int):
    """The ``GRPOConfig`` of the engine's ``cfg`` (module docstring)."""
    r, a, t = cfg.rollout, cfg.algo, cfg.train
    accumulate = t.batch_size * r.n // rows_per_micro
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=max_steps, seed=t.seed, report_to=[], save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False,
        dataloader_num_workers=0, log_completions=False,
        num_generations=r.n, per_device_train_batch_size=rows_per_micro, gradient_accumulation_steps=accumulate,
        steps_per_generation=accumulate, num_iterations=1, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=0,
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        adam_beta1=t.betas[0], adam_beta2=t.betas[1], max_grad_norm=t.grad_clip,
        beta=0.0, epsilon=a.eps_low, epsilon_high=a.eps_high, loss_type=LOSS_TYPE[a.aggregation],
        scale_rewards="group" if a.norm_by_std else "none",
    )  # fmt: skip


class TRLSide:
    """One ``GRPOTrainer`` over ``model_dir``, stepped by ``run`` (module docstring)."""

    def __init__(self, cfg: Config, model_dir: Path, output_dir: Path, max_steps: int, device: torch.device):
        spec = get_reward(cfg.data.reward)
        if cfg.algo.kl_coef or cfg.algo.updates_per_step != 1:
            raise ValueError("--peer trl compares plain GRPO: algo.kl_coef=0 and algo.updates_per_step=1")
        rows = load_task(cfg, spec).train
        model, processor = load_pretrained(model_dir, dtype=torch.float32, image_processor=cfg.model.image_processor)
        model.set_attn_implementation("sdpa")
        processor.tokenizer.padding_side = "left"
        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r.problem}], "image": r.image,
                                      "solution": r.solution} for r in rows])  # fmt: skip
        prompt_len = max(len(ids) for ids in processor(
            text=[processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.problem}]}],
                                                add_generation_prompt=True, tokenize=False) for r in rows[:32]],
            images=[r.image for r in rows[:32]])["input_ids"])  # fmt: skip
        self.rows_per_micro = micro_rows(cfg.train.batch_size * cfg.rollout.n, prompt_len + cfg.rollout.max_new_tokens,
                                         cfg.train.max_tokens_per_micro_batch)  # fmt: skip
        args = grpo_args(cfg, output_dir, max_steps, device.type == "cuda", self.rows_per_micro)
        args.reward_weights = [spec.weights[c] for c in spec.components]
        side = self

        class Lockstep(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                control.should_training_stop = not side._begin_step()

            def on_step_end(self, args, state, control, **kw):
                side._end_step()
                control.should_training_stop = not side._begin_step()

        self.trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_funcs_from_spec(spec), args=args,
                                        train_dataset=dataset, processing_class=processor, callbacks=[Lockstep()])  # fmt: skip
        self.device, self.model = device, model
        self._next: Callable[[], int | None] | None = None
        self._report: Callable[[dict], None] | None = None

    def run(self, next_step: Callable[[], int | None], report: Callable[[dict], None]) -> None:
        """Train until ``next_step()`` returns None; ``report`` gets each step's metrics."""
        self._next, self._report = next_step, report
        self.trainer.train()

    def _begin_step(self) -> bool:
        if self._next() is None:
            return False
        self.trainer.bench_begin(PhaseTimer(self.device))
        return True

    def _end_step(self) -> None:
        self._report(self.trainer.bench_end())


class TimedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose step phases go to the bench's ``PhaseTimer`` (module docstring)."""

    _timer: PhaseTimer | None = None

    def bench_begin(self, timer: PhaseTimer) -> None:
        self._timer, self._in_prepare, self._update, self._counts = timer, False, None, {}

    def bench_end(self) -> dict[str, float]:
        if self._update is not None:
            self._update.__exit__(None, None, None)
            self._update = None
        return self._timer.metrics() | self._counts

    def _phase(self, name: str):
        return self._timer(name) if self._timer is not None else contextlib.nullcontext()

    def _prepare_inputs(self, generation_batch):
        self._in_prepare = True
        try:
            inputs = super()._prepare_inputs(generation_batch)
        finally:
            self._in_prepare = False
        if self.model.training and self._timer is not None and self._update is None:
            self._update = self._timer("update")  # closed at on_step_end: forwards, losses, backwards, optimizer
            self._update.__enter__()
        return inputs

    def _tokenize_prompts(self, prompts):
        with self._phase("encode"):
            return super()._tokenize_prompts(prompts)

    def _generate_single_turn(self, *args, **kwargs):
        with self._phase("rollout"):
            return super()._generate_single_turn(*args, **kwargs)

    def _calculate_rewards(self, *args, **kwargs):
        with self._phase("reward"):
            return super()._calculate_rewards(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with self._phase("old_logprobs") if self._in_prepare else contextlib.nullcontext():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            completion, prompt, rows = float(out["completion_mask"].sum()), float(out["prompt_mask"].sum()), len(inputs)
            self._counts = {"tokens/generated": completion, "tokens/trained": completion, "tokens/prompt": prompt,
                            "tokens/prefill": prompt, "seqs/generated": rows, "seqs/trained": rows,
                            "tokens/padded": float(out["prompt_ids"].numel() + out["completion_ids"].numel())}  # fmt: skip
        return out
