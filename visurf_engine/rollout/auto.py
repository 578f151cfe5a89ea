"""``rollout.backend=auto``: the generation engine a run gets, decided once at start-up.

``choose_backend(device_type, vllm_importable, params)`` is the rule, a pure function:

- CUDA: ``vllm`` when it is importable, else ``hf`` (the reason names how to install vLLM);
- elsewhere (CPU): ``vllm`` when it is importable and the model has at least
  ``CPU_VLLM_MIN_PARAMS`` parameters, else ``hf``. On a small model the HF decode loop
  (``models/decode.py``) is faster than vLLM's CPU engine, whose per-step scheduling and
  in-place weight reload outweigh its decode; ``bench/rollout_backends.py`` measures where the
  two cross.

``resolve(cfg, device_type, params)`` applies it to a config: a validated copy with
``rollout.backend`` set, so every check that depends on the backend (``algo.rollout_correction=tis``,
``rollout.vllm.max_model_len``, the memory plan) and ``build_rollout`` see the engine the run really
gets. The trainer calls ``resolve_for_run``: the parameters counted from the checkpoint's safetensors
headers (``checkpoint_params``: no weight is read), the choice logged with its reason.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

# The smallest model (parameters, as ``checkpoint_params`` counts them) for which ``auto`` picks
# vLLM on CPU. It comes from bench/rollout_backends.py's results file
# (bench/results/rollout_backends-cpu-<date>.json, "crossover"): the smallest model of the ladder
# from which vLLM's rollout + weight sync beats the HF decode loop. Measured on a quiet 2-core AMD
# EPYC, 2 threads (bench/results/rollout_backends-cpu-20261207-161808.json): the HF loop 2.1x
# vLLM's rate at the tiny model (1.2 M), vLLM 1.65x the loop's at 3b:1:1 (446,160,056); the
# ladder has no point in between (a Qwen2.5-VL-3B-width model is never smaller), so the
# threshold is the smallest model vLLM was measured to win on.
CPU_VLLM_MIN_PARAMS = 446e6

log = logging.getLogger(__name__)

INSTALL_VLLM = ("on a GPU machine `pip install -e '.[vllm]'` (with the CUDA torch that vLLM pins); on a CPU machine "
                "build the CPU environment with `bash scripts/setup_vllm_cpu.sh VENV_DIR` and run with its python")  # fmt: skip


def vllm_importable() -> bool:
    """Whether ``import vllm`` would find the package (looked up, not imported)."""
    return importlib.util.find_spec("vllm") is not None


def checkpoint_params(model_dir: str | Path) -> int:
    """The parameters stored in the checkpoint at ``model_dir`` (tied weights once), from its
    safetensors headers."""
    from ..models.weights import checkpoint_specs

    return sum(math.prod(spec.shape) for spec in checkpoint_specs(model_dir).values())


def choose_backend(device_type: str, vllm_importable: bool, params: int) -> tuple[str, str]:
    """``(backend, reason)``: ``hf`` or ``vllm`` for a model of ``params`` parameters on a device of
    ``device_type`` (``cuda``, ``cpu``), by the module docstring's rule."""
    if device_type == "cuda":
        if vllm_importable:
            return "vllm", "CUDA, vLLM importable"
        return "hf", f"CUDA, but vLLM is not importable here; for vLLM rollouts, {INSTALL_VLLM}"
    size = f"{params / 1e6:.1f} M parameters"
    crossover = f"CPU_VLLM_MIN_PARAMS = {CPU_VLLM_MIN_PARAMS / 1e6:.0f} M (visurf_engine/rollout/auto.py)"
    if params < CPU_VLLM_MIN_PARAMS:
        return "hf", f"{device_type.upper()}, {size} < {crossover}: the HF decode loop is faster at this size"
    if not vllm_importable:
        return "hf", f"{device_type.upper()}, {size} >= {crossover}, but vLLM is not importable here; {INSTALL_VLLM}"
    return "vllm", f"{device_type.upper()}, {size} >= {crossover}, vLLM importable"


def resolve(cfg, device_type: str, params: int):
    """``(cfg, reason)`` with ``rollout.backend=auto`` resolved by ``choose_backend`` (a validated
    copy of the ``Config``); an explicit backend returns ``cfg`` itself and None. A check that fails
    only with the chosen backend raises ``ConfigError`` naming the choice."""
    if cfg.rollout.backend != "auto":
        return cfg, None
    from ..config import ConfigError, config_from_mapping

    backend, reason = choose_backend(device_type, vllm_importable(), params)
    try:
        return config_from_mapping(cfg.to_dict(), [f"rollout.backend={backend}"]), reason
    except ConfigError as e:
        raise ConfigError(f"rollout.backend=auto chose {backend} ({reason}); with it, {e}") from None


def resolve_for_run(cfg, device_type: str, model_dir: str | Path, *, log_choice: bool = True):
    """``resolve`` for a run over the checkpoint at ``model_dir`` (its parameters counted only when
    the backend is ``auto``), the choice and its reason logged (``log_choice``: on one rank)."""
    if cfg.rollout.backend != "auto":
        return cfg
    cfg, reason = resolve(cfg, device_type, checkpoint_params(model_dir))
    if log_choice:
        log.info("rollout.backend=auto: %s (%s)", cfg.rollout.backend, reason)
    return cfg
