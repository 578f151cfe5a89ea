"""Rollouts with vLLM, colocated in this process, its weights synced in place from the trainer.

``VLLMRollout`` owns one ``vllm.LLM`` per rank, run in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the trainer's tensors reach it by reference. Under
torchrun (an initialised process group of more than one rank) it is built with
``distributed_executor_backend="external_launcher"``: the engine joins the existing world
instead of creating one (vLLM's default uniprocess executor would place every rank's engine on
device 0) and, with tensor parallel size 1, every rank holds an independent engine ("external
data parallel"). ``from_policy`` (what ``rollout.build_rollout`` uses) builds it from the
checkpoint directory the policy was loaded from, read through symbolic links (nothing is
copied; ``link_checkpoint``), then syncs the policy's current weights into it (after a resume
they differ from the checkpoint's); the links are removed once the engine holds its weights.

**One engine per process.** vLLM keeps its parallel state in module globals, and shutting an
in-process engine down (explicitly, or when it is garbage-collected) tears all of it down, the
torch default process group included; an older engine collected after a newer one was built
would break the newer one. So a process holds one open engine: building one closes the
previous one (whose later use raises), except under torchrun, where that would destroy the
process group the trainer shares with vLLM: there a second engine is refused.

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
The trainer's fused loss scores ``log softmax(z / T)`` over the whole vocabulary: the two differ
by ``log(1 - p_suppressed)`` (and the top-p renormalisation), which is part of the
rollout/trainer mismatch that ``algo.mismatch`` measures and the TIS correction reweights.

**Reproducibility.** Every request gets a seed drawn from the caller's torch RNG (vLLM gives
child ``i`` of an ``n``-sample request ``seed + i``; seeds are drawn from ``[0, 2**62)``, so
streams do not overlap in practice): rollouts follow ``train.seed`` and resume exactly, as HF
sampling does. Building an ``LLM`` re-seeds the global RNGs (torch, numpy, ``random``) and, on
CPU, replaces ``torch.set_num_threads`` with a no-op; every call into vLLM here restores the
caller's RNG states, thread count and ``set_num_threads``.

**Weight sync.** ``sync_weights`` streams the trainer's tensors through a ``SyncPlan``
(``weight_sync.py``: names, dtype cast, buckets) into vLLM's ``reload_weights``, which loads each
layer in checkpoint format and copies the result into the layer's existing storage, then resets
the engine-side encoder cache (vision embeddings of the old weights; without it the next
generate fails with "Encoder cache miss") and the prefix cache (KV blocks of prompts computed
with the old weights, otherwise reused for a repeated prompt). On CUDA it checks that no engine
parameter moved (``data_ptr`` before and after: captured CUDA graphs stay valid). On CPU the
check means nothing: vLLM's CPU backend repacks each linear weight into a oneDNN handle after
loading and leaves the parameter itself empty, so the log-prob parity with the trainer is the
test.

**Sleep** (``rollout.vllm.sleep``, ``rollout.vllm.sleep_level``; CUDA). Between a ``sample`` and
the next sync the engine sleeps (KV cache released, weights as the level says), so the update has
the device memory. ``SleepState`` is the only caller of ``LLM.sleep`` / ``wake_up`` and keeps, per
memory pool (``weights``, ``kv_cache``), whether it is asleep: ``sample`` puts both to sleep; the
sync wakes ``weights``, loads, then wakes ``kv_cache``; a wake of memory already awake calls
nothing. The state is its own, not read back from ``wake_up`` (in vLLM 0.32 it returns whether
the engine is fully awake; earlier releases returned None).

The level (vLLM 0.32: ``Worker.sleep`` / ``wake_up`` in ``v1/worker/gpu_worker.py``,
``CuMemBackend.suspend`` in ``device_allocator/sleep_mode_backend.py``, ``CuMemAllocator`` in
``device_allocator/cumem.py``), for a 7B model (Qwen2.5-VL-7B: 8.29 B parameters, 16.6 GB =
15.4 GiB in bf16), per step:

- level 1 copies every weight to pinned host memory at the sleep and back at the wake, only for
  the sync to overwrite it: 16.6 GB device -> host and 16.6 GB host -> device per step, and
  16.6 GB of pinned host memory per rank;
- level 2 (the default) discards the weights: the sleep releases their physical memory and keeps
  the virtual addresses, the wake maps fresh memory at the same addresses (``create_and_map`` of
  the kept handle), so captured CUDA graphs and the sync's storage check stay valid; the fresh
  memory's contents are undefined. The model's buffers, which no checkpoint carries, are saved
  to host at the sleep and restored at the weights' wake (``named_buffers``: the rotary cos/sin
  cache, 128000 positions x 128 in bf16, 33 MB for the 7B). The in-place reload never reads a
  parameter's old contents (``reload/layerwise.py``: each layer is rebuilt on fresh tensors from
  the loaded weights, then copied into its kept storage), and the sync plan feeds every
  checkpoint tensor exactly once, so every weight is rewritten before the KV cache wakes. Bytes
  moved per step: the buffers only. Until that sync the engine holds no weights: generating in
  between raises (at level 1 it would wake and restore them).

At either level the sync itself writes the same 16.6 GB, and the CUDA-graph and runtime pools are
kept (copied to host and back).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..config import RolloutConfig
from ..models.policy import Policy, Prompts
from . import vllm_cpu
from .auto import INSTALL_VLLM
from .base import RolloutEngine, Rollouts
from ..models.weights import checkpoint_specs, named_specs
from .weight_sync import SyncPlan

INSTALL_HINT = f"VLLMRollout needs vLLM: {INSTALL_VLLM}"

SUPPRESS_BIAS = -100.0  # vLLM clamps logit_bias to [-100, 100]

# Loggers of vLLM's in-place reload: a bucketed sync loads a subset of layers per call, and
# they warn about every layer left out of that call. The plan checked coverage beforehand.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def _add_video_processor(path: Path) -> None:
    """Give ``processor_config.json`` at ``path`` the ``video_processor`` entry vLLM's processor needs."""
    config = json.loads(path.read_text())
    config.setdefault("video_processor", {"video_processor_type": "Qwen2VLVideoProcessor"})
    path.write_text(json.dumps(config, indent=2))


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
    _add_video_processor(out_dir / "processor_config.json")
    return out_dir


