"""The HF rollout engine's inference replica (``rollout.hf.replica``): the sync plan into it, its
generation, and (CUDA only) the graph-captured sync with its address checks."""

from __future__ import annotations

import pytest
import torch

from visurf_engine.config import HFRolloutConfig, RolloutConfig
from visurf_engine.models import attention
from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
from visurf_engine.models.policy import Policy
from visurf_engine.models.tiny import tiny_config, train_tokenizer
from visurf_engine.rollout.hf import HFRollout
from visurf_engine.rollout.replica import Replica
from visurf_engine.tasks.shapes import generator as shapes

BUDGET = 12


def tiny_policy(tie: bool = False, device: str = "cpu") -> Policy:
    rows = shapes.make_split(16, seed=3, absent_ratio=0.5)
    tokenizer = train_tokenizer([r.problem for r in rows] + ["<think></think><answer>[]</answer>"])
    cfg = tiny_config(tokenizer)
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = tie
    torch.manual_seed(0)
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attention.NAME).to(device)
    processor = ImageOnlyProcessor(image_processor_for(shapes.SIZE * shapes.SIZE), tokenizer, chat_template=tokenizer.chat_template)
    return Policy(model, processor, device)


def prompts_of(policy: Policy):
    rows = shapes.make_split(3, seed=5, absent_ratio=0.0)
    return policy.encode([r.problem for r in rows], [r.image for r in rows])


def adamw_step(model: torch.nn.Module) -> None:
    """An in-place update of every parameter, as the trainer's optimizer makes."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sum((p.float() ** 2).sum() for p in model.parameters()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_replica_sync_maps_every_parameter_once_and_casts(tie):
    policy = tiny_policy(tie)
    model = policy.model
    replica = Replica.copy_of(model, torch.bfloat16)
    assert sorted(replica.targets) == sorted(name for name, _ in model.named_parameters())
    assert len({id(p) for p in replica.targets.values()}) == len(replica.targets) == len(list(replica.model.parameters()))
    assert replica.plan.aliases == ({"lm_head.weight": "model.language_model.embed_tokens.weight"} if tie else {})
    assert replica.model.lm_head.weight is replica.model.model.language_model.embed_tokens.weight or not tie
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in replica.model.parameters())
    assert all(b.dtype == torch.float32 for b in replica.model.buffers())  # rotary inv_freq keeps its precision
    adamw_step(model)
    replica.sync(model.named_parameters(remove_duplicate=False))  # aliases present: skipped
    source = dict(model.named_parameters())
    for name, p in replica.model.named_parameters():
        assert torch.equal(p, source[name].detach().to(torch.bfloat16)), name
    assert not replica.captured
    *kept, (last, _) = model.named_parameters()
    with pytest.raises(ValueError, match=rf"missing \['{last}'\], unplanned \[\]"):
        replica.sync(kept)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_replica_rollouts_follow_the_trainer_through_the_sync(static_cache):
    """A float32 replica generates exactly what the training module does, before and after an
    update that reaches it only through the sync; a static KV cache changes nothing."""
    policy = tiny_policy()
    prompts = prompts_of(policy)
    cfg = RolloutConfig(max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET,
                        hf=HFRolloutConfig(replica=True, dtype="float32", static_cache=static_cache))  # fmt: skip
    rollout = HFRollout(policy, cfg, replica=Replica.copy_of(policy.model, torch.float32))
    shared = HFRollout(policy, RolloutConfig(max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET))
    assert rollout.generator.model is not policy.model
    assert rollout.cache_implementation == ("static" if static_cache else None)
    assert rollout.greedy(prompts) == shared.greedy(prompts)
    torch.manual_seed(7)
    sampled = rollout.sample(prompts, 2)
    torch.manual_seed(7)
    other = shared.sample(prompts, 2)
    assert sampled.tokens == other.tokens
    assert all(torch.equal(a, b) for ga, gb in zip(sampled.logprobs, other.logprobs) for a, b in zip(ga, gb))  # the loop's
    before = rollout.greedy(prompts)
    adamw_step(policy.model)
    assert rollout.greedy(prompts) == before and shared.greedy(prompts) != before  # the replica waits for the sync
    rollout.sync_weights(policy.model.named_parameters())
    assert rollout.greedy(prompts) == shared.greedy(prompts)


@pytest.mark.cuda
def test_replica_sync_is_one_cuda_graph_with_fixed_addresses():
    policy = tiny_policy(device="cuda")
    model = policy.model
    replica = Replica.copy_of(model, torch.bfloat16)
    replica.sync(model.named_parameters())
    assert replica.captured
    before = [p.data_ptr() for p in replica.model.parameters()]
    for _ in range(2):  # replays see the in-place updates
        adamw_step(model)
        replica.sync(model.named_parameters())
        source = dict(model.named_parameters())
        for name, p in replica.model.named_parameters():
            assert torch.equal(p, source[name].detach().to(torch.bfloat16)), name
    assert [p.data_ptr() for p in replica.model.parameters()] == before
    moved = [(n, p.detach().clone() if n == "lm_head.weight" else p) for n, p in model.named_parameters()]
    with pytest.raises(RuntimeError, match=r"moved since the CUDA graph captured them: \['lm_head.weight'\]"):
        replica.sync(moved)


@pytest.mark.cuda
def test_static_cache_graph_decode_matches_eager_on_cuda():
    """The replica's compiled static-cache decode (CUDA graphs) gives the eager dynamic-cache greedy tokens."""
    policy = tiny_policy(device="cuda")
    prompts = prompts_of(policy)
    hf = dict(replica=True, dtype="float32")
    graph = HFRollout(policy, RolloutConfig(max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET, hf=HFRolloutConfig(**hf)),
                      replica=Replica.copy_of(policy.model, torch.float32))  # fmt: skip
    eager = HFRollout(policy, RolloutConfig(max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET,
                                            hf=HFRolloutConfig(**hf, static_cache=False)),
                      replica=Replica.copy_of(policy.model, torch.float32))  # fmt: skip
    assert graph.cache_implementation == "static"
    assert graph.greedy(prompts) == eager.greedy(prompts)


def test_static_cache_length_is_bucketed_and_only_grows():
    """The replica's static KV cache is sized in buckets of 256 tokens and never shrinks, so the
    compiled decode step (specialised on the cache length) is rebuilt only when a longer bucket
    is first needed, not every step as prompt widths vary."""
    from visurf_engine.models.decode import STATIC_CACHE_BUCKET, static_cache_length

    assert STATIC_CACHE_BUCKET == 256
    assert [static_cache_length(n) for n in (1, 200, 256, 257, 700)] == [256, 256, 256, 512, 768]
    assert static_cache_length(100, previous=512) == 512
    policy = tiny_policy()
    prompts = prompts_of(policy)
    rollout = HFRollout(policy, RolloutConfig(max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET,
                                              hf=HFRolloutConfig(replica=True, dtype="float32", static_cache=True, decode="generate")),
                        replica=Replica.copy_of(policy.model, torch.float32))  # fmt: skip
    lengths = []
    for width in (1, 3):  # prompt sets of different widths, then a longer budget
        rollout.greedy(type(prompts)(*(getattr(prompts, f)[:width] for f in prompts.__dataclass_fields__)))
        lengths.append(rollout.generator._cache_length)
    rollout.cfg.eval_max_new_tokens = 300
    rollout.greedy(prompts)
    lengths.append(rollout.generator._cache_length)
    rollout.cfg.eval_max_new_tokens = BUDGET
    rollout.greedy(prompts)
    lengths.append(rollout.generator._cache_length)
    assert lengths == [256, 256, 512, 512]
