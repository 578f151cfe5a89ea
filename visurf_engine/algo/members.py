"""The sequences one step trains on, and the per-token loss inputs built from them.

``Members`` holds ``M`` sequences in prompt order (prompt b's G rollouts, then its gold; a
phase may leave some out, ``build_members``' keep masks) as tensors: ``prompt[M]`` (index into
the step's prompts), ``adv[M]``, ``gold[M]``, ``objective[M]`` (the per-token objective of its
tokens: a code of ``visurf_kernels.OBJECTIVES``, ``ppo`` by default), ``part[M]`` (which loss
term it belongs to, normalised on its own: ``member_weights``), with the completion token
ids ``tokens[m]`` (lists: what the collator concatenates behind each prompt) and, when the
step needs them, per-token log-probs ``[L_m]`` float32 of each member: the pre-update
policy's ``old_logp[m]`` (off-policy updates), the reference policy's ``ref_logp[m]`` (the KL
penalty) and the rollout engine's sampling log-probs ``rollout_logp[m]`` (NaN for the gold,
which no engine sampled; the rollout/trainer mismatch and its correction).

Aggregation enters the kernel as a per-token weight ``w_t`` that is constant within a
sequence s of length L_s, over the S sequences / T tokens of the global (all-ranks)
optimizer batch (``sequence_weights``, the one aggregation function):

    token-mean               w = 1 / T
    seq-mean-token-mean      w = 1 / (S * L_s)
    seq-mean-token-sum-norm  w = 1 / (S * L_max)   (Dr.GRPO; L_max = generation budget)

A phase whose loss is a mix of terms (CHORD: ``(1 - mu) L_RL + mu L_SFT``) puts the members of
each term in a ``part`` of their own: ``member_weights`` aggregates each part over its own S and
T and scales it (``part_scales``); every other phase has one part of scale 1.

``per_token`` broadcasts any per-sequence tensor ``[S]`` to the ``N = sum_s L_s`` completion
tokens of the same sequences, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class Members:
    prompt: torch.Tensor  # [M] int64
    tokens: list[list[int]]  # [M][L_m] completion token ids
    adv: torch.Tensor  # [M] float32
    gold: torch.Tensor  # [M] bool
    objective: torch.Tensor  # [M] int64 code of visurf_kernels.OBJECTIVES
    part: torch.Tensor  # [M] int64: the loss term (member_weights)
    old_logp: list[torch.Tensor] | None = None  # [M][L_m]; None: on-policy
    ref_logp: list[torch.Tensor] | None = None  # [M][L_m]; None: no KL penalty
    rollout_logp: list[torch.Tensor] | None = None  # [M][L_m]; None: the engine reports none

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> torch.Tensor:
        """``[M]`` completion lengths."""
        return torch.tensor([len(t) for t in self.tokens], dtype=torch.long)

    def labels(self, prompt_ids: Sequence[str]) -> list[str]:
        """Each member's sample id: ``<prompt id>#<k>`` for the k-th rollout of its prompt,
        ``<prompt id>#gold`` for the gold (``prompt_ids[b]``: prompt b's row id)."""
        seen = [0] * len(prompt_ids)
        out = []
        for p, gold in zip(self.prompt.tolist(), self.gold.tolist()):
            out.append(f"{prompt_ids[p]}#gold" if gold else f"{prompt_ids[p]}#{seen[p]}")
            seen[p] += not gold
        return out

    def select(self, idx: Sequence[int]) -> Members:
        """The members ``idx``, in that order."""
        i = torch.as_tensor(idx, dtype=torch.long)

        def pick(values):
            return [values[j] for j in idx] if values is not None else None

        return Members(self.prompt[i], pick(self.tokens), self.adv[i], self.gold[i], self.objective[i], self.part[i],
                       pick(self.old_logp), pick(self.ref_logp), pick(self.rollout_logp))  # fmt: skip


