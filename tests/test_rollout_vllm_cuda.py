"""GPU-only assertions of the vLLM engine (``cuda`` mark: skipped without a CUDA device).

After a weight sync, a CUDA-graph engine (``enforce_eager=False``) decodes the same greedy
tokens as an eager one; the sync keeps every engine parameter at its
address (``VLLMRollout._reload`` raises otherwise); and with sleep mode, at level 1 and at
level 2, the engine sleeps after sampling, the sync wakes it in the order weights -> load -> KV
cache (at level 2 onto discarded weights, every one rewritten by the load), and it then
generates as an engine that never slept, without another wake-up. A process holds one vLLM
engine at a time (``rollout/vllm.py``), so the engines are built one after another, each
closing the previous one. The same call order is checked on CPU against a stand-in engine
(``test_rollout_vllm_sleep.py``).
"""

from __future__ import annotations

import pytest
import torch
from engine_testing import require_vllm

require_vllm()

from engine_testing.tiny_vllm import build_checkpoint  # noqa: E402

from visurf_engine.config import RolloutConfig, VLLMConfig  # noqa: E402
from visurf_engine.models.hf import load_pretrained  # noqa: E402
from visurf_engine.models.policy import Batching, Policy  # noqa: E402
from visurf_engine.rollout.vllm import VLLMRollout  # noqa: E402
from visurf_engine.tasks.shapes import generator as shapes  # noqa: E402

pytestmark = pytest.mark.cuda

BUDGET = 16


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """The checkpoint, and a policy one AdamW step away from it (what a sync must bring in)."""
    path = build_checkpoint(tmp_path_factory.mktemp("tiny-vllm-cuda"))
    model, processor = load_pretrained(path)
    policy = Policy(model, processor)
    rows = shapes.make_split(3, seed=5, absent_ratio=0.0)
    prompts = policy.encode([r.problem for r in rows], [r.image for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = policy.collate(prompts, range(len(prompts)), [[policy.eos_id]] * len(prompts), Batching())
    torch.nn.functional.cross_entropy(policy.completion_hidden(batch) @ policy.lm_head_weight.T, batch.targets).backward()
    opt.step()
    return path, policy, prompts


def engine(path, policy, **vllm) -> VLLMRollout:
    """An engine over the checkpoint (its weights, not the policy's), then synced from the policy."""
    cfg = RolloutConfig(max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET,
                        vllm=VLLMConfig(**{"max_model_len": 512, "dtype": "float32", **vllm}))  # fmt: skip
    rollout = VLLMRollout(path, policy.tokenizer, cfg)
    before = rollout._storage()
    rollout.sync_weights(policy.model.named_parameters(remove_duplicate=False))
    assert rollout._check_storage and rollout._storage() == before
    return rollout


@pytest.fixture(scope="module")
def eager_greedy(moved):
    """Greedy tokens of an eager engine after the sync."""
    path, policy, prompts = moved
    return engine(path, policy, enforce_eager=True).greedy(prompts)


def test_cuda_graph_engine_decodes_as_the_eager_one_after_a_sync(moved, eager_greedy):
    path, policy, prompts = moved
    graphs = engine(path, policy, enforce_eager=False)
    assert not graphs.llm.llm_engine.vllm_config.model_config.enforce_eager
    assert graphs.greedy(prompts) == eager_greedy


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_during_the_update_and_wake_weights_load_kv_cache(moved, eager_greedy, monkeypatch, level):
    path, policy, prompts = moved
    rollout = engine(path, policy, sleep=True, sleep_level=level, enforce_eager=False)
    assert rollout.sleep_mode and rollout._sleep.level == level
    torch.manual_seed(0)
    rollout.sample(prompts, 2)
    assert rollout._sleep.asleep == {"weights", "kv_cache"} and rollout.llm.llm_engine.is_sleeping()
    assert rollout._sleep.discarded == (level == 2)
    calls = []
    wake_up, reload = rollout.llm.wake_up, rollout.llm.collective_rpc
    monkeypatch.setattr(rollout.llm, "wake_up", lambda tags=None: calls.append(("wake", tags)) or wake_up(tags))
    monkeypatch.setattr(rollout.llm, "collective_rpc", lambda *a, **k: calls.append(("load", a[0])) or reload(*a, **k))
    rollout.sync_weights(policy.model.named_parameters(remove_duplicate=False))  # raises if a parameter moved
    kinds = [c for c in calls if c[0] == "wake" or c[1] == "reload_weights"]
    assert kinds[0] == ("wake", ["weights"]) and kinds[-1] == ("wake", ["kv_cache"])
    assert {c[0] for c in kinds[1:-1]} == {"load"}
    assert not rollout._sleep.asleep and not rollout.llm.llm_engine.is_sleeping()
    assert rollout.greedy(prompts) == eager_greedy  # level 2: the load rewrote every weight
    assert [c for c in calls if c[0] == "wake"] == [("wake", ["weights"]), ("wake", ["kv_cache"])]  # none after the sync
