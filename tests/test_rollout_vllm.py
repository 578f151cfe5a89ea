"""The vLLM rollout engine against the HF model it mirrors, on the tiny Qwen2.5-VL (float32).

Runs only where vLLM is installed (CPU: ``bash scripts/setup_vllm_cpu.sh VENV_DIR``; with
``VISURF_REQUIRE_VLLM=1`` a missing vLLM fails the module instead of skipping it). The
reference log-probs come from a plain HF forward through the engine's own ``Policy``
(``engine_testing.tiny_vllm.hf_logprobs``), with the vision placeholder tokens masked as vLLM's
logit bias masks them, at the sampling temperature. The GPU-only assertions (CUDA graphs, sleep
mode) are in ``test_rollout_vllm_cuda.py``.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from engine_testing import require_vllm

require_vllm()

from engine_testing.tiny_vllm import build_checkpoint, hf_logprobs  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from visurf_engine.config import RolloutConfig, VLLMConfig  # noqa: E402
from visurf_engine.tasks.shapes import generator as shapes  # noqa: E402
from visurf_engine.models.hf import load_pretrained  # noqa: E402
from visurf_engine.models.policy import Batching, Policy  # noqa: E402
from visurf_engine.rollout import vllm_cpu  # noqa: E402
from visurf_engine.rollout.vllm import VLLMRollout  # noqa: E402

T = 0.7
N = 3
BUDGET = 16
TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An engine built as the trainer builds it (``from_policy``) over the checkpoint, from a policy
    whose weights have moved away from the checkpoint's (as after a resume): every parity test
    below then also shows that the engine holds the policy's weights, not the checkpoint's."""
    path = build_checkpoint(tmp_path_factory.mktemp("tiny-vllm"))
    files = {f.name: f.read_bytes() for f in path.iterdir()}
    model, processor = load_pretrained(path)
    checkpoint = Policy(load_pretrained(path)[0], processor)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name or ".blocks." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.003)
    policy = Policy(model, processor)
    links = set(Path(tempfile.gettempdir()).glob("visurf-vllm-*"))
    rollout = VLLMRollout.from_policy(policy, path, rollout_config())
    return {"path": path, "files": files, "links": links, "checkpoint": checkpoint, "policy": policy, "rollout": rollout}


@pytest.fixture(scope="module")
def setup(built):
    policy = built["policy"]
    rows = shapes.make_split(2, seed=5, absent_ratio=0.0)
    # long enough (> one 128-token KV block) that vLLM's prefix cache holds a block of each prompt
    prompts = policy.encode([" ".join([r.problem] * 4) for r in rows], [r.image for r in rows])
    return policy, prompts, built["rollout"]


def rollout_config(**vllm) -> RolloutConfig:
    """Sleep level 1 where there is a sleep mode (CUDA): these tests generate again after sampling
    without a sync in between, which level 2 refuses (the weights are discarded until the sync;
    ``test_rollout_vllm_cuda.py`` covers both levels)."""
    return RolloutConfig(n=N, temperature=T, max_new_tokens=BUDGET, eval_max_new_tokens=BUDGET,
                         vllm=VLLMConfig(**{"max_model_len": 512, "dtype": "float32", "sleep_level": 1, **vllm}))  # fmt: skip


def sampled_logprob_error(policy, prompts, out) -> float:
    return max(
        (hf_logprobs(policy, prompts, b, c, T) - lp).abs().max().item()
        for b in range(len(prompts))
        for c, lp in zip(out.tokens[b], out.logprobs[b])
    )


def test_torchvision_cpu_layer_defines_schemas_only():
    import torchvision

    if torchvision.extension._has_ops():
        pytest.skip("torchvision's own C ops load here: the CPU layer stays inactive")
    assert vllm_cpu.apply_torchvision_cpu_shim() and vllm_cpu.apply_torchvision_cpu_shim()  # active, idempotent
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)


def test_engine_leaves_the_caller_state_alone(setup):
    """vLLM's re-seeding and thread pinning never reach the caller; the caller's torch RNG only
    advances by the one seed drawn per prompt."""
    policy, prompts, rollout = setup
    state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rollout.sample(prompts)
    after = torch.get_rng_state()
    torch.set_rng_state(state[0])
    for _ in range(len(prompts)):
        torch.randint(0, 2**62, ())
    assert torch.equal(torch.get_rng_state(), after) and np.array_equal(np.random.get_state()[1], state[1])
    assert random.getstate() == state[2]
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads
    assert rollout.dtype == torch.float32


def test_samples_end_at_im_end_or_the_budget(setup):
    policy, prompts, rollout = setup
    block = rollout.llm.llm_engine.vllm_config.cache_config.block_size
    assert all(len(ids) > block for ids in prompts.input_ids)
    out = rollout.sample(prompts)
    assert len(out.tokens) == len(prompts) and all(len(g) == N for g in out.tokens)
    lengths = []
    for group, lps in zip(out.tokens, out.logprobs):
        for c, lp in zip(group, lps):
            assert 1 <= len(c) <= BUDGET and lp.shape == (len(c),) and lp.dtype == torch.float32
            assert c[-1] == policy.eos_id or len(c) == BUDGET
            assert policy.eos_id not in c[:-1] and not set(policy.suppressed) & set(c)
            lengths.append(len(c))
    assert min(lengths) < BUDGET  # some stop at <|im_end|>
    assert len({tuple(c) for g in out.tokens for c in g}) == len(prompts) * N


