"""Packed sequences and the vision tower once per prompt image, against padded rows with an image
per row, on a tiny random Qwen2.5-VL (float32).

The same members (a group with completions of 1 to 40 tokens, a single-member group, a group
of three; two image sizes) go through ``HFLearner.forward_backward``: padded, vision per member;
packed, vision once, with a token budget that puts a micro-batch boundary inside the first
group; and packed with each group's prompt once (shared prompts). Per-token log-probs and entropy agree to 2e-5 (absolute; float32 sums in another
order), the loss to 1e-6 relative, and every parameter's gradient, the vision tower's
included, to 1e-5 of its largest entry (the megatron tests' bound).
"""

from __future__ import annotations

import pytest
import torch
from visurf_kernels import LossSpec

from engine_testing.megatron import PATCH_DIM, tiny_policy, tiny_vl_model
from visurf_engine.algo.members import Members
from visurf_engine.learners.base import make_micro_batch
from visurf_engine.learners.hf import HFLearner
from visurf_engine.models import collate as collate_module
from visurf_engine.models.collate import Batching
from visurf_engine.models.prompts import Prompts
from visurf_engine.parallel.world import World

SPEC = LossSpec(temperature=0.9, eps_low=0.2, eps_high=0.28, dual_clip=3.0, backend="torch", with_entropy=True)
PADDED = Batching(pack=False, vision_once=False, max_seqs=3)
PACKED = Batching(pack=True, vision_once=True, max_tokens=100)
SHARED = Batching(pack=True, vision_once=True, max_tokens=100, share_prompts=True)
GRIDS = [(1, 4, 4), (1, 4, 6), (1, 4, 4)]  # 4, 6, 4 merged image tokens
LENGTHS = [[1, 40, 3, 17], [9], [5, 2, 28]]  # completions per prompt: a long one, a single-member group


