"""Evaluation over the ranks (``eval.evaluate``): two gloo ranks, each generating its round-robin
share of the one-process chunks, gather the completions and score them; the metrics and the
completions equal one process's exactly (same chunks: same batches through ``generate``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine_testing.learners import free_port
from visurf_engine.config import RolloutConfig
from visurf_engine.eval.evaluate import evaluate, greedy_completions
from visurf_engine.models.hf import load_pretrained
from visurf_engine.models.policy import Policy
from visurf_engine.parallel.world import World
from visurf_engine.rewards import get_reward
from visurf_engine.rollout.hf import HFRollout
from visurf_engine.tasks.shapes import generator

CHUNK = 3  # rows per generate call: 10 rows are 4 chunks, dealt 2 + 2


def _evaluate(base: str, world: World):
    model, processor = load_pretrained(base)
    policy = Policy(model, processor)
    rollout = HFRollout(policy, RolloutConfig(eval_max_new_tokens=12))
    rows = generator.make_split(10, seed=11, absent_ratio=0.5)
    spec = get_reward("grounding")
    metrics = evaluate(policy, rollout, rows, lambda t, r: spec.metrics(t, [x.solution for x in r]), world, CHUNK)
    return metrics, greedy_completions(policy, rollout, rows, CHUNK, world)


def _worker(rank: int, port: int, base: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.save(_evaluate(base, World(rank=rank, size=2)), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_evaluate_exactly_as_one_process(cache, tmp_path):
    from visurf_engine.config import load_config
    from visurf_engine.tasks import base_model_path
    from engine_testing.runs import SMALL

    base = str(base_model_path(load_config(None, SMALL + [f"warmstart.cache_dir={cache}"])))
    torch.set_num_threads(1)
    one = _evaluate(base, World())
    mp.start_processes(_worker, args=(free_port(), base, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == one
