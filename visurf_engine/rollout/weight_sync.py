"""The weight-sync plan: which trainer tensor goes to which engine tensor, in what dtype, in which bucket.

Built once, from names, shapes and dtypes only (no tensor data), and executed every step:

* **Names.** The trainer's tensors carry transformers' in-memory names; the engine was built
  from a checkpoint and is fed checkpoint names (``models.weights.checkpoint_name``).
* **Exactly once.** Every engine tensor gets exactly one trainer tensor of the same shape, and
  every trainer tensor feeds exactly one engine tensor. A tied alias (a trainer name that is
  the same ``Parameter`` as another, e.g. ``lm_head.weight`` and
  ``model.language_model.embed_tokens.weight`` with ``tie_word_embeddings``) is not sent: the
  checkpoint stores it once and the engine ties it itself. Anything else unmatched is an error
  that names the tensors.
* **dtype.** Each tensor is cast to the engine dtype (``float32`` / ``bfloat16``) when its
  bucket is sent, so the trainer keeps its master weights in its own dtype.
* **Buckets.** Tensors are sent in buckets of at most ``bucket_bytes`` (in the engine dtype),
  one engine call per bucket, so a sync never materialises more than one bucket of cast
  copies. A bucket holds whole *groups*: the tensors whose names agree up to the last two
  components (``layers.0.self_attn`` for ``layers.0.self_attn.{q,k,v}_proj.{weight,bias}``,
  ``layers.0.mlp`` for ``gate/up/down_proj``). vLLM fuses q/k/v into ``qkv_proj`` and
  gate/up into ``gate_up_proj`` and, in its layerwise reload, processes a layer once all its
  elements arrived within one call; a layer loaded partly in one call is processed with the
  rest missing. So a layer never straddles two calls. A group larger than ``bucket_bytes``
  is a bucket of its own (the bound is ``max(bucket_bytes, largest group)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

from ..models.weights import TensorSpec, checkpoint_name


def _group(engine_name: str) -> str:
    return engine_name.rsplit(".", 2)[0] if engine_name.count(".") >= 2 else ""


@dataclass
class SyncPlan:
    """``buckets[k]``: the ``(trainer_name, engine_name)`` pairs of engine call k, in trainer order."""

    buckets: list[list[tuple[str, str]]]
    aliases: dict[str, str]  # trainer alias -> trainer source, never sent
    dtype: torch.dtype
    bucket_bytes: int

    @classmethod
    def build(
        cls,
        trainer: Mapping[str, TensorSpec],
        engine: Mapping[str, TensorSpec],
        *,
        dtype: torch.dtype,
        bucket_bytes: int = 256 << 20,
        aliases: Mapping[str, str] | None = None,
    ) -> SyncPlan:
        """Match ``trainer`` (in-memory names, aliases excluded) to ``engine`` (checkpoint names); raise on any mismatch."""
        aliases = dict(aliases or {})
        if bad := sorted(a for a, src in aliases.items() if src not in trainer or a in trainer):
            raise ValueError(f"weight sync: tied aliases without a trainer source, or listed twice: {bad}")
        pairs, extra, wrong_shape, seen = [], [], [], {}
        for name, spec in trainer.items():
            target = checkpoint_name(name)
            if target in seen:
                raise ValueError(f"weight sync: trainer tensors {seen[target]!r} and {name!r} both map to {target!r}")
            seen[target] = name
            if target not in engine:
                extra.append(name)
            elif tuple(engine[target].shape) != tuple(spec.shape):
                wrong_shape.append(f"{name} {tuple(spec.shape)} -> {target} {tuple(engine[target].shape)}")
            else:
                pairs.append((name, target))
        missing = sorted(set(engine) - set(seen))
        if extra or missing or wrong_shape:
            raise ValueError(
                "weight sync: trainer and engine tensors do not match one to one"
                + (f"; trainer tensors the engine lacks: {extra}" if extra else "")
                + (f"; engine tensors no trainer tensor feeds: {missing}" if missing else "")
                + (f"; shape mismatches: {wrong_shape}" if wrong_shape else "")
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        groups: dict[str, list[tuple[str, str]]] = {}
        for pair in pairs:
            groups.setdefault(_group(pair[1]), []).append(pair)
        buckets: list[list[tuple[str, str]]] = []
        size = 0
        for group in groups.values():
            nbytes = sum(itemsize * math.prod(trainer[t].shape) for t, _ in group)
            if not buckets or size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1] += group
            size += nbytes
        return cls(buckets=buckets, aliases=aliases, dtype=dtype, bucket_bytes=bucket_bytes)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every ``(trainer_name, engine_name)``, bucket after bucket."""
        return [pair for bucket in self.buckets for pair in bucket]

    def _unplanned_error(self, missing, unplanned) -> ValueError:
        return ValueError(f"weight sync: tensors differ from the plan; missing {sorted(missing)}, unplanned {sorted(unplanned)}")

    def tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The planned trainer tensors by name; ``named_tensors`` must hold every planned name
        (aliases may be present and are skipped) and no other."""
        tensors = {name: t for name, t in named_tensors if name not in self.aliases}
        planned = {t for t, _ in self.pairs}
        if set(tensors) != planned:
            raise self._unplanned_error(planned - set(tensors), set(tensors) - planned)
        return tensors

    def stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The planned ``(trainer_name, tensor)`` pairs of ``named_tensors`` as they come, aliases
        skipped, nothing held back (a sharded learner's gathered tensors are freed one by one);
        an unplanned name raises when it comes, a missing one at the end."""
        planned = {t for t, _ in self.pairs}
        seen: set[str] = set()
        for name, t in named_tensors:
            if name in self.aliases:
                continue
            if name not in planned:
                raise self._unplanned_error(set(), {name})
            seen.add(name)
            yield name, t
        if seen != planned:
            raise self._unplanned_error(planned - seen, set())

    def batches(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """One ``[(engine_name, tensor in the engine dtype)]`` list per bucket, each yielded as soon
        as its last tensor arrives from the stream (``stream``); a bucket's tensors are cast as
        they arrive, so a sync holds about one bucket of cast copies (more only if the stream
        comes out of plan order)."""
        bucket_of = {name: k for k, bucket in enumerate(self.buckets) for name, _ in bucket}
        target = dict(self.pairs)
        pending: dict[int, dict[str, torch.Tensor]] = {}
        ready = 0
        for name, t in self.stream(named_tensors):
            pending.setdefault(bucket_of[name], {})[name] = t.detach().to(self.dtype)
            while ready < len(self.buckets) and len(pending.get(ready, ())) == len(self.buckets[ready]):
                got = pending.pop(ready)
                yield [(target[n], got[n]) for n, _ in self.buckets[ready]]
                ready += 1
