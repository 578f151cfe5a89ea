"""A separate inference copy of the policy (``rollout.hf.replica``), fed by the weight sync.

``Replica.of(learner, path, dtype)`` holds the policy in ``dtype`` (``bfloat16`` by default;
buffers such as the rotary ``inv_freq`` keep theirs) without gradients: a copy of the
learner's module when each rank holds the whole model (``hf``, ``megatron``'s HF view), else
the checkpoint at ``path`` loaded onto the device (``fsdp``: no rank has the whole model; the
first sync brings the current weights). Its ``SyncPlan`` (``weight_sync.py``) maps the
learner's weights (``Learner.weight_specs``: names, global shapes, tied aliases) to its own
parameters of the same (checkpoint) name, with the vLLM sync's name, tied-alias and coverage
checks.

``sync(named)`` writes every trainer tensor into its replica parameter with one ``copy_`` each,
as the stream yields them (the dtype cast happens in the copy: a sharded learner's gathered
tensor is dropped as soon as it is copied, so a sync holds one of them at a time). When the
learner's exported tensors are its own, never-reallocated storage (``Learner.stable_export``)
and on CUDA, the copies are captured once in a CUDA graph on the first sync and the graph is
replayed on every later one: a graph replays fixed addresses, which holds by construction (the
replica's parameters are its own; the trainer's optimizer updates its parameters in place, and
``MegatronLearner.export_weights`` yields the HF replica's own tensors), and every replay
asserts it (the ``data_ptr`` of each tensor passed in, and of each destination, against the
captured ones). Elsewhere the same copies run eagerly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch

from ..models.hf import load_model
from ..models.weights import TensorSpec, checkpoint_name, module_specs
from .weight_sync import SyncPlan


class Replica:
    def __init__(self, model: torch.nn.Module, trainer: tuple[dict[str, TensorSpec], dict[str, str]], *,
                 capture: bool = True):  # fmt: skip
        """``model``: the inference module (its own storage, in the replica dtype); ``trainer``: the
        specs and tied aliases of the weights the syncs will bring (``weight_sync.named_specs``);
        ``capture``: record the copies as a CUDA graph (only for stable source tensors)."""
        self.model = model.eval().requires_grad_(False)
        dtype = next(model.parameters()).dtype
        specs, aliases = trainer
        engine, _ = module_specs(self.model)
        self.plan = SyncPlan.build(specs, {checkpoint_name(n): s for n, s in engine.items()}, dtype=dtype, aliases=aliases)
        by_name = {checkpoint_name(n): p for n, p in self.model.named_parameters()}
        self.targets = {name: by_name[target] for name, target in self.plan.pairs}  # trainer name -> replica parameter
        self._capture = capture
        self._graph: torch.cuda.CUDAGraph | None = None
        self._addresses: list[tuple[int, int]] | None = None

    @classmethod
    def copy_of(cls, model: torch.nn.Module, dtype: torch.dtype, *, capture: bool = True) -> Replica:
        """A copy of a whole module, its parameters cast to ``dtype`` (tied ones stay tied)."""
        replica = copy.deepcopy(model)
        for p in replica.parameters():  # tied parameters are one object: cast once
            p.data = p.data.to(dtype)
        return cls(replica, module_specs(model), capture=capture)

    @classmethod
    def of(cls, learner, path: str | Path, dtype: torch.dtype) -> Replica:
        """The replica of ``learner``'s policy (module docstring)."""
        if learner.shares_module:
            return cls.copy_of(learner.policy.model, dtype, capture=learner.stable_export)
        model = load_model(path, dtype=dtype, device=learner.policy.device)
        return cls(model, learner.weight_specs(), capture=learner.stable_export)

    @torch.no_grad()
    def sync(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's tensors (``(in-memory name, tensor)``, aliases allowed) into the replica."""
        if not self._capture:
            for name, tensor in self.plan.stream(named):
                self.targets[name].copy_(tensor.detach())
            return
        tensors = self.plan.tensors(named)
        sources = [tensors[name].detach() for name, _ in self.plan.pairs]
        addresses = [(s.data_ptr(), self.targets[name].data_ptr()) for s, (name, _) in zip(sources, self.plan.pairs)]
        if self._graph is None and sources[0].is_cuda:
            self._graph, self._addresses = self._record(sources), addresses
        if self._graph is None:
            self._copy(sources)
            return
        if moved := [name for (name, _), a, b in zip(self.plan.pairs, addresses, self._addresses) if a != b]:
            raise RuntimeError(f"replica sync: tensors moved since the CUDA graph captured them: {moved}")
        self._graph.replay()

    @property
    def captured(self) -> bool:
        """Whether the sync runs as a captured CUDA graph."""
        return self._graph is not None

    def _copy(self, sources: list[torch.Tensor]) -> None:
        for s, (name, _) in zip(sources, self.plan.pairs):
            self.targets[name].copy_(s)

    def _record(self, sources: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
        """The copies, captured once (after a warm-up on a side stream, as capture requires)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._copy(sources)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._copy(sources)
        return graph
