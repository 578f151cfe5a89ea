"""The Triton kernels against the float64 oracle (tolerances: ``kernel_testing.TOLERANCES``).

On a CUDA machine they run compiled on the GPU. Without one they run in Triton's
interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is read when the ``@triton.jit``
functions are decorated (module import) and again at launch, so it is set here, for the
process, before the kernel module is imported (and the module is reloaded if something
imported it earlier without the interpreter). Interpreted shapes stay small and blocks
large enough to cover them in a few programs.

Every kernel variant the backend launches (``launched_variants``: dtypes and flag constexprs)
is checked to be the listed one, and, without a GPU, compiled ahead of time for sm_90 with
its default blocks (wgmma, TMA, no register spills, shared memory within sm_90's limit).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys

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
from visurf_kernels.function import logprobs  # noqa: E402

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


# -- every kernel variant the backend launches ---------------------------------------------
# ``TritonTiles.stats`` / ``grads`` (driven by ``function.py``) launch these combinations of
# descriptor dtypes and flag constexprs, per input dtype ``dt`` in bf16, fp16, fp32 (blocks:
# ``TritonTiles.for_dtype(dt)``); ``buf`` is the exp buffer, bf16 for 16-bit inputs and fp32
# for fp32 ones (``TritonTiles.stats``):
#   stats    x and W in dt; the buffer stored (STORE_BUF, a gradient pass) or none (the
#            no-gradient passes: fused_logprobs, rows with w = 0); WITH_ENTROPY on or off    4 per dt
#   dhidden  buffer, W in dt; out fp32 (the vocab split over SPLIT > 1 programs: fp32
#            partials, summed afterwards) or dt (SPLIT == 1: d hidden written directly)     2 (fp32: 1)
#   dweight  buffer, x in dt; dW in dt with ACCUMULATE off (one chunk covers every row: dW
#            written in the weight's dtype), or the fp32 accumulator: for fp32 inputs written
#            by the first chunk (ACCUMULATE off) and load-add-stored by the later ones (on);
#            for 16-bit inputs zeroed and load-add-stored by every chunk (on)               2 per dt
# 23 in all. ``test_launched_variants_are_the_listed_ones`` checks this list against what the
# backend launches; ``test_kernels_compile_for_sm90_without_spills`` compiles each one.
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLAGS = ("WITH_ENTROPY", "STORE_BUF", "ACCUMULATE")


def launched_variants() -> set[tuple]:
    """``(kernel, input dtype, descriptor dtypes in argument order (None: no buffer), flags)``
    of every launch the triton backend makes (the comment above)."""
    out = set()
    for dt in DTYPE_NAMES.values():
        buf = "fp32" if dt == "fp32" else "bf16"
        for entropy in (False, True):
            for store in (False, True):
                out.add(("stats", dt, (dt, dt, buf if store else None), (("STORE_BUF", store), ("WITH_ENTROPY", entropy))))
        for dh in {"fp32", dt}:
            out.add(("dhidden", dt, (buf, dt, dh), ()))
        for dw, accumulate in {(dt, False), ("fp32", True)}:
            out.add(("dweight", dt, (buf, dt, dw), (("ACCUMULATE", accumulate),)))
    return out


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's variant, then launches it."""

    def __init__(self, kernel, name: str, seen: set):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            descs = tuple(DTYPE_NAMES[a.base.dtype] if a is not None else None
                          for a in args if a is None or isinstance(a, tpl.TensorDescriptor))  # fmt: skip
            flags = tuple(sorted((k, v) for k, v in kwargs.items() if k in FLAGS))
            self.seen.add((self.name, DTYPE_NAMES[args[0].base.dtype if self.name == "stats" else args[1].base.dtype],
                           descs, flags))  # fmt: skip
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_launched_variants_are_the_listed_ones(monkeypatch):
    seen = set()
    for name in ("stats", "dhidden", "dweight"):
        monkeypatch.setattr(tpl, f"_{name}_kernel", _Recorder(getattr(tpl, f"_{name}_kernel"), name, seen))
    many_chunks = dataclasses.replace(SMALL, chunk_tokens=16, dh_split=2)  # fp32 dW accumulator, fp32 dh partials
    one_chunk = dataclasses.replace(SMALL, chunk_tokens=64, dh_split=1)  # dW in the weight's dtype, dh direct
    for dtype in DTYPE_NAMES:  # rows with w = 0 (masked_frac) take the statistics-only pass
        run_loss(engine_loss(many_chunks), make_case(1501, 40, 32, 300, dtype, masked_frac=0.3, device=DEVICE))
        case = make_case(1502, 12, 32, 300, dtype, masked_frac=0.3, with_entropy=False, device=DEVICE)
        run_loss(engine_loss(one_chunk), case)
        logprobs(one_chunk, case.hidden, case.lm_weight, case.targets, LossSpec(with_entropy=True))
    assert seen == launched_variants()