def link_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    """``out_dir`` as a view of the checkpoint ``model_dir`` that vLLM can load: a symbolic link
    to each of its entries, except ``processor_config.json``, which is copied with the video
    processor entry added (``export_checkpoint``). Nothing is copied from the weights."""
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in model_dir.iterdir():
        if entry.name == "processor_config.json":
            (out_dir / entry.name).write_text(entry.read_text())
            _add_video_processor(out_dir / entry.name)
        else:
            (out_dir / entry.name).symlink_to(entry)
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


SLEEP_TAGS = ("weights", "kv_cache")  # vLLM's memory pools that sleep and wake separately


class SleepState:
    """Which of the engine's memory is asleep, and every call into vLLM's sleep mode (module
    docstring, **Sleep**). ``level`` 0 never sleeps (each method then calls nothing); 1 or 2 is
    vLLM's sleep level. ``llm`` is the ``vllm.LLM`` (passed per call: the engine may be closed)."""

    def __init__(self, level: int):
        if level not in (0, 1, 2):
            raise ValueError(f"sleep level must be 0 (no sleep), 1 or 2, got {level}")
        self.level = level
        self.asleep: set[str] = set()  # of SLEEP_TAGS
        self.discarded = False  # level 2: the weights' contents are gone until the next load

    def sleep(self, llm) -> None:
        """Put all of the engine's memory to sleep (after sampling; the engine is awake then)."""
        if self.level:
            llm.sleep(level=self.level)
            self.asleep = set(SLEEP_TAGS)
            self.discarded = self.level == 2

    def wake(self, llm, tags: Sequence[str]) -> None:
        """Wake those of ``tags`` that are asleep, in one ``wake_up``; nothing when all are awake."""
        if todo := [t for t in tags if t in self.asleep]:
            llm.wake_up(todo)
            self.asleep -= set(todo)

    def wake_to_generate(self, llm) -> None:
        """Wake everything before a generation; refused while the weights are discarded."""
        if self.discarded:
            raise RuntimeError("the vLLM engine's weights were discarded when it slept after sampling "
                               "(rollout.vllm.sleep_level=2): sync_weights must load them before it "
                               "generates again")  # fmt: skip
        self.wake(llm, SLEEP_TAGS)

    def loaded(self) -> None:
        """The sync has written every weight: they hold values again."""
        self.discarded = False


