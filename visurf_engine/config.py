"""Run configuration: typed dataclasses, a YAML file, and ``key=value`` overrides.

``load_config("configs/x.yaml", ["algo.paradigm=rlvr", "train.steps=10"])`` reads the file
(optional), applies the overrides in order (values parsed as YAML scalars), and validates.
An unknown key, a wrong type or an out-of-range value raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from visurf_kernels import BACKENDS, OBJECTIVES, LossSpec
from visurf_kernels.spec import KL_ESTIMATORS

from .lr_schedule import SCHEDULES

from .algo.members import AGGREGATIONS
from .algo.paradigms import PARADIGMS


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range."""


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face checkpoint dir (Qwen2-VL / Qwen2.5-VL); None -> `preset`
    preset: str = "tiny"  # built from config with random init when `path` is None
    dtype: str = "float32"  # master weights, gradients and optimizer state: float32 | bfloat16 (pure bf16)
    compute_dtype: str = "auto"  # every forward's matmuls and the fused loss's inputs: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    backend: str = "hf"  # hf (transformers, DDP) | fsdp (FSDP2: sharded weights, grads, optimizer) | megatron (megatron-core TP x PP x DP)
    image_processor: str = "native"  # native (csrc/; HF's, warned, when not built) | hf (transformers' PIL one)


@dataclass
class ParallelConfig:
    """Model parallelism of ``model.backend=megatron``; data parallel over the rest of the world."""

    tp: int = 1  # tensor-parallel size (divides the KV heads)
    pp: int = 1  # pipeline-parallel size (divides the layers)


@dataclass
class FSDPConfig:
    """``model.backend=fsdp``: torch FSDP2 over every rank (``learners/fsdp.py``)."""

    offload: bool = False  # parameters, gradients and optimizer state in host memory (CPUOffloadPolicy)
    reshard_after_forward: bool = True  # free each layer's gathered parameters after its forward (gather again in backward)


@dataclass
class DataConfig:
    task: str = "shapes"  # shapes (embedded, procedurally generated) | files
    reward: str = "grounding"  # reward registry name
    train_path: str | None = None  # JSONL / parquet for task=files
    eval_path: str | None = None
    eval_split: float | None = None  # task=files without eval_path: the share of training rows held out (by a seeded hash of the row id)
    on_bad_row: str = "error"  # error | skip (counted and logged)
    train_size: int = 2000  # shapes task sizes
    eval_size: int = 200
    absent_ratio: float = 0.3  # share of shapes training queries whose object is absent (docs/results.md, "A robust default")
    eval_absent_ratio: float = 0.5  # the same share in the held-out split (N-Acc over its absent rows, bbox_acc over the rest)
    probe_size: int | None = None  # forgetting-probe rows (count / colour questions) scored at every evaluation; shapes only; None: 100 on shapes, else 0
    seed: int = 1234


