"""megatron-core's tensor-parallel step on the device, against the HF oracle: ``python bench/megatron_tp.py``.

The check of ``tests/test_megatron_parallel.py`` and ``tests/test_learners.py`` (which run on CPU
over gloo, through the CPU shims of ``parallel/megatron_cpu.py``), run where the backend is
meant to run. ``--tp`` ranks (spawned processes, one device each: NCCL on CUDA, gloo on CPU)
load the tiny random Qwen2.5-VL of ``tests/engine_testing/megatron.py`` into tensor-parallel
shards through the converter and take one ``MegatronLearner`` step on its random micro-batches
(an image per sequence; on- and off-policy, clipped and dual-clipped tokens); this process
computes the single-process oracle (transformers' autograd, the same fused loss) on the same
device. Checked, with the tests' tolerances (float32; TF32 off on both sides): the
per-micro-batch losses, every gradient (the ranks' shards gathered into HF names), the global
grad norm and the weights after the clipped AdamW step.

On one GPU ``--tp`` is 1 (the default there): no tensor split, but megatron-core's CUDA paths
(no shims), a NCCL process group, DDP's grad buffers and ``finalize_model_grads`` on the GPU,
which the CPU tests never reach; with two GPUs or more it is 2 (the tiny model's KV heads).
On CPU (``bench/gpu.sh --dry-run``) the default is 2 over gloo, the tests' own setting.

Without megatron-core it says so and exits 0 (``bench/gpu.sh --fetch-wheels`` carries its wheel
to the GPU image). Prints one line per check and writes JSON (provenance, every error against
its tolerance) to ``--out`` (default ``bench/results/megatron_tp-<device>-<date>.json``); exits
1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from results_file import ResultsFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # engine_testing (spawned ranks inherit it)

from visurf_engine.provenance import device_name, result_path  # noqa: E402

# as in tests/test_megatron_parallel.py (float32; the two sides sum in different orders)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-5  # max |g - g_ref| / max |g_ref|, per tensor
WEIGHT_ATOL = 1e-4  # 10% of one Adam step (lr 1e-3)


def full_fp32() -> None:
    """No TF32 in matmuls or convolutions (the vision tower's patch embedding): the tolerances are float32's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def to_device(obj, device: torch.device):
    """``obj`` (a tensor, or a dataclass of them such as ``MicroBatch``) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)})
    return obj


def rank_main(rank: int, world: int, port: int, out: str, device_type: str) -> None:
    """One rank: the tiny model's TP shard on its device, one step on the random micro-batches;
    saves (on CPU) the losses, local grads (megatron names), grad norm and exported HF weights."""
    from engine_testing.megatron import MAX_NORM, OPTIM, SPEC, random_micro_batches, tiny_policy, tiny_vl_model

    from visurf_engine.learners.megatron.convert import Layout
    from visurf_engine.learners.megatron.learner import MegatronLearner
    from visurf_engine.parallel.world import World, backend_for
    from visurf_engine.parallel.megatron import init_megatron

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        full_fp32()
    dist.init_process_group(backend_for(device), rank=rank, world_size=world)
    dp = init_megatron(World(rank=rank, size=world, local_rank=rank, device=device), world, 1, seed=0)
    model = tiny_vl_model()
    micro = to_device(random_micro_batches(model), device)  # built on CPU (mRoPE positions), as the tests do
    model.to(device)
    learner = MegatronLearner(tiny_policy(model), Layout.from_hf_config(model.config, world, 1), SPEC, dp, **OPTIM)
    results = learner.forward_backward(micro)
    grads = {k: p.main_grad.detach().to("cpu", copy=True) for k, p in learner.module.named_parameters()}  # step() zeroes them
    norm = learner.step(MAX_NORM).grad_norm
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, value in learner.export_weights():
            state[name].copy_(value)
    torch.save({"losses": torch.stack([r[0] for r in results]).cpu(), "grads": grads, "norm": float(norm),
                "weights": {k: v.cpu() for k, v in model.state_dict().items()}}, Path(out) / f"rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(ranks: list[dict], ref: dict, tp: int, config) -> list[dict]:
    """Every check of the ranks' results against the oracle: name, worst error, tolerance, ok."""
    from visurf_engine.learners.megatron.convert import Layout, megatron_to_hf

    checks = []

    def check(name: str, error: float, tol: float) -> None:
        checks.append({"check": name, "error": error, "tolerance": tol, "ok": bool(error <= tol)})

    for r, rank in enumerate(ranks):
        scale = LOSS_TOL["atol"] + LOSS_TOL["rtol"] * ref["losses"].abs()
        check(f"rank {r} losses (|d| / (atol + rtol |ref|))", float(((rank["losses"] - ref["losses"]).abs() / scale).max()), 1.0)
        check(f"rank {r} grad norm (relative)", abs(rank["norm"] - ref["norm"]) / abs(ref["norm"]), GRAD_RTOL)
        check(f"rank {r} weights after the step (max |d|)",
              max(float((rank["weights"][k] - w).abs().max()) for k, w in ref["weights"].items()), WEIGHT_ATOL)  # fmt: skip
    grads = megatron_to_hf([rank["grads"] for rank in ranks], Layout.from_hf_config(config, tp, 1), 0)
    missing = sorted(set(ref["grads"]) - set(grads))
    check(f"gradients present ({len(missing)} missing{': ' + ', '.join(missing[:3]) if missing else ''})", len(missing), 0)
    worst = max(float((grads[k] - g).abs().max() / g.abs().max()) for k, g in ref["grads"].items() if k in grads)
    check("gradients (max |d| / max |ref|, worst tensor)", worst, GRAD_RTOL)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--tp", type=int, help="tensor-parallel ranks, 1 or 2 (default: 2 on CPU, min(GPUs, 2) on CUDA)")
    ap.add_argument("--out", type=Path, help="JSON path (default: bench/results/megatron_tp-<device>-<date>.json)")
    args = ap.parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    tp = args.tp or (min(torch.cuda.device_count(), 2) if device_type == "cuda" else 2)
    if tp not in (1, 2) or (device_type == "cuda" and tp > torch.cuda.device_count()):
        ap.error(f"--tp {tp}: the tiny model's 2 KV heads allow 1 or 2, one device each")
    tag = "cpu" if device_type == "cpu" else device_name().lower().replace(" ", "-")
    out = ResultsFile(args.out or result_path("megatron_tp", tag))
    payload = {"bench": "megatron_tp", "device": device_type, "tp": tp}
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        reason = "megatron-core is not installed (pip install -e '.[megatron]'; GPU image: bash bench/gpu.sh --fetch-wheels)"
        print(f"skipped: {reason}")
        out.write(payload | {"skipped": reason, "checks": []}, complete=True)
        return 0

    from engine_testing.megatron import hf_oracle, random_micro_batches, tiny_vl_model

    with tempfile.TemporaryDirectory(prefix="megatron-tp-") as tmp:
        mp.start_processes(rank_main, args=(tp, _free_port(), tmp, device_type), nprocs=tp, start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(tp)]
    device = torch.device(device_type)
    if device.type == "cuda":
        full_fp32()
    model = tiny_vl_model()
    micro = to_device(random_micro_batches(model), device)
    ref = hf_oracle(model.to(device), micro)
    ref = {"losses": ref["losses"].cpu(), "norm": ref["norm"], "grads": {k: g.cpu() for k, g in ref["grads"].items()},
           "weights": {k: w.cpu() for k, w in ref["weights"].items()}}  # fmt: skip
    checks = compare(ranks, ref, tp, model.config)
    print(f"megatron-core TP={tp} on {device_name() if device.type == 'cuda' else 'CPU (gloo)'} against the HF oracle:")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['error']:.3g} (tolerance {c['tolerance']:.3g})")
    print(f"wrote {out.write(payload | {'checks': checks}, complete=True)}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
