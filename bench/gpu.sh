#!/usr/bin/env bash
# Every GPU-only check and benchmark of the project, in one call that fits a lent GPU's lease (the correctness
# checks first, then the benchmarks by value). Each stage runs under its own time budget (BUDGETS below; a stage
# gets at most what is left), all of them inside BUDGET_S = 470 s, and the budgets add up to less than that, the
# rest being set-up (the carried wheels) and the summary:
#
#   kernel-tests    kernels/tests on CUDA: the Triton kernels against the float64 oracle
#   cuda-tests      pytest -m cuda (the tests that need a CUDA device: CUDA graphs, storage addresses)
#   megatron-tp     bench/megatron_tp.py: megatron-core's TP step against the HF oracle on the GPU (TP = 1 on one
#                   GPU: its CUDA paths, NCCL, DDP buffers, which the CPU tests never reach; TP = 2 with two)
#   kernels-bench   bench/kernels.py: the fused loss at the Qwen2.5-VL-7B and -3B head shapes, with bf16 inputs
#                   (Liger's fused GRPO loss beside ours; skipped, with the reason, without liger_kernel) and with
#                   the trainer's fp32 inputs under bf16 autocast (the 3xTF32 kernels)
#   throughput      bench/throughput.py --peer trl on a random-init 3B (1 warm-up + 3 steps a side, settings:
#                   THROUGHPUT_3B_OVERRIDES): per-phase times, tokens/s, MFU, NVML, TRL side by side
#   update-bench    bench/update.py on GPU (random-init 3B, G = 8, 448x448 images: the padded layout at its
#                   840x840 default would put ~72 x 3600 patches through the vision tower with autograd,
#                   an estimated 150+ GB): padded vs packed vs packed + vision once
#   weight-sync     bench/weight_sync.py at the 3B shapes (vLLM engine skipped without vllm)
#
# Every bench writes its JSON as it goes (complete: false until its last row), so a stage stopped by its budget
# keeps what it measured; a row that fails (out of memory) is recorded with its error and the others go on.
#
# Usage:
#   bench/gpu.sh                  on the GPU machine; results: $OUT (the device tool's folder) or --out DIR gets
#                                 gpu-results.tar.gz (every JSON, PNG and log), summary.txt and summary.json;
#                                 the JSON and PNG files are also copied to bench/results/
#   bench/gpu.sh --dry-run        on CPU: the same stages with each one's CPU smoke settings (CI runs it, so the
#                                 script cannot rot); results in a temporary folder, never in bench/results/
#   bench/gpu.sh --fetch-wheels   here, with a network: the optional wheels the GPU image lacks (TRL and datasets
#                                 for the peer, Liger for the kernel bench, megatron-core for megatron-tp) into
#                                 .whl/ (git-ignored), for the device call to carry (carry: [".whl"]); gpu.sh
#                                 installs them from there
#
# A missing optional package is named at the start and its stage (or row) says it was skipped; a stage that
# fails or runs out of time is marked so in the summary, with the end of its log; the summary table is last.
# Environment: THROUGHPUT_3B_OVERRIDES (below), THROUGHPUT_OVERRIDES (extra key=value for the throughput stage in
# either mode, e.g. rollout.hf.replica=true), VLLM_PYTHON (an interpreter with vLLM for the throughput stage's
# rollout.backend=vllm row), BUDGET_S, PYTHON.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=gpu
OUTDIR=${OUT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry ;;
        --fetch-wheels) MODE=fetch ;;
        --out) OUTDIR=${2:?--out needs a folder}; shift ;;
        -h|--help) sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

BUDGET_S=${BUDGET_S:-470}
# Stage budgets in seconds: stage, on the GPU, in --dry-run. Each column adds up to at most BUDGET_S (the GPU
# column leaves 15 s for set-up and the summary); docs/performance.md shows the GPU column as a table
# (tests/test_gpu_script.py checks the sums, that every stage has a row, and that the doc's table is this one).
# No stage has been timed on a GPU yet: the GPU column is an estimate.
BUDGETS="
kernel-tests     60   45
cuda-tests       60   60
megatron-tp      30   60
kernels-bench    50   40
throughput       95  110
update-bench     50   70
weight-sync      25   40
memory           85   40
"
# The throughput stage's settings on the random-init Qwen2.5-VL-3B, on one GPU (model.backend=hf: fp32 master
# weights, gradients and AdamW state, bf16 compute). Its memory plan on an 80 GB card (python -m visurf_engine.plan
# --preset qwen2.5-vl-3b --gpus 1 --gpu-gib 79 with these overrides): 56 GiB of weights, gradients and AdamW state,
# 7 GiB of autocast's weight copies, 7 GiB for the KL reference, activations under 1 GiB with checkpointing: a peak of
# 71 GiB. The trainer checks the same plan at start (train.memory_check). TRL's micro-batches follow the same token
# budget (bench/trl_peer.py).
THROUGHPUT_3B_OVERRIDES=${THROUGHPUT_3B_OVERRIDES:-"rollout.max_new_tokens=128 train.batch_size=4 train.max_tokens_per_micro_batch=2048 train.activation_checkpointing=true"}

WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 megatron-core==0.16.1"
if [ "$MODE" = fetch ]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || grep -qxF "/.whl/" .gitignore || echo "/.whl/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl $WHEELS 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    rc=${PIPESTATUS[0]}
    ls -l .whl
    exit "$rc"
fi

PY=${PYTHON:-python3}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/visurf-gpu.XXXXXX")
mkdir -p "$WORK/results" "$WORK/logs"
if [ -z "$OUTDIR" ]; then
    OUTDIR=$( [ "$MODE" = dry ] && echo "$WORK/out" || echo "$ROOT/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)" )
fi
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = gpu ]; then
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "bench/gpu.sh: no CUDA device here; use --dry-run on CPU" >&2
        exit 2
    fi
    if ls .whl/*.whl >/dev/null 2>&1; then  # carried optional wheels (--fetch-wheels); one by one if all at once fails
        pip_target() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$@"; }
        pip_target .whl/*.whl || for w in .whl/*.whl; do pip_target "$w" || echo "warning: $w does not install here; going on without"; done
        export PYTHONPATH="$WORK/site:$PYTHONPATH"
    fi
fi

# The native image pipeline (csrc/), built in the background while the kernel stages run; without it the
# engine uses Hugging Face's image processor (it says so).
BUILD_PID=
if ! ls visurf_engine/_qwen2vl_image*.so >/dev/null 2>&1; then
    $PY setup.py build_ext --inplace >"$WORK/logs/build_ext.log" 2>&1 &
    BUILD_PID=$!
fi

echo "== bench/gpu.sh ($MODE) on $($PY -c 'from visurf_engine.provenance import device_name; print(device_name())')"
COL=$([ "$MODE" = gpu ] && echo 2 || echo 3)
budget_of() { awk -v s="$1" -v c="$COL" '$1 == s { print $c }' <<<"$BUDGETS"; }
echo "   stage budgets ($MODE column of BUDGETS; all stages inside BUDGET_S = ${BUDGET_S} s):"
awk -v c="$COL" 'NF { printf "     %-14s %4d s\n", $1, $c; sum += $c } END { printf "     %-14s %4d s\n", "(sum)", sum }' <<<"$BUDGETS"
$PY - <<'EOF'
import importlib.metadata as md, importlib.util
optional = {"triton": "Triton kernels", "liger_kernel": "Liger row of kernels-bench", "vllm": "vLLM engine rows",
            "trl": "TRL peer of throughput", "datasets": "TRL peer of throughput", "pynvml": "NVML telemetry",
            "megatron": "megatron-tp", "flash_attn": "flash-attn varlen attention (else per-sequence SDPA)"}
for mod, what in optional.items():
    if importlib.util.find_spec(mod) is None:
        print(f"   missing {mod}: skipped or replaced: {what}")
    else:
        dist = {"liger_kernel": "liger-kernel", "pynvml": "nvidia-ml-py", "flash_attn": "flash-attn",
                "megatron": "megatron-core"}.get(mod, mod)
        try:
            print(f"   present {mod} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"   present {mod}")
EOF

STATUS="$WORK/status.tsv"
: >"$STATUS"
# stage NAME COMMAND...: run it under its budget (BUDGETS) and what is left of BUDGET_S, log it, record its status
stage() {
    local name=$1 budget
    shift
    budget=$(budget_of "$name")
    if [ -z "$budget" ]; then
        echo "bench/gpu.sh: stage $name has no budget in BUDGETS" >&2
        exit 2
    fi
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$BUDGET_S" >>"$STATUS"
        echo "-- $name: skipped (no time left)"
        return
    fi
    [ "$budget" -gt "$left" ] && budget=$left
    local t0=$(date +%s)
    echo "-- $name (budget ${budget}s): $*"
    timeout --kill-after=15 "$budget" "$@" >"$WORK/logs/$name.log" 2>&1
    local rc=$? secs=$(( $(date +%s) - t0 )) status=ok note=
    case $rc in
        0) ;;
        124|137) status="timed out"; note="after ${budget}s" ;;
        *) status=failed; note="exit code $rc" ;;
    esac
    if [ "$name" = cuda-tests ] && [ $rc -eq 5 ]; then status=ok; note="no test is marked cuda"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$note" >>"$STATUS"
    echo "   $status in ${secs}s ${note}"
}
wait_build() {
    [ -n "$BUILD_PID" ] && { wait "$BUILD_PID" || echo "   native image pipeline build failed (log: build_ext.log); HF's processor is used"; }
    BUILD_PID=
}

R="$WORK/results"
VLLM_ARG=${VLLM_PYTHON:+--vllm-python $VLLM_PYTHON}
# the files that hold cuda-marked tests (collecting only them: a broken optional stack elsewhere cannot stop them)
CUDA_TESTS=$(grep -l "mark\.cuda" tests/*.py kernels/tests/*.py 2>/dev/null | tr '\n' ' ')
if [ "$MODE" = gpu ]; then
    stage kernel-tests $PY -m pytest -q -p no:cacheprovider kernels/tests
    stage cuda-tests $PY -m pytest -q -p no:cacheprovider -m cuda $CUDA_TESTS
    stage megatron-tp $PY bench/megatron_tp.py --out "$R/megatron_tp.json"
    stage kernels-bench $PY bench/kernels.py --out "$R/kernels.json"
    wait_build
    stage throughput $PY bench/throughput.py --peer trl --random-init qwen2.5-vl-3b --steps 3 --warmup 1 $VLLM_ARG \
        $THROUGHPUT_3B_OVERRIDES ${THROUGHPUT_OVERRIDES:-} --out "$R/throughput.json"
    stage update-bench $PY bench/update.py --groups 8 --image 448 --reps 2 --out "$R/update.json"
    stage weight-sync $PY bench/weight_sync.py --models qwen2.5-vl-3b --reps 5 --out "$R/weight_sync.json"
    stage memory $PY bench/memory.py --cases 3b-fsdp-1-gpu,3b-fsdp-1-ac-gpu,7b-fsdp-1-offload-gpu --max-tokens 4096 \
        --out "$R/memory.json"
else
    stage kernel-tests $PY -m pytest -q -p no:cacheprovider --collect-only kernels/tests
    stage cuda-tests $PY -m pytest -q -p no:cacheprovider -m cuda $CUDA_TESTS
    stage megatron-tp $PY bench/megatron_tp.py --device cpu --out "$R/megatron_tp.json"
    stage kernels-bench $PY bench/kernels.py --quick --tokens 64 --reps 1 --out "$R/kernels.json"
    wait_build
    stage throughput $PY bench/throughput.py --peer trl --random-init tiny --quick $VLLM_ARG ${THROUGHPUT_OVERRIDES:-} \
        --out "$R/throughput.json"
    stage update-bench $PY bench/update.py --quick --out "$R/update.json"
    stage weight-sync $PY bench/weight_sync.py --models tiny --engines replica --reps 1 --out "$R/weight_sync.json"
    stage memory $PY bench/memory.py --cases tiny-hf-1 --max-tokens 1024 --image 112 --out "$R/memory.json"
fi
wait_build

# The summary: one row a stage with its headline figures, the end of each failed stage's log; then the files.
$PY - "$WORK" "$MODE" "$OUTDIR" <<'EOF' | tee "$OUTDIR/summary.txt"
import json, re, sys
from pathlib import Path

work, mode, outdir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
res = work / "results"

def load(name):
    p = res / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None

def partial(name):  # a bench stopped before its last row (by its budget) wrote complete: false
    data = load(name)
    return " (partial: the bench stopped before its last row)" if data and data.get("complete") is False else ""

def pytest_line(name):
    log = work / "logs" / f"{name}.log"
    lines = [l for l in log.read_text().splitlines() if re.search(r"\b(passed|failed|skipped|deselected|collected|error)", l)] if log.is_file() else []
    return lines[-1].strip("= ") if lines else ""

def kernels():
    k = load("kernels")
    if not k:
        return ""
    parts = [f"{s['inputs']}: " + ", ".join(f"{key} {v:.2f}" for key, v in s.items() if isinstance(v, float))
             + f" ({s['shape']} N={s['n']})" for s in k["summary"] if s["n"] == max(x["n"] for x in k["summary"])]
    failed = [f"{r['inputs']} {r['shape']} N={r['n']} {r['method']}: {r['error']}" for r in k["results"] if r.get("error")]
    return "; ".join(parts + ["failed " + f for f in failed] + (["skipped: " + ", ".join(k["skipped"])] if k.get("skipped") else []))

def update():
    rows = (load("update") or {}).get("results", [])
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"failed G={r['g']} {r['layout']}: {r['error']}")
        elif r["layout"].startswith("packed+vision") and r.get("time_vs_padded") is None:
            out.append(f"G={r['g']}: {r['layout']} {r['s_per_update']:.2f} s/update (no padded row to compare)")
        elif r["layout"].startswith("packed+vision"):
            out.append(f"G={r['g']}: {r['layout']} {r['time_vs_padded']:.2f}x padded time, {r['peak_vs_padded'] or 0:.2f}x memory")
    return "; ".join(out)

def throughput():
    t = load("throughput")
    if not t:
        return ""
    out = []
    for p in t["points"]:
        s = p["summary"]
        mfu = f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""
        out.append(f"{p['name']} {s['step']['median']:.2f} s/step, {s['throughput']['generated_tok_s']:.0f} gen tok/s{mfu}")
    for name, x in t.get("peer", {}).items():
        out.append(f"{name}/engine s/step {x['s_per_step_ratio']:.2f}")
    out += [f"skipped {k}: {v}" for k, v in t.get("skipped", {}).items()]
    return "; ".join(out)

def weight_sync():
    w = load("weight_sync") or {}
    rows = [f"failed {r['model']} {r['engine']}: {r['error']}" if "error" in r
            else f"{r['model']} {r['engine']} {r['sync_ms']:.1f} ms = {r['ratio']:.1f}x floor" for r in w.get("results", [])]
    return "; ".join(rows + [f"skipped {k}" for k in w.get("skipped", {})])

def megatron_tp():
    m = load("megatron_tp")
    if not m:
        return ""
    if m.get("skipped"):
        return "skipped: " + m["skipped"]
    bad = [f"FAILED {c['check']}: {c['error']:.3g} > {c['tolerance']:.3g}" for c in m["checks"] if not c["ok"]]
    worst = next(c for c in m["checks"] if c["check"].startswith("gradients ("))
    return f"TP={m['tp']} on {m['device']}: " + ("; ".join(bad) if bad else
            f"{len(m['checks'])} checks ok (worst gradient {worst['error']:.2g}, tolerance {worst['tolerance']:.0e})")

def memory():
    m = load("memory") or {}
    return "; ".join(f"{c['case']}: planned {c['planned'] / 2**30:.1f} GiB / measured {c['measured'] / 2**30:.1f} = "
                     f"{c['ratio']:.2f}, step {max(max(r) for r in c['step_s']):.1f} s" for c in m.get("cases", []))

benches = {"kernels-bench": ("kernels", kernels), "weight-sync": ("weight_sync", weight_sync), "update-bench": ("update", update),
           "throughput": ("throughput", throughput), "megatron-tp": ("megatron_tp", megatron_tp),
           "memory": ("memory", memory)}
headline = {"kernel-tests": lambda: pytest_line("kernel-tests"), "cuda-tests": lambda: pytest_line("cuda-tests"),
            **{stage: (lambda f=f, j=j: f() + partial(j)) for stage, (j, f) in benches.items()}}
rows = [line.split("\t") for line in (work / "status.tsv").read_text().splitlines()]
summary = []
for name, status, secs, note in rows:
    try:  # a failed stage may still have written results (a bench that lost one point of several)
        head = "; ".join(x for x in (note, headline[name]()) if x)
    except Exception as e:  # a results file of another shape: say so, keep the table
        head = f"{note} (no headline: {type(e).__name__}: {e})"
    summary.append({"stage": name, "status": status, "seconds": int(secs), "headline": head, "note": note})
for s in summary:
    if s["status"] != "ok":
        log = work / "logs" / f"{s['stage']}.log"
        tail = log.read_text().splitlines()[-15:] if log.is_file() else []
        print(f"--- end of {s['stage']}.log ({s['status']}):\n" + "\n".join("    " + l for l in tail))
(outdir / "summary.json").write_text(json.dumps({"mode": mode, "stages": summary}, indent=1) + "\n")
print(f"\n== bench/gpu.sh summary ({mode})")
print(f"{'stage':14s} {'status':10s} {'s':>4s}  headline")
for s in summary:
    print(f"{s['stage']:14s} {s['status']:10s} {s['seconds']:4d}  {s['headline']}")
EOF

tar -czf "$OUTDIR/gpu-results.tar.gz" -C "$WORK" results logs
if [ "$MODE" = gpu ]; then  # into bench/results/ as <bench>-gpu-<date>.<ext>, beside the other benchmarks' files
    stamp=$(date -u +%Y%m%d-%H%M%S)
    for f in "$R"/*; do
        [ -f "$f" ] && b=$(basename "$f") && cp "$f" "$ROOT/bench/results/${b%.*}-gpu-$stamp.${b##*.}"
    done
fi
echo "total $(( $(date +%s) - START ))s; results: $OUTDIR (gpu-results.tar.gz, summary.txt, summary.json)"
failed=$(awk -F'\t' '$2 != "ok" && $2 != "skipped"' "$STATUS" | wc -l)
[ "$MODE" = dry ] && [ "$failed" -gt 0 ] && exit 1
exit 0