_open: list[VLLMRollout] = []  # the process's open engine (module docstring)


class VLLMRollout(RolloutEngine):
    def __init__(self, model_dir: str | Path, tokenizer, cfg: RolloutConfig):
        """``model_dir``: a checkpoint vLLM can load (``export_checkpoint`` / ``link_checkpoint``), read
        here (weights, processor, and the tensor names the sync plan checks against); ``tokenizer``:
        the policy's (for ``<|im_end|>``); ``cfg``: sampling settings and ``cfg.vllm``."""
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        model_dir = Path(model_dir)
        _check_processor_config(model_dir)
        self.cfg, v = cfg, cfg.vllm
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if vllm_cpu.apply_torchvision_cpu_shim():
            vllm_cpu.inspect_models_in_process(json.loads((model_dir / "config.json").read_text())["architectures"])
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: tensors pass by reference
        gpu = current_platform.is_cuda_alike()
        self.sleep_mode = current_platform.is_sleep_mode_available() if v.sleep is None else v.sleep
        if self.sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(f"rollout.vllm.sleep: vLLM's sleep mode is not available on {current_platform.device_name}")
        options = {"gpu_memory_utilization": v.gpu_memory_utilization} if gpu else {
            "kv_cache_memory_bytes": int(v.kv_cache_space_gib * (1 << 30))}  # fmt: skip
        if dist.is_initialized() and dist.get_world_size() > 1:  # torchrun: join its world (module docstring)
            options["distributed_executor_backend"] = "external_launcher"
            if _open:
                raise RuntimeError("a torchrun process holds one vLLM engine: closing one destroys the process "
                                   "group vLLM shares with the trainer")  # fmt: skip
        for engine in _open:
            engine.close()
        with _caller_state():
            self._llm = vllm.LLM(
                model=str(model_dir),
                dtype=v.dtype if v.dtype != "auto" else ("bfloat16" if gpu else "float32"),
                max_model_len=v.max_model_len,
                enforce_eager=not gpu if v.enforce_eager is None else v.enforce_eager,
                enable_sleep_mode=self.sleep_mode,
                limit_mm_per_prompt={"image": 1, "video": 0},
                logprobs_mode="processed_logprobs",
                seed=0,  # every request carries its own seed (module docstring)
                **options,
            )
        hf = self.llm.llm_engine.model_config.hf_config
        self.image_token_id = hf.image_token_id
        self.suppressed = [hf.image_token_id, hf.video_token_id, hf.vision_start_token_id, hf.vision_end_token_id]
        self.dtype = self.llm.llm_engine.model_config.dtype
        self._engine_specs = checkpoint_specs(model_dir)
        self._plan: SyncPlan | None = None
        self._check_storage = gpu
        self._sleep = SleepState(v.sleep_level if self.sleep_mode else 0)
        _open.append(self)

    @property
    def llm(self):
        """The ``vllm.LLM``; raises once the engine is closed."""
        if self._llm is None:
            raise RuntimeError("this vLLM engine was closed (a process holds one; a newer one replaced it)")
        return self._llm

    def close(self) -> None:
        """Shut the engine down and release its memory; vLLM's parallel state goes with it."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
            _open.remove(self)

    @classmethod
    def from_policy(cls, policy: Policy, model_dir: str | Path, cfg: RolloutConfig) -> VLLMRollout:
        """An engine over the checkpoint ``model_dir`` the policy was loaded from (through links,
        ``link_checkpoint``), holding the policy's current weights (synced in)."""
        with tempfile.TemporaryDirectory(prefix="visurf-vllm-") as tmp:
            engine = cls(link_checkpoint(model_dir, tmp), policy.tokenizer, cfg)
        engine.sync_weights(policy.model.named_parameters(remove_duplicate=False))  # tied aliases seen once
        return engine

    @classmethod
    def from_learner(cls, learner, model_dir: str | Path, cfg: RolloutConfig) -> VLLMRollout:
        """``from_policy`` for a learner (``learners.base.Learner``): the sync plan from its weight
        specs (no tensor data: a sharded learner's weights are gathered only bucket by bucket),
        then its current weights synced in."""
        with tempfile.TemporaryDirectory(prefix="visurf-vllm-") as tmp:
            engine = cls(link_checkpoint(model_dir, tmp), learner.policy.tokenizer, cfg)
        specs, aliases = learner.weight_specs()
        engine._plan = SyncPlan.build(specs, engine._engine_specs, dtype=engine.dtype, bucket_bytes=cfg.vllm.bucket_bytes,
                                      aliases=aliases)  # fmt: skip
        engine.sync_weights(learner.export_weights())
        return engine

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
        self._sleep.wake_to_generate(self.llm)
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

    def sample(self, prompts: Prompts, n: int | None = None) -> Rollouts:
        """``n`` (default ``cfg.n``) sampled completions per prompt and their sampling log-probs; the
        engine then sleeps until the next sync (``sleep_mode``; at level 2 it cannot generate before it)."""
        r = self.cfg
        n = r.n if n is None else n
        params = [
            self._params(n=n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens, logprobs=0,
                         seed=int(torch.randint(0, 2**62, ())))  # fmt: skip
            for _ in range(len(prompts))
        ]
        tokens, logprobs = [], []
        outs = self._generate(prompts, params)
        self._sleep.sleep(self.llm)
        for out in outs:
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
        params = self._params(temperature=0.0, max_tokens=self.cfg.eval_max_new_tokens)
        return [list(out.outputs[0].token_ids) for out in self._generate(prompts, [params] * len(prompts))]

    def logprobs(self, prompts: Prompts, idx: Sequence[int], completions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``score`` of ``completions[s]`` after prompt ``idx[s]``."""
        return self.score(prompts.select(idx), completions)

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
        specs, aliases = named_specs(named)
        return SyncPlan.build(specs, self._engine_specs, dtype=self.dtype, bucket_bytes=self.cfg.vllm.bucket_bytes,
                              aliases=aliases)  # fmt: skip

    def _storage(self) -> dict[str, int]:
        return self.llm.apply_model(lambda model: {n: p.data_ptr() for n, p in model.named_parameters()})[0]

    def _reload(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the tensors in place and reset the encoder cache (the prefix cache is left alone);
        a sleeping engine gets its weights back first and its KV cache after (module docstring)."""
        named = named_tensors
        if self._plan is None:
            named = list(named)
            self._plan = self._build_plan(named)
        self._sleep.wake(self.llm, ["weights"])
        before = self._storage() if self._check_storage else None
        with _caller_state(), _quiet(_RELOAD_LOGGERS), torch.no_grad():
            for batch in self._plan.batches(named):
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": iter(batch), "is_checkpoint_format": True})  # fmt: skip
        if before is not None:
            after = self._storage()
            if moved := sorted(n for n in before if after.get(n) != before[n]):
                raise RuntimeError(f"weight sync moved engine parameters to new storage: {moved}")
        self._sleep.loaded()
        self.llm.llm_engine.reset_encoder_cache()
        self._sleep.wake(self.llm, ["kv_cache"])

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
