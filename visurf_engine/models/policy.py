"""The policy: a Qwen2(.5)-VL model plus its processor, seen as prompts -> completions.

``encode`` turns problems and images into ``Prompts`` once per step; ``collate``
(``models.collate``) turns (prompt, completion) pairs into a padded or packed batch with each
prompt image once. Training never asks the model for logits: ``completion_hidden`` returns the
final hidden states at the positions that predict each completion token, ``[N, H]`` for N
completion tokens, which the fused loss multiplies with the LM head; ``logprobs`` is the
no-grad fused pass over such pairs (old log-probs, align's scoring). Every forward runs in
the policy's ``Precision`` (``models.precision``: autocast to the compute dtype, the fused loss's
inputs cast to it).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from PIL import Image
from transformers import GenerationConfig, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from visurf_kernels import LossSpec, fused_logprobs

from .attention import NAME as PACKED_ATTENTION
from .collate import Batching, SequenceBatch, collate
from .hf import ImageOnlyProcessor
from .decode import decode, static_cache_length
from .precision import Precision
from .prompts import Prompts

__all__ = ["Batching", "Policy", "Prompts", "SequenceBatch", "completion_hidden"]

# generate() takes the static cache's length (newer transformers 5.x); older ones take a StaticCache we size
_SIZED_STATIC_CACHE = hasattr(GenerationConfig(), "max_cache_len")


def completion_hidden(model, batch: SequenceBatch) -> torch.Tensor:
    """Final hidden states ``[N, H]`` of a Qwen2(.5)-VL ``model`` that predict the N completion
    tokens of ``batch``: the vision tower runs on the batch's images, each sequence takes its
    image's embeddings; no logits are formed."""
    inner = model.model
    if batch.cu_seqlens is not None and inner.language_model.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(
            f"a packed batch needs the policy's attention to be {PACKED_ATTENTION!r} (models.attention; "
            f"load_pretrained sets it), not {inner.language_model.config._attn_implementation!r}: "
            f"model.set_attn_implementation({PACKED_ATTENTION!r}), or train.pack=false"
        )
    images = inner.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True).pooler_output
    per_seq = BaseModelOutputWithPooling(pooler_output=[images[i] for i in batch.image_of_seq.tolist()])
    hidden = inner(**batch.lm_kwargs(), mm_encoder_outputs={"image": per_seq}, use_cache=False).last_hidden_state
    return hidden[batch.positions[:, 0], batch.positions[:, 1]]


