"""The vLLM engine's sleep bookkeeping (``rollout/vllm.py``: ``SleepState``, as ``VLLMRollout``
drives it) against a stand-in ``vllm.LLM`` that records every call; runs without vLLM.

The calls asserted: ``sample`` generates, then sleeps at the configured level; a sync wakes the
weights, loads, resets the encoder cache, wakes the KV cache, resets the prefix cache; a wake of
memory already awake calls nothing (no ``wake_up`` on a sync or a generation after a sync); at
level 2 nothing generates on discarded weights; at level 1 a generation before the sync wakes
everything first; sleep mode off (level 0) never calls ``sleep`` or ``wake_up``. On a GPU with
vLLM, ``test_rollout_vllm_cuda.py`` checks the same order against the real engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from visurf_engine.config import RolloutConfig
from visurf_engine.models.prompts import Prompts
from visurf_engine.rollout.vllm import SleepState, VLLMRollout

TOKEN, IMAGE_PAD = 7, 99
WEIGHTS = [("model.layers.0.mlp.weight", torch.zeros(2))]
PROMPTS = Prompts(input_ids=[torch.tensor([1, 2, 3])], mm_token_type_ids=[torch.zeros(3)],
                  pixel_values=[torch.zeros(0)], image_grid_thw=[torch.ones(3)], images=[None])  # fmt: skip
SYNC = [("reload_weights", [n for n, _ in WEIGHTS]), ("reset_encoder_cache",)]


class FakeLLM:
    """Records the calls the engine makes. ``wake_up`` returns None, as vLLM's did before 0.32
    (0.32 returns whether the engine is fully awake): the bookkeeping must not read it."""

    def __init__(self, fail_reload: bool = False):
        self.calls: list[tuple] = []
        self.fail_reload = fail_reload
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: self.calls.append(("reset_encoder_cache",)))

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        if self.fail_reload:
            raise RuntimeError("reload failed")
        self.calls.append((method, [name for name, _ in kwargs["weights_iterator"]]))

    def generate(self, requests: list[dict], params: list[dict], use_tqdm: bool) -> list:
        self.calls.append(("generate",))
        step = {TOKEN: SimpleNamespace(logprob=-0.5)}
        samples = [[SimpleNamespace(index=i, token_ids=[TOKEN], logprobs=[step]) for i in range(p.get("n", 1))]
                   for p in params]  # fmt: skip
        return [SimpleNamespace(prompt_token_ids=r["prompt_token_ids"], outputs=o) for r, o in zip(requests, samples)]

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True


def engine(level: int, fail_reload: bool = False) -> tuple[VLLMRollout, FakeLLM]:
    """A ``VLLMRollout`` over a ``FakeLLM``, built without ``__init__`` (which imports vLLM): the
    attributes generation and sync read, a one-bucket plan, and sampling parameters as dicts."""
    rollout, llm = VLLMRollout.__new__(VLLMRollout), FakeLLM(fail_reload)
    rollout._llm, rollout.cfg, rollout._sleep = llm, RolloutConfig(n=2), SleepState(level)
    rollout.image_token_id, rollout._check_storage = IMAGE_PAD, False
    rollout._params = lambda **kwargs: kwargs
    rollout._plan = SimpleNamespace(batches=lambda named: [named])
    return rollout, llm


def calls_of(llm: FakeLLM, action) -> list[tuple]:
    llm.calls.clear()
    action()
    return list(llm.calls)


def test_level_2_sleeps_after_sampling_and_only_a_sync_brings_the_weights_back():
    rollout, llm = engine(2)
    out = rollout.sample(PROMPTS)
    assert llm.calls == [("generate",), ("sleep", 2)] and out.tokens == [[[TOKEN], [TOKEN]]]
    assert rollout._sleep.asleep == {"weights", "kv_cache"}
    llm.calls.clear()
    with pytest.raises(RuntimeError, match=r"discarded .* sync_weights must load them"):
        rollout.greedy(PROMPTS)
    assert llm.calls == []  # neither a wake nor a generation on discarded weights
    sync = lambda: rollout.sync_weights(WEIGHTS)  # noqa: E731
    assert calls_of(llm, sync) == [("wake_up", ["weights"]), *SYNC, ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]
    assert not rollout._sleep.asleep and not rollout._sleep.discarded
    assert calls_of(llm, lambda: rollout.greedy(PROMPTS)) == [("generate",)]  # awake: no wake_up
    assert calls_of(llm, sync) == [*SYNC, ("reset_prefix_cache",)]


def test_level_1_wakes_everything_before_a_generation_that_comes_before_the_sync():
    rollout, llm = engine(1)
    assert calls_of(llm, lambda: rollout.sample(PROMPTS)) == [("generate",), ("sleep", 1)]
    assert calls_of(llm, lambda: rollout.greedy(PROMPTS)) == [("wake_up", ["weights", "kv_cache"]), ("generate",)]
    assert calls_of(llm, lambda: rollout.greedy(PROMPTS)) == [("generate",)]
    assert calls_of(llm, lambda: rollout.sample(PROMPTS)) == [("generate",), ("sleep", 1)]
    assert calls_of(llm, lambda: rollout.sync_weights(WEIGHTS)) == [
        ("wake_up", ["weights"]), *SYNC, ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]  # fmt: skip


def test_without_sleep_mode_nothing_sleeps_or_wakes():
    rollout, llm = engine(0)
    rollout.sample(PROMPTS)
    rollout.sync_weights(WEIGHTS)
    rollout.greedy(PROMPTS)
    assert [c[0] for c in llm.calls] == ["generate", "reload_weights", "reset_encoder_cache", "reset_prefix_cache",
                                         "generate"]  # fmt: skip
    with pytest.raises(ValueError, match="sleep level must be 0"):
        SleepState(3)


def test_a_failed_load_leaves_the_discarded_weights_refused():
    rollout, llm = engine(2, fail_reload=True)
    rollout.sample(PROMPTS)
    with pytest.raises(RuntimeError, match="reload failed"):
        rollout.sync_weights(WEIGHTS)
    assert rollout._sleep.asleep == {"kv_cache"} and rollout._sleep.discarded
    with pytest.raises(RuntimeError, match="discarded"):
        rollout.greedy(PROMPTS)
