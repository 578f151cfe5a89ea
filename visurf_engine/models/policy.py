"""The policy: a Qwen2(.5)-VL model plus its processor, seen as prompts -> completions.

``encode`` turns problems and images into ``Prompts`` once per step; ``collate``
(``models.collate``) turns (prompt, completion) pairs into a padded or packed batch with each
prompt image once. Training never asks the model for logits: ``completion_hidden`` returns the
final hidden states at the positions that predict each completion token, ``[N, H]`` for N
completion tokens, which the fused loss multiplies with the LM head; ``logprobs`` is the
no-grad fused pass over such pairs (old log-probs, align's scoring).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling
from visurf_kernels import LossSpec, fused_logprobs

from .attention import NAME as PACKED_ATTENTION
from .collate import Batching, SequenceBatch, collate
from .hf import ImageOnlyProcessor
from .prompts import Prompts

__all__ = ["Batching", "Policy", "Prompts", "SequenceBatch"]


class Policy:
    def __init__(self, model, processor: ImageOnlyProcessor, device: torch.device | str = "cpu"):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        # A sampled image/video placeholder would be taken for a vision slot in the next forward.
        cfg = model.config
        self.suppressed = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    def autocast(self):
        """The precision of every forward: bf16 autocast on CUDA, none elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

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
        cache_implementation: str | None = None,
    ) -> list[list[int]]:
        """One completion per entry of ``idx`` (repeat an index for G samples).

        Each completion ends at (and includes) the end-of-turn token, or is cut at
        ``max_new_tokens``. ``cache_implementation``: transformers' KV cache (``"static"``: a
        preallocated cache, whose decode step transformers compiles on CUDA); None: its default.
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
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
        if cache_implementation is not None:
            sampling["cache_implementation"] = cache_implementation
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                mm_token_type_ids=mm.to(self.device),
                pixel_values=torch.cat([prompts.pixel_values[i] for i in idx]).to(self.device),
                image_grid_thw=torch.stack([prompts.image_grid_thw[i] for i in idx]).to(self.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                suppress_tokens=self.suppressed,
                **sampling,
            )
        self.model.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            completions.append(row[:cut])
        return completions

    def collate(
        self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]], batching: Batching
    ) -> SequenceBatch:
        """The sequences ``prompts[idx[s]] + completions[s]`` as one forward's batch (``models.collate``)."""
        return collate(prompts, idx, completions, batching, rope_index=self.model.model.get_rope_index,
                       pad_id=self.pad_id, device=self.device)  # fmt: skip

    def completion_hidden(self, batch: SequenceBatch) -> torch.Tensor:
        """Final hidden states ``[N, H]`` that predict the N completion tokens of ``batch``: the
        vision tower runs on the batch's images, each sequence takes its image's embeddings."""
        inner = self.model.model
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

    @torch.no_grad()
    def logprobs(
        self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]], spec: LossSpec,
        batching: Batching,
    ) -> torch.Tensor:  # fmt: skip
        """Per-token ``logp[N]`` of ``completions[s]`` after prompt ``idx[s]`` (the no-grad fused
        pass), in order, in the micro-batches of ``batching``."""
        out = []
        for part in batching.split([len(prompts.input_ids[p]) + len(c) for p, c in zip(idx, completions)]):
            batch = self.collate(prompts, [idx[s] for s in part], [completions[s] for s in part], batching)
            with self.autocast():
                hidden = self.completion_hidden(batch)
                out.append(fused_logprobs(hidden, self.lm_head_weight, batch.targets, spec)[0])
        return torch.cat(out)
