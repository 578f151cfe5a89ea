"""The sequences one step trains on, and the per-token loss inputs built from them.

``Members`` holds ``M`` sequences in prompt order (prompt b's G rollouts, then its gold) as
tensors: ``prompt[M]`` (index into the step's prompts), ``adv[M]``, ``gold[M]``,
``logprob_loss[M]`` (``-A log pi`` instead of the PPO surrogate), with the completion token
ids ``tokens[m]`` (lists: what the collator concatenates behind each prompt) and, when the
step needs them, the pre-update log-probs ``old_logp[m]`` (``[L_m]`` float32 each).

Aggregation enters the kernel as a per-token weight ``w_t`` that is constant within a
sequence s of length L_s, over the S sequences / T tokens of the global (all-ranks)
optimizer batch (``sequence_weights``, the one aggregation function):

    token-mean               w = 1 / T
    seq-mean-token-mean      w = 1 / (S * L_s)
    seq-mean-token-sum-norm  w = 1 / (S * L_max)   (Dr.GRPO; L_max = generation budget)

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
    logprob_loss: torch.Tensor  # [M] bool
    old_logp: list[torch.Tensor] | None = None  # [M][L_m]; None: on-policy

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
        old = [self.old_logp[j] for j in idx] if self.old_logp is not None else None
        return Members(self.prompt[i], [self.tokens[j] for j in idx], self.adv[i], self.gold[i], self.logprob_loss[i], old)


def build_members(
    rollouts: list[list[list[int]]] | None,
    rollout_adv: torch.Tensor | None,
    gold_tokens: list[list[int]] | None,
    gold_adv: torch.Tensor | None,
    *,
    gold_logprob_loss: bool,
) -> Members:
    """Members in prompt order: the G rollouts ``rollouts[b]`` of prompt b (advantages
    ``rollout_adv[b]``), then its gold ``gold_tokens[b]`` (advantage ``gold_adv[b]``)."""
    num_prompts = len(rollouts) if rollouts is not None else len(gold_tokens)
    g = len(rollouts[0]) if rollouts is not None else 0
    per_prompt = g + (gold_tokens is not None)
    tokens, adv = [], []
    for b in range(num_prompts):
        if rollouts is not None:
            tokens += rollouts[b]
            adv.append(rollout_adv[b])
        if gold_tokens is not None:
            tokens.append(gold_tokens[b])
            adv.append(gold_adv[b : b + 1])
    is_gold = torch.zeros(num_prompts, per_prompt, dtype=torch.bool)
    if gold_tokens is not None:
        is_gold[:, -1] = True
    is_gold = is_gold.flatten()
    return Members(
        prompt=torch.arange(num_prompts).repeat_interleave(per_prompt),
        tokens=tokens,
        adv=torch.cat(adv).float(),
        gold=is_gold,
        logprob_loss=is_gold & gold_logprob_loss,
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


def per_token(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``values[S]`` repeated ``lengths[S]`` times each: ``[sum(lengths)]``."""
    return torch.repeat_interleave(values, lengths.to(values.device))
