"""The sequences one step trains on, and the per-token loss inputs built from them.

``Members`` holds ``M`` sequences in prompt order (prompt b's G rollouts, then its gold) as
tensors: ``prompt[M]`` (index into the step's prompts), ``adv[M]``, ``gold[M]``,
``logprob_loss[M]`` (``-A log pi`` instead of the PPO surrogate), with the completion token
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

        return Members(self.prompt[i], pick(self.tokens), self.adv[i], self.gold[i], self.logprob_loss[i],
                       pick(self.old_logp), pick(self.ref_logp), pick(self.rollout_logp))  # fmt: skip


def build_members(
    rollouts: list[list[list[int]]] | None,
    rollout_adv: torch.Tensor | None,
    gold_tokens: list[list[int]] | None,
    gold_adv: torch.Tensor | None,
    *,
    gold_logprob_loss: bool,
    rollout_logp: list[list[torch.Tensor]] | None = None,
) -> Members:
    """Members in prompt order: the G rollouts ``rollouts[b]`` of prompt b (advantages
    ``rollout_adv[b]``, sampling log-probs ``rollout_logp[b]`` if the engine has them), then its
    gold ``gold_tokens[b]`` (advantage ``gold_adv[b]``, rollout log-probs NaN)."""
    num_prompts = len(rollouts) if rollouts is not None else len(gold_tokens)
    g = len(rollouts[0]) if rollouts is not None else 0
    per_prompt = g + (gold_tokens is not None)
    tokens, adv, logp = [], [], []
    for b in range(num_prompts):
        if rollouts is not None:
            tokens += rollouts[b]
            adv.append(rollout_adv[b])
            logp += rollout_logp[b] if rollout_logp is not None else []
        if gold_tokens is not None:
            tokens.append(gold_tokens[b])
            adv.append(gold_adv[b : b + 1])
            logp.append(torch.full((len(gold_tokens[b]),), float("nan")))
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


def per_token(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``values[S]`` repeated ``lengths[S]`` times each: ``[sum(lengths)]``."""
    return torch.repeat_interleave(values, lengths.to(values.device))