def build_members(
    rollouts: list[list[list[int]]] | None,
    rollout_adv: torch.Tensor | None,
    gold_tokens: list[list[int]] | None,
    gold_adv: torch.Tensor | None,
    *,
    gold_objective: int = 0,
    gold_part: int = 0,
    keep_rollouts: torch.Tensor | None = None,
    keep_gold: torch.Tensor | None = None,
    rollout_logp: list[list[torch.Tensor]] | None = None,
) -> Members:
    """Members in prompt order: the G rollouts ``rollouts[b]`` of prompt b (advantages
    ``rollout_adv[b]``, the ``ppo`` objective, part 0, sampling log-probs ``rollout_logp[b]`` if
    the engine has them), then its gold ``gold_tokens[b]`` (advantage ``gold_adv[b]``, objective
    code ``gold_objective``, part ``gold_part``, rollout log-probs NaN). ``keep_rollouts[B]`` /
    ``keep_gold[B]`` (bool; None: all): which prompts' rollouts / gold take part at all."""
    num_prompts = len(rollouts) if rollouts is not None else len(gold_tokens)
    keep_r = keep_rollouts if keep_rollouts is not None else torch.ones(num_prompts, dtype=torch.bool)
    keep_g = keep_gold if keep_gold is not None else torch.ones(num_prompts, dtype=torch.bool)
    prompt, tokens, adv, logp, gold, objective, part = [], [], [], [], [], [], []
    for b in range(num_prompts):
        if rollouts is not None and keep_r[b]:
            g = len(rollouts[b])
            tokens += rollouts[b]
            adv.append(rollout_adv[b])
            logp += rollout_logp[b] if rollout_logp is not None else []
            prompt += [b] * g
            gold += [False] * g
            objective += [0] * g
            part += [0] * g
        if gold_tokens is not None and keep_g[b]:
            tokens.append(gold_tokens[b])
            adv.append(gold_adv[b : b + 1])
            logp.append(torch.full((len(gold_tokens[b]),), float("nan")))
            prompt.append(b)
            gold.append(True)
            objective.append(gold_objective)
            part.append(gold_part)
    return Members(
        prompt=torch.tensor(prompt, dtype=torch.long),
        tokens=tokens,
        adv=torch.cat(adv).float() if adv else torch.zeros(0),
        gold=torch.tensor(gold, dtype=torch.bool),
        objective=torch.tensor(objective, dtype=torch.long),
        part=torch.tensor(part, dtype=torch.long),
        rollout_logp=logp if rollout_logp is not None else None,
    )


def sequence_weights(
    lengths: torch.Tensor, aggregation: str, *, num_seqs: int, num_tokens: int, max_len: int
) -> torch.Tensor:
    """Per-sequence token weight ``[S]`` float32 (module docstring); counts are global."""
    lengths = lengths.double()
    if aggregation == "token-mean":
        w = torch.full_like(lengths, 1.0 / max(num_tokens, 1))
    elif aggregation == "seq-mean-token-mean":
        w = 1.0 / (num_seqs * lengths.clamp(min=1))
    elif aggregation == "seq-mean-token-sum-norm":
        w = torch.full_like(lengths, 1.0 / (num_seqs * max_len))
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    return w.float()


def part_counts(members: Members, parts: int) -> torch.Tensor:
    """``[parts, 2]`` float64: each part's sequences and completion tokens among ``members``
    (the trainer sums them over the ranks for ``member_weights``)."""
    counts = torch.zeros(parts, 2, dtype=torch.float64)
    counts[:, 0].index_add_(0, members.part, torch.ones(len(members), dtype=torch.float64))
    counts[:, 1].index_add_(0, members.part, members.lengths.double())
    return counts


def member_weights(members: Members, aggregation: str, counts: torch.Tensor, scales: tuple[float, ...],
                   max_len: int) -> torch.Tensor:  # fmt: skip
    """Per-member token weight ``[M]``: ``sequence_weights`` of each part over that part's global
    ``counts[part] = (sequences, tokens)``, times ``scales[part]``."""
    w = torch.zeros(len(members))
    for k, scale in enumerate(scales):
        mine = members.part == k
        if mine.any():
            part = sequence_weights(members.lengths[mine], aggregation, num_seqs=int(counts[k, 0]),
                                    num_tokens=int(counts[k, 1]), max_len=max_len)  # fmt: skip
            w[mine] = part if scale == 1 else part * scale
    return w


def per_token(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``values[S]`` repeated ``lengths[S]`` times each: ``[sum(lengths)]``."""
    return torch.repeat_interleave(values, lengths.to(values.device))
