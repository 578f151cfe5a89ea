"""The Triton kernels against the float64 oracle (tolerances: ``kernel_testing.TOLERANCES``).

On a CUDA machine they run compiled on the GPU. Without one they run in Triton's
interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is read when the ``@triton.jit``
functions are decorated (module import) and again at launch, so it is set here, for the
process, before the kernel module is imported (and the module is reloaded if something
imported it earlier without the interpreter). Interpreted shapes stay small and blocks
large enough to cover them in a few programs.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
tpl = importlib.import_module("visurf_kernels.triton_policy_loss")
if not ON_GPU and not tpl.INTERPRET:
    tpl = importlib.reload(tpl)

from visurf_kernels import LossSpec, fused_logprobs, fused_policy_loss, resolve_backend  # noqa: E402

from kernel_testing import CASES, compare, engine_loss, make_case, oracle, run_loss  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# Every case spans 2-3 stat tiles, 2-4 row chunks and a 2-way vocab split of the dh kernel.
SMALL = tpl.TritonTiles(
    stats_block=(64, 64),
    stat_block=128,
    dh_block=(64, 64, 64),
    dw_block=(64, 64, 64),
    dh_split=2,
    chunk_tokens=16,
    num_warps=4,
    num_stages=2,
)


@pytest.mark.parametrize("name", [k for k, c in CASES.items() if c[4] != torch.float64], ids=str)
def test_triton_matches_oracle(name):
    seed, n, h, v, dtype, opts = CASES[name]
    h = -(-h // 8) * 8  # TMA: rows of 16 bytes (N and V stay odd, H no multiple of the blocks)
    case = make_case(seed + 1000, n, h, v, dtype, **opts, device=DEVICE)
    out = run_loss(engine_loss(SMALL), case)
    assert out["dh"].dtype == dtype and out["dw"].dtype == dtype
    compare(out, oracle(case), dtype)


def test_triton_public_api_default_tiles():
    case = make_case(1101, 45, 40, 300, torch.bfloat16, temperature=0.9, dual_clip=3.0, logprob_frac=0.2, device=DEVICE)
    ref = oracle(case)
    compare(run_loss(fused_policy_loss, case, backend="triton"), ref, torch.bfloat16)
    logp, entropy = fused_logprobs(
        case.hidden, case.lm_weight, case.targets, LossSpec(temperature=0.9, with_entropy=True, backend="triton")
    )
    compare({"loss": ref["loss"], "clipped": ref["clipped"], "logp": logp, "entropy": entropy}, ref, torch.bfloat16)


def test_triton_on_policy_without_old_logp():
    case = make_case(1151, 30, 24, 150, torch.bfloat16, device=DEVICE)
    case.old_logp = None
    compare(run_loss(engine_loss(SMALL), case), oracle(case), torch.bfloat16)


def test_triton_all_masked_is_zero():
    case = make_case(1201, 30, 24, 150, torch.float32, device=DEVICE)
    case.w = torch.zeros_like(case.w)
    out = run_loss(engine_loss(SMALL), case)
    assert out["loss"].item() == 0.0 and (out["dh"] == 0).all() and (out["dw"] == 0).all()
    compare(out, oracle(case), torch.float32)


def test_triton_needs_tma_aligned_rows_and_auto_falls_back():
    case = make_case(1401, 12, 20, 40, torch.bfloat16, device=DEVICE)  # 40-byte rows
    with pytest.raises(ValueError, match="TMA"):
        run_loss(fused_policy_loss, case, backend="triton")
    assert resolve_backend("auto", case.hidden) == "torch"
    if ON_GPU:
        assert resolve_backend("auto", case.hidden[:, :16]) == "triton"


def test_triton_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(tpl, "INTERPRET", False)
    case = make_case(1301, 8, 16, 40, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        run_loss(engine_loss(SMALL), case)


# Compiles the kernels (default blocks, bf16 and fp32) for sm_90 in a clean process and runs
# ptxas -v on them: they must use wgmma and TMA and spill no registers. CPU-only check of
# the compiled path; a CUDA machine runs the kernels themselves instead.
_SM90_CHECK = r"""
import os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import visurf_kernels.triton_policy_loss as tpl

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
td = lambda dt, shape: "tensordesc<%s[%s]>" % (dt, ",".join(map(str, shape)))
for torch_dtype, dt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    t = tpl.TritonTiles.for_dtype(torch_dtype)
    buf = "fp32" if dt == "fp32" else "bf16"
    prec = tpl._precision(torch_dtype)
    (sbn, sbh), sbv = t.stats_block, t.stat_block
    hbn, hbh, hbv = t.dh_block
    wbv, wbh, wbn = t.dw_block
    ptr, i32 = "*fp32", "i32"
    jobs = {
        "stats": (tpl._stats_kernel,
                  [td(dt, [sbn, sbh]), td(dt, [sbv, sbh]), "*i64", td(buf, [sbn, sbv])] + [ptr] * 4 + [i32] * 4 + ["fp32"],
                  dict(BLOCK_N=sbn, STAT_BLOCK=sbv, BLOCK_H=sbh, WITH_ENTROPY=True, STORE_BUF=True, PRECISION=prec)),
        "dhidden": (tpl._dhidden_kernel,
                    [td(buf, [hbn, hbv]), td(dt, [hbv, hbh]), "*i64", ptr, ptr, td("fp32", [1, hbn, hbh])] + [i32] * 4,
                    dict(BLOCK_N=hbn, BLOCK_H=hbh, BLOCK_V=hbv, STAT_BLOCK=sbv, PRECISION=prec)),
        "dweight": (tpl._dweight_kernel,
                    [td(buf, [wbn, wbv]), td(dt, [wbn, wbh]), "*i64", ptr, ptr, td("fp32", [wbv, wbh])] + [i32] * 3,
                    dict(BLOCK_V=wbv, BLOCK_H=wbh, BLOCK_N=wbn, STAT_BLOCK=sbv, ACCUMULATE=True, PRECISION=prec)),
    }
    for name, (fn, types, consts) in jobs.items():
        names = [a for a in fn.arg_names if a not in consts]
        sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": t.num_warps, "num_stages": t.num_stages})
        assert k.metadata.shared <= 227 * 1024, (name, dt, k.metadata.shared)
        ptx = k.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", out)]
        print(name, dt, "wgmma" in ptx, "cp.async.bulk.tensor" in ptx, spills)
        assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx and not any(spills), (name, dt, out)
"""


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90_without_spills():
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SM90_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
