"""A Qwen2(.5)-VL's weights by name: in-memory vs checkpoint names, shapes and dtypes, tied aliases.

transformers (>= 5) nests the language model and the vision tower under ``model.`` in memory
(``model.language_model.layers.0.self_attn.q_proj.weight``, ``model.visual.blocks.0...``);
checkpoints, and ``save_pretrained``, keep the flat layout (``model.layers.0...``,
``visual.blocks.0...``): ``checkpoint_name`` maps one to the other; ``lm_head.weight`` is the
same in both. A *tied alias* is a later name of the same ``Parameter`` (``lm_head.weight`` of
``model.language_model.embed_tokens.weight`` with ``tie_word_embeddings``), stored once.
``TensorSpec``s describe weights without their data (a sharded learner's global shapes), for
plans made before any tensor is gathered (``rollout.weight_sync.SyncPlan``).
"""

from __future__ import annotations

import json
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


def _checkpoint_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]


def checkpoint_specs(model_dir: str | Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes stored in a safetensors checkpoint directory (one file or an index of shards)."""
    model_dir = Path(model_dir)
    specs = {}
    for file in _checkpoint_files(model_dir):
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = TensorSpec(tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
    return specs


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors checkpoint directory by checkpoint name, each read from disk
    (in ``dtype``, on the CPU) only when it is looked up: a consumer that takes one tensor at a
    time holds one at a time (``learners.megatron.convert.hf_to_megatron``)."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        self.dir, self.dtype = Path(model_dir), dtype
        self.file = {}
        for file in _checkpoint_files(self.dir):
            with safe_open(str(self.dir / file), framework="pt") as f:
                self.file |= dict.fromkeys(f.keys(), file)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.file[name]), framework="pt") as f:
            return f.get_tensor(name).to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file)

    def __len__(self) -> int:
        return len(self.file)