@dataclass
class WarmStartConfig:
    """Positive-only SFT that makes the embedded task's base model (cached by its settings)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    train_size: int = 4000
    probe_share: float = 0.25  # share of each batch that is the forgetting probe's task (count / colour)
    direct_share: float = 0.5  # share of grounding targets answered directly (empty think slot) instead of reasoned
    atomic_tags: bool = True  # the tokenizer keeps <think>, </think>, <answer>, </answer> whole (added tokens); false: BPE merges them with their neighbours
    cache_dir: str = ".cache/visurf_engine"


@dataclass
class HFRolloutConfig:
    """``rollout.backend=hf``: transformers ``generate`` (``rollout/hf.py``)."""

    replica: bool | None = None  # generate with a separate inference copy fed by the weight sync; false: the training module; null: a replica only where the learner has no whole module (fsdp)
    dtype: str = "bfloat16"  # replica dtype: float32 | bfloat16
    static_cache: bool | None = None  # replica: static KV cache + compiled (CUDA-graph) decode; null: on CUDA only
    decode: str = "auto"  # generate (transformers') | loop (models.decode: the same decoding, none of generate's per-token overhead) | auto (loop on CPU)


@dataclass
class VLLMConfig:
    """``rollout.backend=vllm``: an in-process vLLM engine per rank (``rollout/vllm.py``)."""

    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    max_model_len: int = 1024  # longest prompt + completion, in tokens
    kv_cache_space_gib: float = 1.0  # CPU: KV cache size
    gpu_memory_utilization: float = 0.3  # GPU: device-memory share for vLLM's weights + KV cache (the rest trains)
    enforce_eager: bool | None = None  # null: eager on CPU, CUDA graphs on GPU
    sleep: bool | None = None  # sleep from each sampling to the next weight sync; null: where supported (CUDA)
    sleep_level: int = 2  # 2: weights discarded while asleep (the sync rewrites them); 1: copied to host and back
    bucket_bytes: int = 256 << 20  # weight sync: bytes (engine dtype) per reload call


@dataclass
class RolloutConfig:
    backend: str = "auto"  # hf (transformers) | vllm | auto: chosen at start-up by device, vLLM installed, model size (rollout/auto.py)
    n: int = 4  # G rollouts per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    eval_max_new_tokens: int = 48
    hf: HFRolloutConfig = field(default_factory=HFRolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class AlgoConfig:
    paradigm: str = "visurf"  # a registered paradigm (algo.paradigms): sft | rlvr | visurf | sft_then_rlvr | luffy | chord | dft | hpt
    sft_steps: int = -1  # sft_then_rlvr: SFT steps before RLVR; -1 = half of train.steps
    align: bool = True  # render the gold in the policy's own style
    align_style: str = "auto"  # auto | a style name of the reward (used when align is on)
    eliminate: bool = True  # zero the gold's thinking-format reward
    smooth: bool = True  # gold reward := mean rollout reward when a rollout is at least as good
    norm_by_std: bool = True  # False: Dr.GRPO advantages (r - mean)
    adv_eps: float = 1e-6
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None  # c > 1 enables dual-clip for negative advantages
    gold_loss: str = "ppo"  # visurf's gold objective: ppo (the rollouts' clipped surrogate) | logprob (-A* log pi) | dft (-A* sg(p) log p) | shaped | phi
    luffy_gamma: float = 0.1  # luffy: the policy shaping f(p) = p / (p + gamma) of the gold's tokens
    chord_mu: tuple[float, float, int] = (0.9, 0.05, 200)  # chord: mu from start to end, linearly over that many steps
    chord_phi: bool = False  # chord: weight the SFT term's tokens by p (1 - p) (CHORD-phi)
    hpt_threshold: float = 0.0  # hpt: RL on a prompt whose rollouts' success rate exceeds this, else SFT on its gold
    aggregation: str = "seq-mean-token-mean"  # every member weighs alike: the short "[]" gold as much as a long rollout
    updates_per_step: int = 1  # optimizer steps per batch (>1 needs an old-log-prob pass)
    kl_coef: float = 0.0  # KL penalty against the frozen base model, every phase (0, the paper's: none, and no reference pass)
    kl_estimator: str = "k3"  # k1 | k2 | k3 (= verl low_var_kl, TRL's)
    rollout_correction: str = "none"  # none | tis: token weight x min(pi_old / pi_rollout, tis_cap); rollout.backend=vllm
    tis_cap: float = 2.0  # C of the truncated importance ratio


@dataclass
class LossConfig:
    backend: str = "auto"  # auto | triton | torch | reference


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 8  # prompts per step (each brings G rollouts [+ gold])
    pack: bool = True  # packed sequences (no padding, attention within each sequence); false: right-padded rows
    vision_once: bool = True  # the vision tower once per prompt image per forward, shared by its members
    share_prompts: bool = True  # packed: a group's members share one copy of their prompt in the row (the prompt's forward and backward once)
    max_tokens_per_micro_batch: int = 8192  # packed: tokens (prompt + completion) per forward/backward
    activation_checkpointing: bool = False  # recompute each decoder layer and vision block in backward (hf, fsdp)
    micro_batch_size: int = 16  # padded (train.pack=false): sequences per forward/backward
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | cosine | linear (visurf_engine/lr_schedule.py), after train.warmup_steps of linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine / linear: the rate the decay ends at, as a share of train.lr
    threads: int | None = None  # torch threads of the run (torch.set_num_threads; the order of float reductions depends on it); null: torch's default (OMP_NUM_THREADS)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    memory_check: bool = True  # CUDA: refuse a config whose memory plan (visurf_engine.plan) exceeds the GPU, naming what would fit
    max_skipped_steps: int = 5  # consecutive optimizer steps skipped for a non-finite loss / grad norm before the run stops
    seed: int = 0
    output_dir: str = "runs/default"
    eval_every: int = 100  # 0: only at the end
    save_every: int = 50
    keep_checkpoints: int = 2  # the newest checkpoints kept on disk
    resume: bool = False
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loss_spec(self) -> LossSpec:
        """The run's loss options as the kernel's ``LossSpec``, the one place config keys meet it:
        the sampling temperature (log-probs of the sampled distribution), ``algo.eps_low`` /
        ``eps_high`` / ``dual_clip`` / ``kl_coef`` / ``kl_estimator``, ``algo.luffy_gamma`` (the shaping gamma), ``algo.tis_cap`` under
        ``rollout_correction=tis``, ``loss.backend``; the entropy is always reported (logged)."""
        a = self.algo
        tis_cap = a.tis_cap if a.rollout_correction == "tis" else None
        return LossSpec(temperature=self.rollout.temperature, eps_low=a.eps_low, eps_high=a.eps_high,
                        dual_clip=a.dual_clip, tis_cap=tis_cap, with_entropy=True, backend=self.loss.backend,
                        kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, shaping_gamma=a.luffy_gamma)  # fmt: skip


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (with int -> float widening)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(obj: Any, key: str, value: Any, prefix: str = "") -> None:
    head, _, rest = key.partition(".")
    full = f"{prefix}{head}"
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}; known keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _apply(current, rest, value, f"{full}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                _apply(current, str(k), v, f"{full}.")
        else:
            raise ConfigError(f"{full}: is a section; give a mapping or use {full}.<key>=<value>")
        return
    if rest:
        raise ConfigError(f"unknown config key {prefix}{key!r}: {full!r} is not a section")
    setattr(obj, head, _coerce(full, value, hints[head]))


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def validate(cfg: Config) -> Config:
    a, t, r, d = cfg.algo, cfg.train, cfg.rollout, cfg.data
    _check_choice("algo.paradigm", a.paradigm, tuple(PARADIGMS))
    _check_choice("algo.aggregation", a.aggregation, AGGREGATIONS)
    _check_choice("algo.gold_loss", a.gold_loss, OBJECTIVES)
    if not a.luffy_gamma > 0 or not 0 <= a.hpt_threshold < 1:
        raise ConfigError(f"algo.luffy_gamma / hpt_threshold: need gamma > 0 and 0 <= threshold < 1, got {a.luffy_gamma}, "
                          f"{a.hpt_threshold}")  # fmt: skip
    if not (0 <= a.chord_mu[1] <= 1 and 0 <= a.chord_mu[0] <= 1 and a.chord_mu[2] > 0):
        raise ConfigError(f"algo.chord_mu: (start, end, decay steps) with start, end in [0, 1] and steps > 0, got {a.chord_mu}")
    _check_choice("algo.kl_estimator", a.kl_estimator, KL_ESTIMATORS)
    if a.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef: must be >= 0, got {a.kl_coef}")
    _check_choice("loss.backend", cfg.loss.backend, BACKENDS)
    if cfg.model.dtype == "auto":
        raise ConfigError("model.dtype: 'auto' is gone: model.dtype is the master weights' dtype (float32, the "
                          "default, or bfloat16); the forward's precision is model.compute_dtype (auto: bf16 on CUDA)")  # fmt: skip
    _check_choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
    _check_choice("model.compute_dtype", cfg.model.compute_dtype, ("auto", "float32", "bfloat16"))
    _check_choice("model.backend", cfg.model.backend, ("hf", "fsdp", "megatron"))
    _check_choice("train.lr_schedule", cfg.train.lr_schedule, SCHEDULES)
    if not 0 <= cfg.train.warmup_steps <= cfg.train.steps or not 0 <= cfg.train.min_lr_ratio <= 1:
        raise ConfigError(f"train.warmup_steps must be in [0, train.steps] and train.min_lr_ratio in [0, 1]; got "
                          f"{cfg.train.warmup_steps} and {cfg.train.min_lr_ratio}")  # fmt: skip
    _check_choice("model.image_processor", cfg.model.image_processor, ("native", "hf"))
    _check_choice("rollout.backend", r.backend, ("auto", "hf", "vllm"))
    _check_choice("rollout.hf.dtype", r.hf.dtype, ("float32", "bfloat16"))
    _check_choice("rollout.hf.decode", r.hf.decode, ("auto", "generate", "loop"))
    _check_choice("rollout.vllm.dtype", r.vllm.dtype, ("auto", "float32", "bfloat16"))
    _check_choice("rollout.vllm.sleep_level", r.vllm.sleep_level, (1, 2))
    _check_choice("algo.rollout_correction", a.rollout_correction, ("none", "tis"))
    _check_choice("data.task", d.task, ("shapes", "files"))
    _check_choice("data.on_bad_row", d.on_bad_row, ("error", "skip"))
    positive = {
        "train.steps": t.steps,
        "train.batch_size": t.batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.max_tokens_per_micro_batch": t.max_tokens_per_micro_batch,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.max_skipped_steps": t.max_skipped_steps,
        "rollout.n": r.n,
        "rollout.max_new_tokens": r.max_new_tokens,
        "rollout.vllm.kv_cache_space_gib": r.vllm.kv_cache_space_gib,
        "rollout.vllm.bucket_bytes": r.vllm.bucket_bytes,
        "algo.tis_cap": a.tis_cap,
        "algo.updates_per_step": a.updates_per_step,
        "data.eval_size": d.eval_size,
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    if not 0 <= a.eps_low < 1 or a.eps_high < 0:
        raise ConfigError(f"algo.eps_low/eps_high: need 0 <= eps_low < 1 and eps_high >= 0, got {a.eps_low}, {a.eps_high}")
    if a.dual_clip is not None and a.dual_clip <= 1:
        raise ConfigError(f"algo.dual_clip: must be > 1 (or null), got {a.dual_clip}")
    if r.temperature <= 0 or not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.temperature/top_p: need temperature > 0 and 0 < top_p <= 1, got {r.temperature}, {r.top_p}")
    if not 0 < r.vllm.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization: must be in (0, 1], got {r.vllm.gpu_memory_utilization}")
    budget = max(r.max_new_tokens, r.eval_max_new_tokens)
    # The checks of one backend skip rollout.backend=auto: rollout.auto.resolve validates again once it has chosen.
    if cfg.model.backend == "fsdp" and r.backend == "hf" and r.hf.replica is False:
        raise ConfigError("rollout.hf.replica: model.backend=fsdp holds no whole module to generate with; "
                          "use rollout.hf.replica=true (or null) or rollout.backend=vllm")  # fmt: skip
    if r.backend == "vllm" and r.vllm.max_model_len <= budget:
        raise ConfigError(f"rollout.vllm.max_model_len: must exceed the generation budget ({budget} tokens) "
                          f"by the longest prompt, got {r.vllm.max_model_len}")  # fmt: skip
    if a.rollout_correction == "tis" and r.backend == "hf":
        raise ConfigError("algo.rollout_correction: tis needs the rollout engine's sampling log-probs: "
                          "rollout.backend=vllm (got hf)")  # fmt: skip
    if a.paradigm == "sft_then_rlvr" and a.sft_steps >= t.steps:
        raise ConfigError(f"algo.sft_steps: must be < train.steps ({t.steps}) for sft_then_rlvr, got {a.sft_steps}")
    if d.task == "files" and not d.train_path:
        raise ConfigError("data.train_path: required when data.task=files")
    if d.task == "files" and not d.eval_path and d.eval_split is None:
        raise ConfigError("data.eval_path: required when data.task=files, unless data.eval_split holds out a share of "
                          "the training rows (e.g. data.eval_split=0.05): evaluating on training rows measures nothing")
    if d.eval_split is not None and (d.task != "files" or d.eval_path or not 0 < d.eval_split < 1):
        raise ConfigError(f"data.eval_split: a share in (0, 1), with data.task=files and no data.eval_path; got "
                          f"{d.eval_split} (task {d.task}, eval_path {d.eval_path})")
    if cfg.model.backend != "megatron" and cfg.parallel.tp * cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.tp/parallel.pp: {cfg.parallel.tp}/{cfg.parallel.pp} need model.backend=megatron")
    if not (0 <= d.absent_ratio <= 1 and 0 <= d.eval_absent_ratio <= 1):
        raise ConfigError(f"data.absent_ratio / eval_absent_ratio: must be in [0, 1], got {d.absent_ratio}, {d.eval_absent_ratio}")
    if not 0 <= cfg.warmstart.direct_share <= 1:
        raise ConfigError(f"warmstart.direct_share: must be in [0, 1], got {cfg.warmstart.direct_share}")
    if not 0 <= cfg.warmstart.probe_share < 1:
        raise ConfigError(f"warmstart.probe_share: must be in [0, 1), got {cfg.warmstart.probe_share}")
    if d.probe_size is None:
        d.probe_size = 100 if d.task == "shapes" else 0
    if d.probe_size < 0 or d.probe_size and d.task != "shapes":
        raise ConfigError(f"data.probe_size: must be >= 0, and 0 unless data.task=shapes, got {d.probe_size} (task {d.task})")
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then ``validate``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        data = yaml.safe_load(path.read_text()) or {}
    return config_from_mapping(data, overrides, source=str(path) if path is not None else "")


def config_from_mapping(data: dict, overrides: list[str] = (), source: str = "") -> Config:
    """Defaults <- ``data`` (sections as in a YAML file) <- ``key=value`` overrides, then ``validate``.

    ``source`` (e.g. the file ``data`` came from) prefixes errors about ``data``.
    """
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}top level must be a mapping of sections")
    cfg = Config()
    for k, v in data.items():
        try:
            _apply(cfg, str(k), v)
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None
    for item in overrides:
        _apply(cfg, *parse_override(item))
    return validate(cfg)