def variant_id(v: tuple) -> str:
    kernel, dt, descs, flags = v
    return "-".join([kernel, dt, "/".join(str(d) for d in descs), *(f"{k}={x}" for k, x in flags)])


# Compiles every launched variant (``launched_variants``, given as JSON) with its default blocks for
# sm_90 in one clean process and runs ptxas -v on each: each must use wgmma and TMA, spill no
# registers and fit sm_90's 227 KiB of shared memory. Prints one JSON line per variant. CPU-only
# check of the compiled path; a CUDA machine runs the kernels themselves.
_SM90_CHECK = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import visurf_kernels.triton_policy_loss as tpl

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
td = lambda dt, shape: "tensordesc<%s[%s]>" % (dt, ",".join(map(str, shape)))
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ptr, i32 = "*fp32", "i32"


def check(kernel, dt, descs, flags):
    t = tpl.TritonTiles.for_dtype(TORCH[dt])
    prec = tpl._precision(TORCH[dt])
    (sbn, sbh), sbv = t.stats_block, t.stat_block
    hbn, hbh, hbv = t.dh_block
    wbv, wbh, wbn = t.dw_block
    if kernel == "stats":
        x, w, buf = descs
        fn = tpl._stats_kernel
        types = [td(x, [sbn, sbh]), td(w, [sbv, sbh]), "*i64"] + ([td(buf, [sbn, sbv])] if buf else []) + [ptr] * 4 + [i32] * 4 + ["fp32"]
        consts = dict(BLOCK_N=sbn, STAT_BLOCK=sbv, BLOCK_H=sbh, PRECISION=prec, **dict(flags))
        if buf is None:  # launched with buf_desc=None: a constexpr None
            consts["buf_desc"] = None
    elif kernel == "dhidden":
        buf, w, out = descs
        fn = tpl._dhidden_kernel
        types = [td(buf, [hbn, hbv]), td(w, [hbv, hbh]), "*i64", ptr, ptr, td(out, [1, hbn, hbh])] + [i32] * 4
        consts = dict(BLOCK_N=hbn, BLOCK_H=hbh, BLOCK_V=hbv, STAT_BLOCK=sbv, PRECISION=prec)
    else:
        buf, x, dw = descs
        fn = tpl._dweight_kernel
        types = [td(buf, [wbn, wbv]), td(x, [wbn, wbh]), "*i64", ptr, ptr, td(dw, [wbv, wbh])] + [i32] * 3
        consts = dict(BLOCK_V=wbv, BLOCK_H=wbh, BLOCK_N=wbn, STAT_BLOCK=sbv, PRECISION=prec, **dict(flags))
    names = [a for a in fn.arg_names if a not in consts]
    sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": t.num_warps, "num_stages": t.num_stages})
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:  # also when ptxas fails: a failing compile must not leave its PTX in /tmp
        os.unlink(f.name)
    r = {"wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
         "spill_bytes": sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", out)),
         "shared_kib": k.metadata.shared / 1024, "ptxas": out}
    r["ok"] = r["wgmma"] and r["tma"] and not r["spill_bytes"] and k.metadata.shared <= 227 * 1024
    return r


for v in json.loads(sys.argv[1]):
    try:
        r = check(*v)
    except Exception as e:
        r = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps({"variant": v, **r}), flush=True)
"""


@functools.cache
def _sm90_results() -> dict[str, dict]:
    """Every launched variant compiled for sm_90 (``_SM90_CHECK``, one process): id -> its result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    variants = json.dumps(sorted(launched_variants(), key=repr))
    res = subprocess.run([sys.executable, "-c", _SM90_CHECK, variants], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {variant_id((v[0], v[1], tuple(v[2]), tuple(map(tuple, v[3])))): r for r in rows for v in [r["variant"]]}


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the kernels themselves")
@pytest.mark.parametrize("variant", [
    pytest.param(v, id=variant_id(v))
    for v in sorted(launched_variants(), key=repr)
])  # fmt: skip
def test_kernels_compile_for_sm90_without_spills(variant):
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    r = _sm90_results()[variant_id(variant)]
    assert r["ok"], {k: v for k, v in r.items() if k != "variant"}
