"""``torchrun -m visurf_engine.train model.backend=megatron`` end to end on the tiny preset.

A few ViSurf steps under TP=2 and under PP=2 (two gloo processes each, the real CLI) follow
the single-process HF backend run step for step: the members are the same (the rollout RNG
is untouched by megatron's model construction, and the HF replica gets the trained weights
after every update), so loss, grad norm and entropy agree; each writes a checkpoint of one
``megatron_rank{r}.pt`` per rank that ``python -m visurf_engine.export`` turns into an HF
checkpoint which ``from_pretrained`` loads and which matches the HF run's weights. A TP=2 run
stopped and resumed is the uninterrupted TP=2 run bit for bit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from engine_testing.runs import step_metrics, torchrun  # noqa: E402

from visurf_engine.config import ConfigError, load_config  # noqa: E402
from visurf_engine.export import export, read_weights  # noqa: E402
from visurf_engine.models.hf import load_model, load_pretrained  # noqa: E402
from visurf_engine.tasks import prepare_base_model  # noqa: E402
from visurf_engine.trainer import Trainer  # noqa: E402

SMALL = [
    "data.train_size=24", "data.eval_size=4",
    "warmstart.steps=3", "warmstart.batch_size=4", "warmstart.train_size=48",
    "rollout.n=3", "rollout.max_new_tokens=12", "rollout.eval_max_new_tokens=12",
    "train.batch_size=2", "train.micro_batch_size=3", "train.progress=false", "loss.backend=torch",
    "train.steps=3", "train.save_every=3", "train.lr=1e-4", "data.probe_size=0",
]
# float32; the backends sum in different orders (fused QKV, split heads, vocab-parallel softmax)
METRIC_RTOL = 1e-4
WEIGHT_ATOL = 3e-5  # 10% of three Adam steps at lr 1e-4


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """The reference: the same run on the HF backend, in this process."""
    root = tmp_path_factory.mktemp("megatron-e2e")
    args = SMALL + [f"warmstart.cache_dir={root / 'cache'}", f"train.output_dir={root / 'hf'}"]
    prepare_base_model(load_config(None, args))  # built once, before the runs that share it
    Trainer(load_config(None, args)).run()
    return root, args


def _assert_same_steps(ref_dir, out, steps):
    ref, got = step_metrics(ref_dir), step_metrics(out)
    assert [m["step"] for m in got] == steps
    for g in got:
        r = ref[g["step"] - 1]
        for key in ("loss", "grad_norm", "entropy", "reward/rollout_mean", "reward/gold", "len/rollout"):
            assert g[key] == pytest.approx(r[key], rel=METRIC_RTOL, abs=1e-6), (g["step"], key)


_RUNS: dict = {}


def _megatron_run(root, args, tp, pp):
    """The run's directory and stdout (run once per module)."""
    out = root / f"tp{tp}pp{pp}"
    if out not in _RUNS:
        _RUNS[out] = torchrun(args, out, "model.backend=megatron", f"parallel.tp={tp}", f"parallel.pp={pp}")
    return out, _RUNS[out]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_visurf_steps_match_hf_and_checkpoint_exports_to_hf(hf_run, tp, pp):
    root, args = hf_run
    out, stdout = _megatron_run(root, args, tp, pp)
    assert "| metric | base | final |" in stdout
    _assert_same_steps(root / "hf", out, [1, 2, 3])
    _assert_checkpoint_exports_and_matches(root, args, out)


def _assert_checkpoint_exports_and_matches(root, args, out):
    ckpt = out / "checkpoints" / "step_000003"
    assert {p.name for p in ckpt.iterdir()} >= {"megatron_rank0.pt", "megatron_rank1.pt", "state.json"}
    model = load_model(export(ckpt, out / "exported"))  # from_pretrained
    base, _ = load_pretrained(prepare_base_model(load_config(None, args)))
    ref_weights = read_weights(root / "hf" / "checkpoints" / "step_000003")
    exported = model.state_dict()
    assert set(exported) == set(base.state_dict())
    for k, w in exported.items():
        torch.testing.assert_close(w, ref_weights[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    assert any(not torch.equal(w, base.state_dict()[k]) for k, w in exported.items()), "nothing trained"


def test_resume_is_the_uninterrupted_run_bit_for_bit(hf_run):
    """TP=2 stopped after step 2 and resumed: step 3 (which depends on the restored master
    weights, Adam moments, RNGs and sampler) is the uninterrupted TP=2 run's exactly."""
    root, args = hf_run
    full, _ = _megatron_run(root, args, 2, 1)
    out, mg = root / "resume", ["model.backend=megatron", "parallel.tp=2"]
    torchrun(args, out, *mg, "train.steps=2", "train.save_every=2")
    torchrun(args, out, *mg, "train.resume=true")
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))} for m in ms]  # noqa: E731
    assert strip(step_metrics(out)) == strip(step_metrics(full))  # wall times and peak memory are the process's
    got, ref = (read_weights(run / "checkpoints" / "step_000003") for run in (out, full))
    assert set(got) == set(ref) and all(torch.equal(got[k], w) for k, w in ref.items())


def test_parallel_keys_need_the_megatron_backend():
    with pytest.raises(ConfigError, match="parallel.tp/parallel.pp: 2/1 need model.backend=megatron"):
        load_config(None, ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="parallel.pp: must be > 0"):
        load_config(None, ["model.backend=megatron", "parallel.pp=0"])
    with pytest.raises(ConfigError, match="model.backend: 'nemo' is not one of hf, fsdp, megatron"):
        load_config(None, ["model.backend=nemo"])
