"""Distributed learners against the single-process ``hf`` learner (``tests/test_fsdp.py``): the
tiny random Qwen2.5-VL saved as a checkpoint, the same packed, vision-once micro-batches for
every run (rank r of W takes micro-batches r, r + W, ...), and a worker that spawned gloo
ranks run. Each run records, per optimizer step, the micro-batches' losses, the grad norm and
the whole weights after the step (``export_weights``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine_testing.megatron import OPTIM, SPEC, random_micro_batches, tiny_policy, tiny_vl_model
from visurf_engine.config import FSDPConfig
from visurf_engine.models.collate import Batching
from visurf_engine.models.precision import Precision
from visurf_engine.parallel.world import World

PACKED = Batching(pack=True, vision_once=True)
MAX_NORM = 0.5
STEPS, MICRO = 2, 4  # optimizer steps; micro-batches per step (over all ranks)


def save_tiny(path: Path, tied: bool = False) -> Path:
    """The tiny random model (``engine_testing.megatron.tiny_vl_model``) as a checkpoint directory."""
    tiny_vl_model(tied=tied).save_pretrained(path)
    return path


def step_batches(model, step: int):
    return random_micro_batches(model, seed=100 + step, micro=MICRO, rows=3, batching=PACKED)


def build(backend: str, path: Path, world: World, activation_checkpointing: bool = False, compute: str = "float32"):
    """The learner of ``backend`` over the checkpoint at ``path`` (float32 master weights, the
    forward in ``compute``, the tests' optimizer)."""
    processor = tiny_policy(tiny_vl_model()).processor
    precision = Precision.of("float32", compute, world.device)
    if backend == "fsdp":
        from visurf_engine.learners.fsdp import FSDPLearner

        return FSDPLearner.load(path, processor, precision, SPEC, world, FSDPConfig(),
                                activation_checkpointing=activation_checkpointing, **OPTIM)  # fmt: skip
    from visurf_engine.learners.hf import HFLearner
    from visurf_engine.models.hf import load_model
    from visurf_engine.models.policy import Policy

    model = load_model(path)
    return HFLearner(Policy(model, processor, precision=precision), SPEC, world,
                     activation_checkpointing=activation_checkpointing, **OPTIM)  # fmt: skip


def loss_input_dtypes(monkeypatch=None) -> list:
    """Records the dtypes of ``hidden`` and the LM head weight every fused loss call of the
    learners receives (``learners.forward``); a ``monkeypatch`` undoes it, else it stays."""
    from visurf_engine.learners import forward

    seen, real = [], forward.fused_policy_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    if monkeypatch is not None:
        monkeypatch.setattr(forward, "fused_policy_loss", spy)
    else:
        forward.fused_policy_loss = spy
    return seen


def train(learner, world: World) -> dict:
    """``STEPS`` optimizer steps of this rank's micro-batches; what every rank saw."""
    reference = tiny_vl_model()  # collates (rope index): any model of the same config
    losses, norms, weights = [], [], []
    learner.policy.model.train()
    for step in range(STEPS):
        mine = step_batches(reference, step)[world.rank :: world.size]
        losses.append(torch.stack([loss for loss, _ in learner.forward_backward(mine)]))
        norms.append(learner.step(MAX_NORM).grad_norm)
        weights.append({name: t.detach().clone() for name, t in learner.export_weights()})
    return {"losses": losses, "norms": norms, "weights": weights}


def worker(rank: int, world_size: int, port: int, out: str, backend: str, path: str, activation_checkpointing: bool,
           compute: str = "float32") -> None:  # fmt: skip
    """One gloo rank of a ``backend`` run; saves ``train``'s record (with the dtypes the fused
    loss received, ``loss_dtypes``) as ``out/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank=rank, size=world_size)
    seen = loss_input_dtypes()
    learner = build(backend, Path(path), world, activation_checkpointing, compute)
    record = train(learner, world) | {"loss_dtypes": seen, "master": {p.dtype for p in learner.policy.model.parameters()}}
    torch.save(record, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def scoring_inputs():
    """Fixed prompts and completions the sync and export tests score (``learner.logprobs``)."""
    from engine_testing.megatron import random_prompts

    return random_prompts(tiny_vl_model(), torch.Generator().manual_seed(7), rows=4)


class LiveBytes:
    """Wraps a weight stream and measures the most bytes of its yielded tensors alive at once
    (weak references: a tensor counts until its consumer drops it). A consumer's loop variable
    still holds the previous tensor while the next one is gathered, so a stream handed on one
    tensor at a time peaks at two consecutive tensors (``pair``); ``total``: all of them."""

    def __init__(self, stream):
        import weakref

        self.stream, self.alive, self.peak, self.pair, self.total = stream, [], 0, 0, 0
        self._ref = weakref.ref

    def __iter__(self):
        last = 0
        for name, t in self.stream:
            size = t.numel() * t.element_size()
            self.alive = [(r, n) for r, n in self.alive if r() is not None] + [(self._ref(t), size)]
            self.peak = max(self.peak, sum(n for _, n in self.alive))
            self.pair, self.total, last = max(self.pair, last + size), self.total + size, size
            yield name, t
            del t


def sync_worker(rank: int, world_size: int, port: int, out: str, path: str) -> None:
    """One gloo rank of an ``fsdp`` run: two steps, then the trainer's log-probs of the fixed
    completions, a float32 replica synced from the shards (with the live bytes of the sync
    stream) and its log-probs, and a sharded checkpoint under ``out/checkpoints``."""
    from visurf_engine import checkpoint as ckpt
    from visurf_engine.models.policy import Policy
    from visurf_engine.models.precision import Precision
    from visurf_engine.rollout.replica import Replica

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank=rank, size=world_size)
    learner = build("fsdp", Path(path), world)
    train(learner, world)
    prompts, completions = scoring_inputs()
    idx = list(range(len(completions)))
    trainer_logp = learner.logprobs(prompts, idx, completions, PACKED)
    replica = Replica.of(learner, path, torch.float32)
    stream = LiveBytes(learner.export_weights())
    replica.sync(stream)
    f32 = Precision(torch.float32, torch.float32)
    replica_logp = Policy(replica.model, learner.policy.processor, precision=f32).logprobs(
        prompts, idx, completions, SPEC.replace(with_entropy=False), PACKED)  # fmt: skip
    ckpt.save(Path(out) / "checkpoints", STEPS, learner, {"step": STEPS}, world)
    torch.save({"trainer": trainer_logp, "replica": replica_logp, "peak": stream.peak, "pair": stream.pair,
                "total": stream.total},
               Path(out) / f"sync{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(out: Path, backend: str, path: Path, activation_checkpointing: bool = False, world: int = 2,
          compute: str = "float32") -> list[dict]:  # fmt: skip
    """``worker`` on ``world`` gloo ranks; their records, in rank order."""
    import torch.multiprocessing as mp

    out = out / f"{backend}-{activation_checkpointing}-{compute}"
    out.mkdir(parents=True)
    mp.start_processes(worker, args=(world, free_port(), str(out), backend, str(path), activation_checkpointing, compute),
                       nprocs=world, start_method="spawn")  # fmt: skip
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
