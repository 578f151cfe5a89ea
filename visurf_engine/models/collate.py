"""Collation of (prompt, completion) sequences for a forward pass: padded or packed, with the
vision inputs once per prompt image.

S sequences, sequence s = prompt ``idx[s]`` (``P_s`` tokens, one image) + completion ``c_s``
(``C_s`` tokens), ``L_s = P_s + C_s``:

- **padded**: ``R = S`` rows right-padded to ``T = max_s L_s``, ``attention_mask[S, T]``;
- **packed**: one row of the S sequences back to back, ``T = sum_s L_s``, no padding, and
  ``cu_seqlens = [0, L_1, L_1 + L_2, ..., T]``: attention stays within each sequence
  (``models.attention``: a varlen kernel on CUDA, per-sequence SDPA elsewhere);
- **packed, shared prompts** (``share_prompts``): the sequences of one prompt that follow each
  other in ``idx`` (a group's G + 1 members) are one *group* ``[prompt, c_1, ..., c_k]``: the prompt
  once, then each completion, ``T = sum_g (P_g + sum_i C_i)``. ``cu_seqlens`` are the boundaries
  of the segments (each prompt, each completion) and ``segment_prefix[j]`` the prompt segment
  completion segment j attends to (a prompt segment: itself): a completion's queries attend to
  its prompt and, causally, to itself, exactly what they attend to in its own sequence, so the
  prompt's forward and backward run once per group instead of k times. ``group_masks[g]`` is
  group g's ``[L_g, L_g]`` mask of exactly that (``t`` attends ``u <= t`` of its own segment or of
  the prompt) when ``L_g <= ONE_CALL_GROUP_TOKENS``, so its attention is one call; None for a
  longer group, whose segments attend one call each (``models.attention``).

``position_ids[3, R, T]`` are each sequence's own mRoPE positions (temporal, height, width),
from the model's ``get_rope_index`` run on that sequence alone, so a packed sequence has
exactly the positions it has unpacked (a shared prompt's completions continue from its last
position, as each would after its own copy). ``positions[N, 2]`` (row, column) locate the hidden
states that predict the ``N = sum_s C_s`` completion tokens: column ``o_s + P_s - 1 + j`` for
token j of sequence s, with ``o_s`` its offset in the row (0 when padded); with shared prompts,
the prompt's last column for ``j = 0`` and the completion's own columns after.

Vision: with ``vision_once`` the batch carries the I distinct prompt images of its sequences
once and ``image_of_seq[s]`` names each sequence's image, so the vision tower runs I times,
not S (a group's G + 1 members share their prompt's image embeddings; their gradients add up
in the one vision forward). Without it, every sequence brings its own copy (I = S).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .prompts import Prompts

RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the model's get_rope_index

# A shared-prompt group of at most this many tokens attends in one masked call: the masked-out
# blocks (its completions against each other) cost L_g^2 - sum of the segments' own, cheaper than
# one call per segment while groups are short (on CPU, the default task's ~300-token groups: one
# layer's attention forward + backward 14.8 ms against 23.2 per segment, one thread); longer
# groups (real prompts with images, long completions) keep one call per segment.
ONE_CALL_GROUP_TOKENS = 512


@dataclass(frozen=True)
class Batching:
    """How sequences are grouped into forward passes.

    ``pack``: packed rows, micro-batches by ``max_tokens`` (sum of ``L_s``); else padded rows,
    ``max_seqs`` sequences per micro-batch. ``vision_once``: each prompt image once per pass.
    """

    pack: bool = True
    vision_once: bool = True
    max_tokens: int = 8192
    max_seqs: int = 16
    share_prompts: bool = False  # packed: a group's consecutive sequences share one copy of their prompt

    def split(self, seq_tokens: Sequence[int], parts: int | None = None) -> list[range]:
        """Consecutive micro-batches over sequences of ``seq_tokens[s]`` tokens: packed, as many
        as fit in ``max_tokens`` (a longer sequence alone); padded, ``max_seqs`` at a time.

        ``parts``: exactly that many (at least the count above, at most one per sequence): the
        micro-batch with the most tokens is halved (by tokens) until there are ``parts``, so
        every one still fits. Ranks that must run the same number of forwards (DDP, FSDP) split
        into the largest count any of them needs (``learners.base.lockstep_split``).
        """
        if not self.pack:
            out = [range(i, min(i + self.max_seqs, len(seq_tokens))) for i in range(0, len(seq_tokens), self.max_seqs)]
        else:
            out, start, total = [], 0, 0
            for s, n in enumerate(seq_tokens):
                if s > start and total + n > self.max_tokens:
                    out.append(range(start, s))
                    start, total = s, 0
                total += n
            if start < len(seq_tokens):
                out.append(range(start, len(seq_tokens)))
        if parts is None or parts == len(out):
            return out
        if not len(out) <= parts <= len(seq_tokens):
            raise ValueError(f"cannot split {len(seq_tokens)} sequences into {parts} micro-batches (at least {len(out)})")
        size = lambda r: sum(seq_tokens[s] for s in r)  # noqa: E731
        while len(out) < parts:
            k = max((i for i, r in enumerate(out) if len(r) > 1), key=lambda i: size(out[i]))
            r, half, cut = out[k], size(out[k]) / 2, out[k].start + 1
            while cut < r.stop - 1 and size(range(r.start, cut + 1)) <= half:
                cut += 1
            out[k : k + 1] = [range(r.start, cut), range(cut, r.stop)]
        return out


@dataclass
class SequenceBatch:
    """Model inputs of S sequences (module docstring) and where their completion tokens sit."""

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [3, R, T] mRoPE positions
    attention_mask: torch.Tensor | None  # [R, T] padded; None packed
    cu_seqlens: torch.Tensor | None  # [segments + 1] int32 packed; None padded
    pixel_values: torch.Tensor  # [patches, C*T*p*p] of the batch's I images
    image_grid_thw: torch.Tensor  # [I, 3]
    image_of_seq: torch.Tensor  # int64: the image of each prompt copy in the batch (a sequence's; a group's when shared)
    positions: torch.Tensor  # [N, 2] (row, column) of the hidden state predicting each completion token
    targets: torch.Tensor  # [N] completion token ids
    lengths: torch.Tensor  # [S] completion lengths
    segment_prefix: torch.Tensor | None = None  # [segments] int64, shared prompts: each segment's prompt segment
    group_masks: tuple[torch.Tensor | None, ...] | None = None  # shared prompts: each group's [L_g, L_g] mask or None

    def lm_kwargs(self) -> dict:
        """The language-model keyword arguments (no vision) of this batch."""
        kw = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}
        if self.cu_seqlens is not None:
            longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
            kw |= {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                   "max_length_q": longest, "max_length_k": longest}  # fmt: skip
        if self.segment_prefix is not None:
            kw |= {"segment_prefix": self.segment_prefix, "group_masks": self.group_masks}
        return kw


def collate(
    prompts: Prompts,
    idx: Sequence[int],
    completions: Sequence[Sequence[int]],
    batching: Batching,
    *,
    rope_index: RopeIndex,
    pad_id: int,
    device: torch.device,
) -> SequenceBatch:
    """``SequenceBatch`` of the sequences ``prompts[idx[s]] + completions[s]`` (module docstring)."""
    idx = list(idx)
    if batching.pack and batching.share_prompts:
        return _collate_shared(prompts, idx, completions, rope_index=rope_index, device=device)
    images = list(dict.fromkeys(idx)) if batching.vision_once else idx
    slot = {p: k for k, p in enumerate(images)}
    image_of_seq = torch.tensor([slot[p] for p in idx] if batching.vision_once else range(len(idx)), dtype=torch.long)
    grid = torch.stack([prompts.image_grid_thw[p] for p in images])
    seqs = [torch.cat([prompts.input_ids[p], torch.tensor(c, dtype=torch.long)]) for p, c in zip(idx, completions)]
    types = [torch.cat([prompts.mm_token_type_ids[p], torch.zeros(len(c), dtype=torch.long)]) for p, c in zip(idx, completions)]
    seq_grid = grid[image_of_seq]
    if batching.pack:
        input_ids = torch.cat(seqs)[None]
        position_ids = torch.cat(
            [rope_index(s[None], t[None], image_grid_thw=g[None])[0] for s, t, g in zip(seqs, types, seq_grid)], dim=2
        )
        lens = torch.tensor([len(s) for s in seqs])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        rows, offsets, mask, cu_seqlens = torch.zeros(len(seqs), dtype=torch.long), cu[:-1], None, cu.to(torch.int32)
    else:
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mm = torch.zeros_like(input_ids)
        mask = torch.zeros_like(input_ids)
        for r, (s, t) in enumerate(zip(seqs, types)):
            input_ids[r, : len(s)], mm[r, : len(s)], mask[r, : len(s)] = s, t, 1
        position_ids = rope_index(input_ids, mm, image_grid_thw=seq_grid, attention_mask=mask)[0]
        rows, offsets, cu_seqlens = torch.arange(len(seqs)), torch.zeros(len(seqs), dtype=torch.long), None
    positions = torch.cat([
        torch.stack([torch.full((len(c),), int(r)), o + len(prompts.input_ids[p]) - 1 + torch.arange(len(c))], dim=1)
        for p, c, r, o in zip(idx, completions, rows, offsets)
    ])  # fmt: skip
    return SequenceBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask.to(device) if mask is not None else None,
        cu_seqlens=cu_seqlens.to(device) if cu_seqlens is not None else None,
        pixel_values=torch.cat([prompts.pixel_values[p] for p in images]).to(device),
        image_grid_thw=grid.to(device),
        image_of_seq=image_of_seq,
        positions=positions.to(device),
        targets=torch.cat([torch.tensor(c, dtype=torch.long) for c in completions]).to(device),
        lengths=torch.tensor([len(c) for c in completions]),
    )


def _collate_shared(prompts: Prompts, idx: list[int], completions: Sequence[Sequence[int]], *, rope_index: RopeIndex,
                    device: torch.device) -> SequenceBatch:  # fmt: skip
    """The packed row with each group's prompt once (module docstring: packed, shared prompts)."""
    groups: list[tuple[int, list[int]]] = []  # (prompt, its sequences), runs of one prompt in idx
    for s, p in enumerate(idx):
        if groups and groups[-1][0] == p:
            groups[-1][1].append(s)
        else:
            groups.append((p, [s]))
    images = list(dict.fromkeys(idx))
    ids, pos, bounds, prefix, where, masks = [], [], [0], [], [None] * len(idx), []
    for p, members in groups:
        prompt = prompts.input_ids[p]
        grid = prompts.image_grid_thw[p]
        prompt_pos = rope_index(prompt[None], prompts.mm_token_type_ids[p][None], image_grid_thw=grid[None])[0][:, 0]
        start, last, prompt_segment = bounds[-1], prompt_pos.max(), len(bounds) - 1
        ids.append(prompt)
        pos.append(prompt_pos)
        bounds.append(start + len(prompt))
        prefix.append(prompt_segment)
        for s in members:
            c = torch.tensor(completions[s], dtype=torch.long)
            where[s] = (start + len(prompt) - 1, bounds[-1])  # (the prompt's last column, the completion's first)
            ids.append(c)
            pos.append((last + 1 + torch.arange(len(c))).expand(3, -1))
            prefix.append(prompt_segment)
            bounds.append(bounds[-1] + len(c))
        masks.append(_group_mask(torch.tensor(bounds[prompt_segment:]) - start, device))
    columns = torch.cat([torch.cat([torch.tensor([last]), first + torch.arange(len(c) - 1)]) if len(c) else
                         torch.zeros(0, dtype=torch.long)
                         for (last, first), c in zip(where, completions)])  # fmt: skip
    slot = {p: k for k, p in enumerate(images)}
    return SequenceBatch(
        input_ids=torch.cat(ids)[None].to(device),
        position_ids=torch.cat(pos, dim=1)[:, None].to(device),
        attention_mask=None,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32).to(device),
        pixel_values=torch.cat([prompts.pixel_values[p] for p in images]).to(device),
        image_grid_thw=torch.stack([prompts.image_grid_thw[p] for p in images]).to(device),
        image_of_seq=torch.tensor([slot[p] for p, _ in groups], dtype=torch.long),
        positions=torch.stack([torch.zeros_like(columns), columns], dim=1).to(device),
        targets=torch.cat([torch.tensor(c, dtype=torch.long) for c in completions]).to(device),
        lengths=torch.tensor([len(c) for c in completions]),
        segment_prefix=torch.tensor(prefix, dtype=torch.long),
        group_masks=tuple(masks),
    )


def _group_mask(bounds: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The ``[L, L]`` attention mask of a group with segment ``bounds`` (prompt first, ``L =
    bounds[-1]``): query t sees key u <= t of its own segment or of the prompt; None when ``L >
    ONE_CALL_GROUP_TOKENS``."""
    length = int(bounds[-1])
    if length > ONE_CALL_GROUP_TOKENS:
        return None
    segment = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds[1:] - bounds[:-1])
    t = torch.arange(length)
    mask = (t[None] <= t[:, None]) & ((segment[None] == segment[:, None]) | (segment[None] == 0))
    return mask.to(device)
