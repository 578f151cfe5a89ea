"""Distributed learners against one process: two gloo ranks of ``model.backend=fsdp`` (FSDP2) and of
``model.backend=hf`` (torch DDP) train the same packed, vision-once micro-batches as the
single-process ``hf`` learner, for two optimizer steps; activation checkpointing changes nothing.
float32; the ranks sum in another order (the reduce-scatter / all-reduce of partial
gradients), so: losses within 1e-5 relative, grad norms 1e-5, weights within 1e-5 absolute
(1% of one AdamW step, lr 1e-3)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from engine_testing.learners import STEPS, build, free_port, save_tiny, spawn, train
from visurf_engine.parallel.world import World

WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "model", tied=request.param)
    return path, train(build("hf", path, World()), World())


def _agree(ranks: list[dict], ref: dict) -> None:
    for step in range(STEPS):
        got = torch.cat([r["losses"][step] for r in ranks])  # rank r ran micro-batches r, r + W, ...
        want = torch.cat([ref["losses"][step][r :: len(ranks)] for r in range(len(ranks))])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for r in ranks:
            assert r["norms"][step] == pytest.approx(ref["norms"][step], rel=1e-5)
            assert r["weights"][step].keys() == ref["weights"][step].keys()
            for name, w in ref["weights"][step].items():
                torch.testing.assert_close(r["weights"][step][name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("backend", ["fsdp", "hf"])
def test_two_ranks_train_as_one_process(tiny, backend, tmp_path):
    path, ref = tiny
    _agree(spawn(tmp_path, backend, path), ref)


def test_activation_checkpointing_changes_no_gradient(tiny, tmp_path):
    path, ref = tiny
    _agree(spawn(tmp_path, "fsdp", path, activation_checkpointing=True), ref)
    _agree([train(build("hf", path, World(), activation_checkpointing=True), World())], ref)


def test_fsdp_shards_sync_into_a_replica_one_tensor_at_a_time_and_export_as_the_trainer_scores(tiny, tmp_path):
    """After two FSDP steps: a replica synced from the shards scores the fixed completions as the
    trainer does; the sync stream holds one gathered tensor at a time (its live bytes never
    exceed two consecutive parameters', ``engine_testing.learners.LiveBytes``); the sharded checkpoint, exported to a Hugging Face
    directory, loads with ``from_pretrained`` and scores them the same again (float32, 1e-5)."""
    from engine_testing.learners import PACKED, scoring_inputs, sync_worker
    from engine_testing.megatron import SPEC, tiny_policy, tiny_vl_model
    from visurf_engine.export import export
    from visurf_engine.models.hf import load_model
    from visurf_engine.models.policy import Policy

    path, ref = tiny
    mp.start_processes(sync_worker, args=(2, free_port(), str(tmp_path), str(path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"sync{r}.pt") for r in range(2)]
    prompts, completions = scoring_inputs()
    for r in ranks:
        torch.testing.assert_close(r["replica"], r["trainer"], rtol=1e-5, atol=1e-5)
        assert 0 < r["peak"] <= r["pair"] < r["total"] / 4  # one gathered tensor at a time (and the one before)
    out = export(tmp_path / "checkpoints", tmp_path / "hf", base=path)
    model = load_model(out)
    exported = dict(model.named_parameters())
    for name, w in ref["weights"][-1].items():  # the single-process run's weights after the same two steps
        torch.testing.assert_close(exported[name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)
    policy = Policy(model, tiny_policy(tiny_vl_model()).processor)
    logp = policy.logprobs(prompts, list(range(len(completions))), completions, SPEC.replace(with_entropy=False), PACKED)
    torch.testing.assert_close(logp, ranks[0]["trainer"], rtol=1e-5, atol=1e-5)
