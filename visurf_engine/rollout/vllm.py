"""Rollouts with vLLM, colocated in this process, its weights synced in place from the trainer.

``VLLMRollout`` owns one ``vllm.LLM`` built from a local Hugging Face checkpoint directory
(``export_checkpoint`` writes one from the policy) and runs it in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the trainer's tensors reach it by reference.

**Prompts.** The engine's ``Prompts`` carry ids already expanded by the HF processor (one
``<|image_pad|>`` per merged image token). vLLM expands the placeholder itself, so each run of
image pads is collapsed to one and the PIL image is passed as ``multi_modal_data``; vLLM's
processor, loaded from the same checkpoint directory (same min/max pixels), must reproduce the
expanded ids exactly, and every call checks that it did (passing expanded ids would expand them
again). Pre-processed ``pixel_values`` are not accepted by vLLM.

**Sampling.** ``sample`` draws ``n`` completions per prompt with ``temperature`` / ``top_p``;
the vision placeholder tokens (image, video, vision start/end) get a logit bias of -100 (vLLM's
bound; ``exp(-100)`` is 0 in float32), as the HF engine suppresses them. Each completion ends at
(and includes) ``<|im_end|>`` or is cut at ``max_new_tokens``. Its per-token log-probs are those
of the distribution it was sampled from, ``log softmax((z + bias) / T)`` after top-p
(``logprobs_mode="processed_logprobs"``; vLLM's default, raw, is before bias and temperature).
Note the trainer's fused loss scores ``log softmax(z / T)`` over the whole vocabulary: the two
differ by ``log(1 - p_suppressed)``, which importance-sampling corrections must account for (or
neglect, for a trained model where ``p_suppressed`` is tiny).

**Reproducibility.** Every request gets a seed drawn from a generator seeded with ``cfg.seed``
(vLLM gives child ``i`` of an ``n``-sample request ``seed + i``; seeds are drawn from ``[0,
2**62)``, so streams do not overlap in practice). Building an ``LLM`` re-seeds the global RNGs
(torch, numpy, ``random``) and, on CPU, replaces ``torch.set_num_threads`` with a no-op; every
call into vLLM here restores the caller's RNG states, thread count and ``set_num_threads``, so
the trainer's random stream is the same with or without this engine.

**Weight sync.** ``sync_weights`` streams the trainer's tensors through a ``SyncPlan``
(``weight_sync.py``: names, dtype cast, buckets) into vLLM's ``reload_weights``, which loads each
layer in checkpoint format and copies the result into the layer's existing storage, then resets
the engine-side encoder cache (vision embeddings of the old weights; without it the next
generate fails with "Encoder cache miss") and the prefix cache (KV blocks of prompts computed
with the old weights, otherwise reused for a repeated prompt). On CUDA it checks that no engine
parameter moved (``data_ptr`` before and after: captured graphs stay valid). On CPU the check
means nothing: vLLM's CPU backend repacks each linear weight into a oneDNN handle after loading
and leaves the parameter itself empty, so the log-prob parity with the trainer is the test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..models.policy import Prompts
from . import vllm_cpu
from .base import RolloutEngine, Rollouts
from .weight_sync import SyncPlan, TensorSpec, checkpoint_specs

INSTALL_HINT = (
    "VLLMRollout needs vLLM: on a GPU machine `pip install -e '.[vllm]'` (with the CUDA torch that vLLM pins); "
    "on a CPU machine build the CPU environment with `bash scripts/setup_vllm_cpu.sh VENV_DIR`"
)

SUPPRESS_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]

_DEFAULTS = {
    "n": 4,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 48,
    "eval_max_new_tokens": 48,
    "dtype": "float32",
    "max_model_len": 1024,
    "kv_cache_space_gib": 1.0,  # CPU: KV cache size
    "gpu_memory_utilization": 0.3,  # GPU: share of device memory for weights + KV cache (colocated with training)
    "enforce_eager": True,
    "seed": 0,
    "bucket_bytes": 256 << 20,  # weight sync: bytes (engine dtype) per reload call
}

# Loggers of vLLM's in-place reload: a bucketed sync loads a subset of layers per call, and
# they warn about every layer left out of that call. The plan checked coverage beforehand.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def _setting(cfg: Any, key: str):
    if isinstance(cfg, Mapping):
        return cfg.get(key, _DEFAULTS[key])
    return getattr(cfg, key, _DEFAULTS[key])


def export_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """Save ``model`` and ``processor`` (with its tokenizer) where vLLM can load them.

    vLLM builds the stock ``Qwen2_5_VLProcessor``, which requires a video processor; the
    engine's processor is image-only and saves none, so ``processor_config.json`` gets
    ``"video_processor": {"video_processor_type": "Qwen2VLVideoProcessor"}`` (defaults; the
    engine never sends video).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    path = out_dir / "processor_config.json"
    config = json.loads(path.read_text())
    config.setdefault("video_processor", {"video_processor_type": "Qwen2VLVideoProcessor"})
    path.write_text(json.dumps(config, indent=2))
    return out_dir


