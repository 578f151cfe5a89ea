"""A separate inference copy of the policy (``rollout.hf.replica``), fed by the weight sync.

``Replica(model, dtype)`` holds a copy of the trainer's module with its parameters cast to
``dtype`` (``bfloat16`` by default; buffers such as the rotary ``inv_freq`` keep theirs) and no
gradients, and a ``SyncPlan`` (``weight_sync.py``) from the trainer's parameters to its own:
the same name matching, tied-alias and coverage checks as the vLLM sync. The replica's names
are the trainer's, so the plan maps each trainer parameter to the replica parameter of the
same (checkpoint) name.

``sync(named)`` writes every trainer tensor into its replica parameter with one ``copy_`` each
(the dtype cast happens in the copy: no intermediate tensor, so no buckets are needed). On
CUDA the copies are captured once in a CUDA graph on the first sync and the graph is replayed
on every later one: a graph replays fixed addresses, which holds by construction (the
replica's parameters are its own and never reallocated; the trainer's optimizer updates its
parameters in place, and ``MegatronLearner.export_weights`` yields the HF replica's own
tensors), and every replay asserts it (the ``data_ptr`` of each tensor passed in, and of each
destination, against the captured ones). On CPU the same copies run eagerly.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from .weight_sync import SyncPlan, checkpoint_name, module_specs


class Replica:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.model.parameters():  # tied parameters are one object: cast once
            p.data = p.data.to(dtype)
        specs, aliases = module_specs(model)
        engine, _ = module_specs(self.model)
        self.plan = SyncPlan.build(specs, {checkpoint_name(n): s for n, s in engine.items()}, dtype=dtype, aliases=aliases)
        by_name = {checkpoint_name(n): p for n, p in self.model.named_parameters()}
        self.pairs = [(name, by_name[target]) for name, target in self.plan.pairs]  # (trainer name, replica parameter)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._addresses: list[tuple[int, int]] | None = None

    @torch.no_grad()
    def sync(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's tensors (``(in-memory name, tensor)``, aliases allowed) into the replica."""
        tensors = self.plan.tensors(named)
        sources = [tensors[name].detach() for name, _ in self.pairs]
        addresses = [(s.data_ptr(), d.data_ptr()) for s, (_, d) in zip(sources, self.pairs)]
        if self._graph is None and sources[0].is_cuda:
            self._graph, self._addresses = self._capture(sources), addresses
        if self._graph is None:
            self._copy(sources)
            return
        if moved := [name for (name, _), a, b in zip(self.pairs, addresses, self._addresses) if a != b]:
            raise RuntimeError(f"replica sync: tensors moved since the CUDA graph captured them: {moved}")
        self._graph.replay()

    @property
    def captured(self) -> bool:
        """Whether the sync runs as a captured CUDA graph."""
        return self._graph is not None

    def _copy(self, sources: list[torch.Tensor]) -> None:
        for s, (_, d) in zip(sources, self.pairs):
            d.copy_(s)

    def _capture(self, sources: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
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