class Policy:
    def __init__(self, model, processor: ImageOnlyProcessor, device: torch.device | str = "cpu",
                 precision: Precision = Precision()):  # fmt: skip
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        self.precision = precision
        self._cache_length = 0  # the longest static KV cache so far (static_cache_length)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        # A sampled image/video placeholder would be taken for a vision slot in the next forward.
        cfg = model.config
        self.suppressed = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    def autocast(self):
        """The context of every forward: autocast to the compute dtype when it is narrower than
        the weights' (``Precision.autocast``)."""
        return self.precision.autocast(self.device)

    def encode(self, problems: Sequence[str], images: Sequence[Image.Image]) -> Prompts:
        """Chat-template each problem with its image and run the processor."""
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in problems
        ]
        enc = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="left")
        keep = enc["attention_mask"].bool()
        grid = enc["image_grid_thw"]
        pixels = torch.split(enc["pixel_values"], grid.prod(dim=1).tolist())
        return Prompts(
            input_ids=[ids[k] for ids, k in zip(enc["input_ids"], keep)],
            mm_token_type_ids=[t[k] for t, k in zip(enc["mm_token_type_ids"], keep)],
            pixel_values=list(pixels),
            image_grid_thw=list(grid),
            images=list(images),
        )

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a completion text, ending with the end-of-turn token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]


    @torch.no_grad()
    def generate(
        self,
        prompts: Prompts,
        idx: Sequence[int],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        engine: str = "generate",
        cache_implementation: str | None = None,
    ) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """One completion per entry of ``idx`` (repeat an index for G samples), and with the
        ``loop`` engine each completion's sampling log-probs ``[T]`` (else None).

        Each completion ends at (and includes) the end-of-turn token, or is cut at
        ``max_new_tokens``. ``engine``: ``generate`` (transformers'; ``cache_implementation``
        ``"static"``: a preallocated cache of ``static_cache_length`` tokens, whose decode step
        transformers compiles on CUDA) or ``loop`` (``models.decode``: the same decoding without
        generate's per-token machinery).
        """
        lens = [len(prompts.input_ids[i]) for i in idx]
        width = max(lens)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mm = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, (i, n) in enumerate(zip(idx, lens)):
            ids[row, width - n :] = prompts.input_ids[i]
            mm[row, width - n :] = prompts.mm_token_type_ids[i]
            mask[row, width - n :] = 1
        inputs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), mm_token_type_ids=mm.to(self.device),
                      pixel_values=torch.cat([prompts.pixel_values[i] for i in idx]).to(self.device),
                      image_grid_thw=torch.stack([prompts.image_grid_thw[i] for i in idx]).to(self.device))  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        logprobs = None
        with self.autocast():
            if engine == "loop":  # one prefill per distinct prompt (its first row), shared by its samples
                first = {i: row for row, i in reversed(list(enumerate(idx)))}
                uniq = sorted(first.values())
                keep = {k: v[uniq] for k, v in inputs.items() if k != "pixel_values"}
                keep["pixel_values"] = torch.cat([prompts.pixel_values[idx[r]] for r in uniq]).to(self.device)
                rows = torch.tensor([uniq.index(first[i]) for i in idx], device=self.device)
                out, logprobs = decode(self.model, **keep, rows=rows, max_new_tokens=max_new_tokens, eos_id=self.eos_id,
                                       pad_id=self.pad_id, suppressed=self.suppressed, do_sample=do_sample,
                                       temperature=temperature, top_p=top_p)  # fmt: skip
            else:
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=self.eos_id,
                                          pad_token_id=self.pad_id, suppress_tokens=self.suppressed,
                                          **self._sampling(do_sample, temperature, top_p, width + max_new_tokens,
                                                           cache_implementation))[:, width:]  # fmt: skip
        self.model.train(was_training)
        completions = []
        for row in out.tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            completions.append(row[:cut])
        if logprobs is not None:
            logprobs = [lp[: len(c)].cpu() for lp, c in zip(logprobs.float(), completions)]
        return completions, logprobs

    def _sampling(self, do_sample: bool, temperature: float, top_p: float, tokens: int,
                  cache_implementation: str | None) -> dict:  # fmt: skip
        """``generate``'s sampling and cache arguments (``tokens``: prompt width + budget)."""
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
        if cache_implementation == "static":
            self._cache_length = static_cache_length(tokens, self._cache_length)
            if _SIZED_STATIC_CACHE:  # transformers >= 5.2x sizes its own static cache
                sampling |= {"cache_implementation": "static", "max_cache_len": self._cache_length}
            else:
                sampling["past_key_values"] = StaticCache(config=self.model.config.get_text_config(decoder=True),
                                                          max_cache_len=self._cache_length)  # fmt: skip
        elif cache_implementation is not None:
            sampling["cache_implementation"] = cache_implementation
        return sampling

    def collate(
        self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]], batching: Batching
    ) -> SequenceBatch:
        """The sequences ``prompts[idx[s]] + completions[s]`` as one forward's batch (``models.collate``)."""
        return collate(prompts, idx, completions, batching, rope_index=self.model.model.get_rope_index,
                       pad_id=self.pad_id, device=self.device)  # fmt: skip

    def completion_hidden(self, batch: SequenceBatch) -> torch.Tensor:
        """``completion_hidden`` of the policy's model."""
        return completion_hidden(self.model, batch)

    def head_inputs(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused loss's ``hidden[N, H]`` and LM head weight ``[V, H]``, in the compute dtype
        (``Precision.head_inputs``); call under ``autocast``."""
        return self.precision.head_inputs(self.completion_hidden(batch), self.lm_head_weight)

    def batches(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]],
                batching: Batching, parts: Sequence[range] | None = None) -> Iterator[SequenceBatch]:  # fmt: skip
        """The sequences ``prompts[idx[s]] + completions[s]`` collated micro-batch by micro-batch:
        ``parts`` (ranges of sequences), or the micro-batches of ``batching``."""
        if parts is None:
            parts = batching.split([len(prompts.input_ids[p]) + len(c) for p, c in zip(idx, completions)])
        for part in parts:
            yield self.collate(prompts, [idx[s] for s in part], [completions[s] for s in part], batching)

    @torch.no_grad()
    def logprobs(
        self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]], spec: LossSpec,
        batching: Batching,
    ) -> torch.Tensor:  # fmt: skip
        """Per-token ``logp[N]`` of ``completions[s]`` after prompt ``idx[s]`` (the no-grad fused
        pass), in order, in the micro-batches of ``batching``."""
        out = []
        for batch in self.batches(prompts, idx, completions, batching):
            with self.autocast():
                hidden, weight = self.head_inputs(batch)
                out.append(fused_logprobs(hidden, weight, batch.targets, spec)[0])
        return torch.cat(out)