def _prompts(config, seed=0) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    ids, grids, pixels = [], [], []
    for k, grid in enumerate(GRIDS):
        n_img = grid[0] * grid[1] * grid[2] // 4
        ids.append(torch.cat([
            torch.randint(config.text_config.vocab_size - 4, (3 + k,), generator=g), torch.tensor([config.vision_start_token_id]),
            torch.full((n_img,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
            torch.randint(config.text_config.vocab_size - 4, (4,), generator=g),
        ]))  # fmt: skip
        grids.append(torch.tensor(grid))
        pixels.append(torch.randn(grid[0] * grid[1] * grid[2], PATCH_DIM, generator=g))
    return Prompts(ids, [(i == config.image_token_id).long() for i in ids], pixels, grids, [None] * len(ids))


def _members(config, seed=1) -> Members:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([p for p, lens in enumerate(LENGTHS) for _ in lens])
    tokens = [torch.randint(config.text_config.vocab_size - 4, (n,), generator=g).tolist() for lens in LENGTHS for n in lens]
    m = len(tokens)
    return Members(prompt, tokens, torch.randn(m, generator=g), torch.zeros(m, dtype=torch.bool),
                   (torch.arange(m) % 4 == 3).long(), torch.zeros(m, dtype=torch.long))  # every 4th member: the logprob objective


def _step(batching: Batching):
    """Loss, per-token stats and gradients of the members through ``HFLearner`` under ``batching``."""
    model = tiny_vl_model()
    policy = tiny_policy(model)
    prompts, members = _prompts(model.config), _members(model.config)
    weights = torch.rand(len(members), generator=torch.Generator().manual_seed(2)) / 50
    seq_tokens = [len(prompts.input_ids[p]) + len(t) for p, t in zip(members.prompt.tolist(), members.tokens)]
    parts = batching.split(seq_tokens)
    micro = [make_micro_batch(policy, prompts, members.select(r), weights[r.start : r.stop], batching) for r in parts]
    calls = []
    model.model.visual.register_forward_hook(lambda mod, args, kw, out: calls.append(len(kw["grid_thw"])), with_kwargs=True)
    model.train()
    out = HFLearner(policy, SPEC, World(), lr=0.0, betas=(0.9, 0.99), weight_decay=0.0).forward_backward(micro)
    stats = {k: torch.cat([s[k] for _, s in out]) for k in ("logp", "entropy", "clipped")}
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return sum(loss for loss, _ in out), stats, grads, parts, calls, micro


@pytest.mark.parametrize("layout, one_call_tokens", [(PACKED, None), (SHARED, None), (SHARED, 0)],
                         ids=["packed", "shared-prompts", "shared-prompts-per-segment"])  # fmt: skip
def test_packed_vision_once_equals_padded_per_member(layout, one_call_tokens, monkeypatch):
    """Shared prompts: each group's attention in one masked call (the groups here are short), or
    (``ONE_CALL_GROUP_TOKENS = 0``) one call per segment; both against the padded batch."""
    if one_call_tokens is not None:
        monkeypatch.setattr(collate_module, "ONE_CALL_GROUP_TOKENS", one_call_tokens)
    loss_p, stats_p, grads_p, _, calls_p, _ = _step(PADDED)
    loss_k, stats_k, grads_k, parts, calls_k, micro = _step(layout)
    if layout is SHARED:
        one_call = [m is not None for x in micro for m in x.batch.group_masks]
        assert all(one_call) if one_call_tokens is None else not any(one_call)
    first_group = range(len(LENGTHS[0]))
    assert any(0 < r.start < first_group.stop for r in parts), "no micro-batch boundary inside the first group"
    assert all(x.batch.cu_seqlens is not None and x.batch.input_ids.shape[0] == 1 for x in micro)
    torch.testing.assert_close(stats_k["logp"], stats_p["logp"], rtol=0, atol=2e-5)
    torch.testing.assert_close(stats_k["entropy"], stats_p["entropy"], rtol=0, atol=2e-5)
    assert torch.equal(stats_k["clipped"], stats_p["clipped"])
    assert loss_k.item() == pytest.approx(loss_p.item(), rel=1e-6)
    for name, g in grads_p.items():
        assert (grads_k[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    assert any("visual" in n and g.abs().max() > 0 for n, g in grads_k.items())  # the vision tower is trained
    # vision: padded, one image per member; packed, each prompt's image once per micro-batch
    assert calls_p == [len(r) for r in PADDED.split([1] * sum(map(len, LENGTHS)))]
    prompt_of = [p for p, lens in enumerate(LENGTHS) for _ in lens]
    assert calls_k == [len({prompt_of[s] for s in r}) for r in parts]


def test_packed_positions_are_each_sequences_own():
    model = tiny_vl_model()
    policy = tiny_policy(model)
    prompts, members = _prompts(model.config), _members(model.config)
    idx, tokens = members.prompt.tolist(), members.tokens
    padded = policy.collate(prompts, idx, tokens, PADDED)
    packed = policy.collate(prompts, idx, tokens, Batching(pack=True))
    bounds = packed.cu_seqlens.tolist()
    for s in range(len(idx)):
        length = bounds[s + 1] - bounds[s]
        assert torch.equal(packed.position_ids[:, 0, bounds[s] : bounds[s + 1]], padded.position_ids[:, s, :length])
        assert torch.equal(packed.input_ids[0, bounds[s] : bounds[s + 1]], padded.input_ids[s, :length])
    assert packed.position_ids[:, 0, bounds[1]].tolist() == [0, 0, 0]  # the second sequence starts again at 0
    patches = [t * h * w for t, h, w in GRIDS]
    assert packed.pixel_values.shape[0] == sum(patches)  # each prompt image once
    assert padded.pixel_values.shape[0] == sum(patches[p] for p in idx)  # an image per member


def test_sequences_in_a_pack_do_not_attend_to_each_other():
    """Changing one sequence's completion changes no hidden state of the others; without the
    boundaries (one causal row) it does, so the check can fail."""
    model = tiny_vl_model()
    policy = tiny_policy(model)
    prompts, members = _prompts(model.config), _members(model.config)
    idx, tokens = members.prompt.tolist(), [list(t) for t in members.tokens]
    changed = [list(t) for t in tokens]
    changed[1] = [(t + 7) % 100 for t in changed[1]]  # sequence 1 (40 tokens), of prompt 0
    lengths = torch.tensor([len(t) for t in tokens])
    others = torch.repeat_interleave(torch.arange(len(tokens)) != 1, lengths)
    later = torch.repeat_interleave(torch.arange(len(tokens)) > 1, lengths)

    def hidden(toks, boundaries=True):
        batch = policy.collate(prompts, idx, toks, Batching(pack=True))
        if not boundaries:
            batch.cu_seqlens = None
        with torch.no_grad():
            return policy.completion_hidden(batch)

    assert torch.equal(hidden(tokens)[others], hidden(changed)[others])
    assert not torch.allclose(hidden(tokens, False)[later], hidden(changed, False)[later])


def test_no_grad_scoring_runs_vision_once_per_prompt_and_matches_padded():
    model = tiny_vl_model()
    policy = tiny_policy(model)
    prompts, members = _prompts(model.config), _members(model.config)
    calls = []
    model.model.visual.register_forward_hook(lambda mod, args, kw, out: calls.append(len(kw["grid_thw"])), with_kwargs=True)
    spec = SPEC.replace(with_entropy=False)
    packed = policy.logprobs(prompts, members.prompt.tolist(), members.tokens, spec, Batching(pack=True))
    assert calls == [len(GRIDS)]
    padded = policy.logprobs(prompts, members.prompt.tolist(), members.tokens, spec, PADDED)
    torch.testing.assert_close(packed, padded, rtol=0, atol=2e-5)


def test_shared_prompts_keep_each_completions_positions_and_attend_only_to_its_prompt():
    """With shared prompts each completion token sits at the mRoPE position it has in its own
    sequence, the row is shorter by the repeated prompts, and changing one completion changes
    no other completion's hidden states (its siblings share the prompt, not each other)."""
    model = tiny_vl_model()
    policy = tiny_policy(model)
    prompts, members = _prompts(model.config), _members(model.config)
    idx, tokens = members.prompt.tolist(), [list(t) for t in members.tokens]
    packed, shared = (policy.collate(prompts, idx, tokens, b) for b in (Batching(pack=True), SHARED))
    columns = lambda b: b.positions[:, 1]  # noqa: E731  the column predicting each completion token
    assert torch.equal(packed.position_ids[0, 0, columns(packed)], shared.position_ids[0, 0, columns(shared)])
    prompt_tokens = sum(len(p) for p in prompts.input_ids)
    assert shared.input_ids.shape[1] == prompt_tokens + sum(map(len, tokens)) < packed.input_ids.shape[1]
    changed = [list(t) for t in tokens]
    changed[1] = [(t + 7) % 100 for t in changed[1]]
    others = torch.repeat_interleave(torch.arange(len(tokens)) != 1, torch.tensor([len(t) for t in tokens]))
    with torch.no_grad():
        a, b = (policy.completion_hidden(policy.collate(prompts, idx, t, SHARED)) for t in (tokens, changed))
    assert torch.equal(a[others], b[others]) and not torch.equal(a[~others], b[~others])