def test_sampling_logprobs_match_hf(setup):
    policy, prompts, rollout = setup
    assert sampled_logprob_error(policy, prompts, rollout.sample(prompts)) < TOL


def test_sampling_follows_the_callers_torch_seed(setup):
    policy, prompts, rollout = setup
    torch.manual_seed(42)
    first = rollout.sample(prompts).tokens
    assert rollout.sample(prompts).tokens != first
    torch.manual_seed(42)
    assert rollout.sample(prompts).tokens == first


def test_greedy_is_deterministic_and_matches_hf(setup):
    policy, prompts, rollout = setup
    greedy = rollout.greedy(prompts)
    assert rollout.greedy(prompts) == greedy
    assert greedy == policy.generate(prompts, range(len(prompts)), max_new_tokens=BUDGET, do_sample=False)[0]


def test_fixed_completion_scores_match_hf(setup):
    policy, prompts, rollout = setup
    fixed = [c[0] for c in rollout.sample(prompts).tokens]
    for b, lp in enumerate(rollout.score(prompts, fixed)):
        assert (hf_logprobs(policy, prompts, b, fixed[b], 1.0, suppress=False) - lp).abs().max() < TOL


def test_from_policy_links_the_checkpoint_and_syncs_the_policy(built, setup):
    """The checkpoint is untouched and the links are gone once the engine is up; the engine scores
    as the policy does (``test_fixed_completion_scores_match_hf``), not as the checkpoint."""
    policy, prompts, rollout = setup
    assert {f.name: f.read_bytes() for f in built["path"].iterdir()} == built["files"]
    assert set(Path(tempfile.gettempdir()).glob("visurf-vllm-*")) == built["links"]
    fixed = [c[0] for c in rollout.sample(prompts).tokens]
    for b, lp in enumerate(rollout.score(prompts, fixed)):
        assert (hf_logprobs(built["checkpoint"], prompts, b, fixed[b], 1.0, suppress=False) - lp).abs().max() > 1e-2


def test_sleep_mode_is_refused_where_vllm_has_none(setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA has a sleep mode")
    with pytest.raises(ValueError, match="rollout.vllm.sleep: vLLM's sleep mode is not available"):
        VLLMRollout(build_checkpoint(tmp_path), setup[0].tokenizer, rollout_config(sleep=True))


def _adamw_step(policy, prompts, completions):
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-4)
    batch = policy.collate(prompts, range(len(prompts)), completions, Batching())
    logits = policy.completion_hidden(batch) @ policy.lm_head_weight.T
    F.cross_entropy(logits, batch.targets).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_sync_after_an_adamw_step_and_the_prefix_reset_matters(setup):
    """Last in the file: it updates the shared model."""
    policy, prompts, rollout = setup
    fixed = [c[0] for c in rollout.sample(prompts).tokens]  # the prompts' first KV blocks are now cached
    _adamw_step(policy, prompts, fixed)

    def score_error():
        return max(
            (hf_logprobs(policy, prompts, b, fixed[b], 1.0, suppress=False) - lp).abs().max().item()
            for b, lp in enumerate(rollout.score(prompts, fixed))
        )

    assert score_error() > 1e-2  # the engine still has the old weights
    rollout._reload(policy.model.named_parameters())  # weights and encoder cache, no prefix-cache reset
    assert score_error() < TOL  # prompt log-probs never read the prefix cache
    assert sampled_logprob_error(policy, prompts, rollout.sample(prompts)) > 1e-2  # stale prompt KV reused

    rollout.sync_weights(policy.model.named_parameters())
    assert score_error() < TOL
    assert sampled_logprob_error(policy, prompts, rollout.sample(prompts)) < TOL

    _adamw_step(policy, prompts, fixed)  # again, with one reload call per layer group
    rollout.cfg.vllm.bucket_bytes, rollout._plan = 1, None
    rollout.sync_weights(policy.model.named_parameters())
    assert len(rollout.plan.buckets) > 10
    assert score_error() < TOL
    assert sampled_logprob_error(policy, prompts, rollout.sample(prompts)) < TOL


@pytest.mark.cuda  # on CPU vLLM repacks linear weights into oneDNN handles: pointers prove nothing
def test_sync_keeps_engine_storage_on_cuda(setup):
    policy, prompts, rollout = setup
    assert rollout._check_storage
    before = rollout._storage()
    rollout.sync_weights(policy.model.named_parameters())  # raises if any parameter moved
    assert rollout._storage() == before


def test_checkpoint_without_video_processor_is_refused(tmp_path):
    path = build_checkpoint(tmp_path)
    config = (path / "processor_config.json").read_text()
    (path / "processor_config.json").write_text(config.replace('"video_processor"', '"no_video_processor"'))
    with pytest.raises(ValueError, match="export_checkpoint"):
        VLLMRollout(path, None, RolloutConfig())
