"""One measured point's worker process for ``bench/throughput.py``, and the coordinator's handle on it.

The process (``python bench/throughput_worker.py``, started by ``Worker``; possibly under another
interpreter, e.g. ``--vllm-python``, importing the engine and kernels from the ``PYTHONPATH`` that
``worker_env`` gives it) builds the point's trainer once (``EngineSide``: the engine's ``Trainer``;
or ``trl_peer.TRLSide``), then runs ``trainer.step(i)`` for each step index the coordinator grants
and sends back that step's metrics (the ``KEEP`` prefixes, plus the NVML samples of the step).

Messages are pickled over the worker's stdin and a dup of its stdout (its prints go to stderr):
the coordinator sends the point's spec (``{"config", "overrides", "side", "steps"}``), then one
step index at a time (None: stop); the worker answers ``("ready", info)``, ``("step", metrics)``
per step, ``("done", None)``, or ``("error", traceback)`` when anything fails.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visurf_engine.config import Config, load_config
from visurf_engine.parallel.world import init_world
from visurf_engine.telemetry import NvmlSampler, PeakMemory

KEEP = ("time/", "mem/", "tokens/", "seqs/", "gpu/", "phase/", "len/")  # per-step metrics kept in the JSON


@dataclass
class Point:
    """One measured thing: a trainer (``side`` engine | trl) on the base overrides plus ``overrides``."""

    name: str
    side: str
    overrides: list[str]
    schedule: list[tuple[int, bool]] = field(default_factory=list)  # (step index, measured?)
    python: str | None = None  # the interpreter of its worker (None: this one)


# -- the worker process ----------------------------------------------------------------------


def flop_params(model) -> int:
    """N of the FLOPs estimate: the language model's parameters without the input embedding, plus the LM head."""
    lm = model.model.language_model
    return sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()


class EngineSide:
    """The engine's ``Trainer``, stepped by ``run``; adds each step's sequence counts and prefill tokens."""

    def __init__(self, cfg: Config):
        from visurf_engine.trainer import Trainer

        self.trainer = Trainer(cfg, init_world())
        self.trainer.policy.model.train()  # as Trainer.run does before its first step
        self.cfg = cfg

    def info(self) -> dict[str, Any]:
        c = self.trainer.cfg  # rollout.backend resolved (auto -> hf | vllm)
        return {"flop_params": flop_params(self.trainer.policy.model), "rollout_backend": c.rollout.backend,
                "pack": self.trainer.batching.pack, "vision_once": c.train.vision_once, "loss_backend": c.loss.backend,
                "paradigm": c.algo.paradigm}  # fmt: skip

    def run(self, next_step, report) -> None:
        b, g = self.cfg.train.batch_size, self.cfg.rollout.n
        while (i := next_step()) is not None:
            m = self.trainer.step(i)
            phase = self.trainer.paradigm.phase(i, self.trainer.sft_steps)
            sampled = b * g if phase.rollouts else 0
            m["seqs/generated"], m["seqs/trained"] = float(sampled), float(sampled + b * phase.gold)
            m["tokens/prefill"] = m["tokens/prompt"] * sampled / m["seqs/trained"]  # each prompt: G rollouts (+ the gold)
            report(m)


class Pipe:
    """Pickled messages over a pair of binary streams (the worker's stdin / a dup of its stdout)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def send(self, obj) -> None:
        pickle.dump(obj, self.writer)
        self.writer.flush()

    def recv(self):
        return pickle.load(self.reader)


def main() -> int:
    """The worker process: build the point's trainer, then step it whenever the coordinator sends a
    step index (None: stop). Messages go over a dup of stdout; prints go to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    conn = Pipe(sys.stdin.buffer, out)
    spec = conn.recv()
    sampler = None
    try:
        cfg = load_config(spec["config"], spec["overrides"])
        device = init_world().device
        if spec["side"] == "trl":
            from trl_peer import TRLSide

            side = TRLSide(cfg, Path(cfg.model.path), Path(cfg.train.output_dir), spec["steps"], device)
            info = {"flop_params": flop_params(side.model), "rollout_backend": "transformers generate (TRL)",
                    "pack": False, "vision_once": False, "loss_backend": "TRL (logits + selective_log_softmax)",
                    "rows_per_micro_batch": side.rows_per_micro}  # fmt: skip
        else:
            side = EngineSide(cfg)
            info = side.info()
        sampler = NvmlSampler.open()
        import visurf_engine

        info |= {"memory_kind": PeakMemory(device).kind, "nvml": sampler is not None, "python": sys.executable,
                 "engine": str(Path(visurf_engine.__file__).parent)}  # fmt: skip
        conn.send(("ready", info))

        def next_step():
            i = conn.recv()
            if sampler is not None:
                sampler.window()  # drop the samples taken between steps
            return i

        def report(m: dict[str, float]) -> None:
            m = {k: float(v) for k, v in m.items() if k.startswith(KEEP)} | (sampler.window() if sampler else {})
            conn.send(("step", m))

        side.run(next_step, report)
        conn.send(("done", None))
    except BaseException:  # the coordinator prints it and goes on without this point
        conn.send(("error", traceback.format_exc()))
        return 1
    finally:
        if sampler is not None:
            sampler.close()
    return 0


# -- the coordinator's side ------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """This environment, with the engine and kernels this process imported first on ``PYTHONPATH``,
    so that a worker in another interpreter (a vLLM environment) runs the same code."""
    import visurf_engine
    import visurf_kernels

    paths = [str(Path(m.__file__).resolve().parents[1]) for m in (visurf_engine, visurf_kernels)]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths + [p for p in (os.environ.get("PYTHONPATH"),) if p])}


class Worker:
    """The coordinator's handle on one point's worker process (``python`` runs it: another
    interpreter, e.g. a vLLM environment, can hold a point): grants its steps one at a time and
    keeps the metrics of the measured ones (``records``)."""

    def __init__(self, point: Point, base: dict[str, Any]):
        self.point = point
        self.process = subprocess.Popen([point.python or sys.executable, __file__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=worker_env())  # fmt: skip
        self.conn = Pipe(self.process.stdout, self.process.stdin)
        self.conn.send({"config": base["config"], "overrides": base["overrides"] + point.overrides, "side": point.side,
                        "steps": len(point.schedule)})  # fmt: skip
        self.info = self._expect("ready")
        self.records: list[dict[str, float]] = []
        self.next = 0

    def _expect(self, kind: str):
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.point.name}: worker died (exit code {self.process.wait()})") from None
        if got == "error":
            raise RuntimeError(f"{self.point.name} failed:\n{payload}")
        assert got == kind, (got, kind)
        return payload

    def step(self) -> None:
        index, measured = self.point.schedule[self.next]
        self.conn.send(index)
        m = self._expect("step")
        self.next += 1
        if measured:
            self.records.append(m)

    @property
    def remaining(self) -> int:
        return len(self.point.schedule) - self.next

    def close(self) -> None:
        self.conn.send(None)
        self._expect("done")
        self.process.wait()


if __name__ == "__main__":
    sys.exit(main())