def _check_processor_config(model_dir: Path) -> None:
    path = model_dir / "processor_config.json"
    if not path.is_file() or (model_dir / "video_preprocessor_config.json").is_file():
        return
    if "video_processor" not in json.loads(path.read_text()):
        raise ValueError(
            f"{model_dir}: processor_config.json has no video_processor, which vLLM's Qwen2.5-VL processor needs; "
            "write the checkpoint with visurf_engine.rollout.vllm.export_checkpoint"
        )


@contextlib.contextmanager
def _caller_state():
    """Restore the caller's RNG states, torch thread count and ``torch.set_num_threads`` on exit."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet(names: Sequence[str]):
    loggers = [logging.getLogger(n) for n in names]
    levels = [l.level for l in loggers]
    for l in loggers:
        l.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for l, level in zip(loggers, levels):
            l.setLevel(level)


def _collapse_image_pads(ids: Sequence[int], image_token_id: int) -> list[int]:
    """``ids`` with each run of ``image_token_id`` reduced to one token (vLLM re-expands it)."""
    out: list[int] = []
    for t in ids:
        if not (t == image_token_id and out and out[-1] == image_token_id):
            out.append(t)
    return out


class VLLMRollout(RolloutEngine):
    def __init__(self, model_dir: str | Path, tokenizer, cfg: Any):
        """``model_dir``: a checkpoint written by ``export_checkpoint``; ``tokenizer``: the policy's (for
        ``<|im_end|>``); ``cfg``: a mapping or an object with the keys of ``_DEFAULTS`` (missing ones
        take those defaults)."""
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.model_dir = Path(model_dir)
        _check_processor_config(self.model_dir)
        self.cfg = {k: _setting(cfg, k) for k in _DEFAULTS}
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if vllm_cpu.apply_torchvision_cpu_shim():
            vllm_cpu.inspect_models_in_process(json.loads((self.model_dir / "config.json").read_text())["architectures"])
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: tensors pass by reference
        memory = (
            {"kv_cache_memory_bytes": int(self.cfg["kv_cache_space_gib"] * (1 << 30))}
            if current_platform.is_cpu()
            else {"gpu_memory_utilization": self.cfg["gpu_memory_utilization"]}
        )
        with _caller_state():
            self.llm = vllm.LLM(
                model=str(self.model_dir),
                dtype=self.cfg["dtype"],
                max_model_len=self.cfg["max_model_len"],
                enforce_eager=self.cfg["enforce_eager"],
                limit_mm_per_prompt={"image": 1, "video": 0},
                logprobs_mode="processed_logprobs",
                seed=self.cfg["seed"],
                **memory,
            )
        hf = self.llm.llm_engine.model_config.hf_config
        self.image_token_id = hf.image_token_id
        self.suppressed = [hf.image_token_id, hf.video_token_id, hf.vision_start_token_id, hf.vision_end_token_id]
        self.dtype = self.llm.llm_engine.model_config.dtype
        self._seeds = torch.Generator().manual_seed(self.cfg["seed"])
        self._engine_specs = checkpoint_specs(self.model_dir)
        self._plan: SyncPlan | None = None
        self._check_storage = torch.cuda.is_available()

    # ---- generation ---------------------------------------------------------------------

    def _requests(self, prompts: Prompts, completions: Sequence[Sequence[int]] | None = None) -> list[dict]:
        reqs = []
        for i in range(len(prompts)):
            ids = _collapse_image_pads(prompts.input_ids[i].tolist(), self.image_token_id)
            if completions is not None:
                ids += list(completions[i])
            reqs.append({"prompt_token_ids": ids, "multi_modal_data": {"image": prompts.images[i]}})
        return reqs

    def _generate(self, prompts: Prompts, params: list, completions=None) -> list:
        with _caller_state():
            outs = self.llm.generate(self._requests(prompts, completions), params, use_tqdm=False)
        for i, out in enumerate(outs):
            expected = prompts.input_ids[i].tolist() + (list(completions[i]) if completions is not None else [])
            if list(out.prompt_token_ids) != expected:
                raise RuntimeError(
                    f"vLLM expanded prompt {i} to {len(out.prompt_token_ids)} tokens, the engine's processor to "
                    f"{len(expected)}: the checkpoint's image processor settings (min/max pixels) differ from the trainer's"
                )
        return outs

    def _params(self, **kwargs):
        from vllm import SamplingParams

        return SamplingParams(
            logit_bias={t: SUPPRESS_BIAS for t in self.suppressed},
            stop_token_ids=[self.eos_id],
            detokenize=False,
            **kwargs,
        )

    def _seed(self) -> int:
        return int(torch.randint(0, 2**62, (), generator=self._seeds))

    def sample(self, prompts: Prompts, n: int | None = None) -> Rollouts:
        """``n`` (default ``cfg.n``) sampled completions per prompt and their sampling log-probs."""
        n = self.cfg["n"] if n is None else n
        params = [
            self._params(
                n=n,
                temperature=self.cfg["temperature"],
                top_p=self.cfg["top_p"],
                max_tokens=self.cfg["max_new_tokens"],
                logprobs=0,
                seed=self._seed(),
            )
            for _ in range(len(prompts))
        ]
        tokens, logprobs = [], []
        for out in self._generate(prompts, params):
            samples = sorted(out.outputs, key=lambda c: c.index)
            tokens.append([list(c.token_ids) for c in samples])
            logprobs.append(
                [
                    torch.tensor([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)], dtype=torch.float32)
                    for c in samples
                ]
            )
        return Rollouts(tokens=tokens, logprobs=logprobs)

    def greedy(self, prompts: Prompts) -> list[list[int]]:
        """One greedy completion per prompt (evaluation), at most ``cfg.eval_max_new_tokens`` tokens."""
        params = self._params(temperature=0.0, max_tokens=self.cfg["eval_max_new_tokens"])
        return [list(out.outputs[0].token_ids) for out in self._generate(prompts, [params] * len(prompts))]

    def score(self, prompts: Prompts, completions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-token log-probs ``[T_i]`` of given completions, ``log softmax(z)`` (temperature 1, no suppression).

        vLLM's prompt log-probs over ``prompt + completion``; such requests never read the prefix
        cache, so they reflect the current weights even before a prefix-cache reset.
        """
        params = self._params(max_tokens=1, prompt_logprobs=0)
        outs = self._generate(prompts, [params] * len(prompts), completions)
        return [
            torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[-len(c) :], c)], dtype=torch.float32)
            for out, c in zip(outs, completions)
        ]

    # ---- weight sync --------------------------------------------------------------------

    def _build_plan(self, named: list[tuple[str, torch.Tensor]]) -> SyncPlan:
        specs, aliases, first = {}, {}, {}
        for name, t in named:
            if id(t) in first:
                aliases[name] = first[id(t)]
            else:
                first[id(t)] = name
                specs[name] = TensorSpec(tuple(t.shape), t.dtype)
        return SyncPlan.build(specs, self._engine_specs, dtype=self.dtype, bucket_bytes=self.cfg["bucket_bytes"], aliases=aliases)

    def _storage(self) -> dict[str, int]:
        return self.llm.apply_model(lambda model: {n: p.data_ptr() for n, p in model.named_parameters()})[0]

    def _reload(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the tensors in place and reset the encoder cache (the prefix cache is left alone)."""
        named = list(named_tensors)
        if self._plan is None:
            self._plan = self._build_plan(named)
        before = self._storage() if self._check_storage else None
        with _caller_state(), _quiet(_RELOAD_LOGGERS), torch.no_grad():
            for batch in self._plan.batches(named):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(batch), "is_checkpoint_format": True})
        if before is not None:
            after = self._storage()
            if moved := sorted(n for n in before if after.get(n) != before[n]):
                raise RuntimeError(f"weight sync moved engine parameters to new storage: {moved}")
        self.llm.llm_engine.reset_encoder_cache()

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's parameters (transformers in-memory names, e.g. ``model.named_parameters()``) into vLLM.

        The plan is built on the first call from these names, shapes and dtypes, and every later
        call must pass the same names. Then the encoder and prefix caches are reset.
        """
        self._reload(named_tensors)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running)")

    @property
    def plan(self) -> SyncPlan | None:
        return self._plan
