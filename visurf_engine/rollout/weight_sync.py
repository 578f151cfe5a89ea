"""The weight-sync plan: which trainer tensor goes to which engine tensor, in what dtype, in which bucket.

Built once, from names, shapes and dtypes only (no tensor data), and executed every step:

* **Names.** The trainer holds a transformers (>= 5) Qwen2(.5)-VL, whose in-memory names
  nest the language model and the vision tower under ``model.``
  (``model.language_model.layers.0.self_attn.q_proj.weight``, ``model.visual.blocks.0...``).
  Checkpoints, and ``save_pretrained``, keep the flat layout (``model.layers.0...``,
  ``visual.blocks.0...``); the engine was built from such a checkpoint and is fed the same
  names (``checkpoint_name``). ``lm_head.weight`` is the same in both.
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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

# in-memory prefix -> checkpoint prefix (transformers >= 5, Qwen2-VL and Qwen2.5-VL)
_CHECKPOINT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def checkpoint_name(name: str) -> str:
    """Checkpoint (``save_pretrained``) name of a transformers in-memory parameter name."""
    for memory, checkpoint in _CHECKPOINT_PREFIXES:
        if name.startswith(memory):
            return checkpoint + name[len(memory) :]
    return name


def named_specs(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """``(specs, aliases)`` of named trainer tensors: every tensor once, and each tied alias (a later
    name of the same tensor object) -> its source name."""
    specs: dict[str, TensorSpec] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in named:
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        specs[name] = TensorSpec(tuple(t.shape), t.dtype)
    return specs, aliases


def module_specs(model: torch.nn.Module) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """``named_specs`` of a module's parameters, tied ones included."""
    return named_specs(model.named_parameters(remove_duplicate=False))


def checkpoint_specs(model_dir: str | Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes stored in a safetensors checkpoint directory (one file or an index of shards)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    specs = {}
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = TensorSpec(tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
    return specs


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

    def tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The planned trainer tensors by name; ``named_tensors`` must hold every planned name
        (aliases may be present and are skipped) and no other."""
        tensors = {name: t for name, t in named_tensors if name not in self.aliases}
        planned = {t for t, _ in self.pairs}
        if set(tensors) != planned:
            raise ValueError(
                f"weight sync: tensors differ from the plan; missing {sorted(planned - set(tensors))}, "
                f"unplanned {sorted(set(tensors) - planned)}"
            )
        return tensors

    def batches(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """One ``[(engine_name, tensor in the engine dtype)]`` list per bucket, cast lazily bucket by bucket."""
        tensors = self.tensors(named_tensors)
        for bucket in self.buckets:
            yield [(target, tensors[name].detach().to(self.dtype)) for name, target in bucket]

