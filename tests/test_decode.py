"""The decode loop (``models.decode``, ``rollout.hf.decode=loop``) against transformers' ``generate``:
the same greedy tokens (a random tiny policy: long, untrained completions, tied and untied head;
and the shipped base model), the log-probs it reports for sampled tokens equal to the trainer's
fused pass on the same tokens (1e-4), no suppressed token ever drawn, completions cut at the
end-of-turn token."""

from __future__ import annotations

import pytest
import torch

from test_rollout_hf import prompts_of, tiny_policy
from visurf_engine.config import load_config
from visurf_engine.models.hf import load_pretrained
from visurf_engine.models.policy import Batching, Policy
from visurf_engine.tasks import base_model_path
from visurf_engine.tasks.shapes import generator as shapes
from visurf_kernels import LossSpec

BUDGET = 24


def shipped_policy() -> Policy:
    model, processor = load_pretrained(base_model_path(load_config()))
    return Policy(model, processor)


@pytest.mark.parametrize("make", [lambda: tiny_policy(False), lambda: tiny_policy(True), shipped_policy],
                         ids=["random-untied", "random-tied", "shipped-base"])  # fmt: skip
def test_greedy_tokens_equal_generate(make):
    policy = make()
    rows = shapes.make_split(6, seed=9, absent_ratio=0.5)
    prompts = policy.encode([r.problem for r in rows], [r.image for r in rows])
    idx = [0, 1, 2, 3, 4, 5, 2]  # different widths in one left-padded batch, a repeat
    loop, logp = policy.generate(prompts, idx, max_new_tokens=BUDGET, do_sample=False, engine="loop")
    ref, none = policy.generate(prompts, idx, max_new_tokens=BUDGET, do_sample=False, engine="generate")
    assert loop == ref and none is None and [len(lp) for lp in logp] == [len(c) for c in loop]


@pytest.mark.parametrize("make", [tiny_policy, shipped_policy], ids=["random", "shipped-base"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_the_trainers(make, temperature):
    """The loop reports the log-probs of the distribution it sampled from, ``log softmax(z / T)``
    with the vision placeholders suppressed; the trainer's fused pass scores ``log softmax(z / T)``
    over the whole vocabulary. They differ by exactly ``log(1 - p_suppressed)``: checked to 1e-5
    on a random policy (where that is ~1e-2), and within 1e-4 outright on the trained base model."""
    policy = make()
    prompts = prompts_of(policy)
    idx = [b for b in range(len(prompts)) for _ in range(4)]
    torch.manual_seed(3)
    tokens, logp = policy.generate(prompts, idx, max_new_tokens=BUDGET, do_sample=True, temperature=temperature,
                                   engine="loop")  # fmt: skip
    assert not any(t in policy.suppressed for c in tokens for t in c)
    assert all(c[-1] == policy.eos_id or len(c) == BUDGET for c in tokens) and all(policy.eos_id not in c[:-1] for c in tokens)
    spec = LossSpec(temperature=temperature, backend="torch")
    trainer = policy.logprobs(prompts, idx, tokens, spec, Batching())
    with torch.no_grad():  # p_suppressed at every position, from the full softmax there
        hidden = policy.completion_hidden(policy.collate(prompts, idx, tokens, Batching()))
        probs = (hidden @ policy.lm_head_weight.T / temperature).softmax(dim=-1)
        mass = probs[:, policy.suppressed].sum(dim=-1)
    torch.testing.assert_close(torch.cat(logp), trainer - torch.log1p(-mass), rtol=0, atol=1e-5)
    if make is shipped_policy:
        torch.testing.assert_close(torch.cat(logp), trainer, rtol=0, atol=1e-4)
