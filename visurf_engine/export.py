"""``python -m visurf_engine.export CHECKPOINT OUT [--dtype bfloat16] [--base DIR]``: a training
checkpoint as a Hugging Face checkpoint directory that ``from_pretrained`` loads.

``CHECKPOINT``: a ``step_N`` directory, or a run's ``checkpoints/`` (its ``latest``), or a run's
output directory. Its weights are read in one process, whatever backend wrote them
(``model.safetensors``: ``hf``; ``state/``: ``fsdp``'s ``torch.distributed.checkpoint``, every
rank's shards joined; ``megatron_rank{r}.pt``: ``megatron``'s master weights, every rank's
slice joined into its tensor/pipeline shard and the shards converted back to HF tensors,
``learners.megatron.checkpoint``), into the model built from the base checkpoint's config, and
written with ``save_pretrained`` in ``--dtype`` (default: the weights' own) together with the
base checkpoint's tokenizer and processor files. The base checkpoint is the run's
``model.path`` or the embedded task's cached base model (``state.json``'s config), or
``--base``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .config import config_from_mapping
from .models.hf import model_class
from .models.weights import module_specs

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json", "vocab.json", "merges.txt")  # fmt: skip


def resolve_checkpoint(path: Path) -> Path:
    """The ``step_N`` directory ``path`` names (itself, a run's ``checkpoints/``, or a run dir)."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").is_file():
            return candidate
        if (candidate / "latest").is_file():
            return latest_checkpoint(candidate)
    raise FileNotFoundError(f"{path}: not a checkpoint (no state.json), a checkpoints/ directory or a run directory")


def base_checkpoint(step_dir: Path) -> Path:
    """The checkpoint the run started from, from the run's saved config."""
    from .tasks import base_model_path

    return base_model_path(config_from_mapping(json.loads((step_dir / "state.json").read_text())["config"]))


def read_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint, whole, under the model's in-memory names."""
    from .learners.megatron.checkpoint import is_megatron_checkpoint, read_hf_weights

    if is_megatron_checkpoint(step_dir):  # megatron: every rank's slices of the master weights, joined
        return read_hf_weights(step_dir)
    if (step_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(step_dir / "model.safetensors"))
    if (step_dir / "state").is_dir():  # fsdp: read the model's entries only, every shard, in this one process
        import torch.distributed.checkpoint as dcp

        stored = dcp.FileSystemReader(str(step_dir / "state")).read_metadata().state_dict_metadata
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()
                 if key.startswith("model.") and hasattr(meta, "size")}  # fmt: skip
        dcp.load(state, checkpoint_id=str(step_dir / "state"), no_dist=True)
        return {key.removeprefix("model."): t for key, t in state.items()}
    raise FileNotFoundError(f"{step_dir}: neither model.safetensors, megatron_rank*.pt nor a state/ directory")


def export(checkpoint: Path, out: Path, *, dtype: torch.dtype | None = None, base: Path | None = None) -> Path:
    """Write the weights of ``checkpoint`` as a Hugging Face checkpoint at ``out`` (module docstring)."""
    step_dir = resolve_checkpoint(Path(checkpoint))
    base = Path(base) if base is not None else base_checkpoint(step_dir)
    weights = read_weights(step_dir)
    cls = model_class(base)
    config = cls.config_class.from_pretrained(base)
    with torch.device("meta"):
        model = cls._from_config(config)
    names = {n for n, _ in model.named_parameters()}
    _, aliases = module_specs(model)
    for alias, source in aliases.items():  # a tied weight may be stored under either of its names
        if source not in weights and alias in weights:
            weights[source] = weights[alias]
    if missing := sorted(names - set(weights)):
        raise ValueError(f"{step_dir}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    dtype = dtype or next(iter(weights.values())).dtype
    model.load_state_dict({n: weights[n].to(dtype) for n in names}, strict=False, assign=True)
    model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in PROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    (out / "visurf_export.json").write_text(json.dumps({"checkpoint": str(step_dir.resolve()), "base": str(base),
                                                        "dtype": str(dtype).removeprefix("torch.")}, indent=1))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visurf_engine.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a step_N directory, a run's checkpoints/ or a run directory")
    parser.add_argument("out", type=Path, help="the Hugging Face checkpoint directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the weights' own dtype")
    parser.add_argument("--base", type=Path, help="the checkpoint the run started from (default: from the run's config)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None, base=args.base)
    except (FileNotFoundError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
