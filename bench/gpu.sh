#!/usr/bin/env bash
# Every GPU-only check and benchmark of the project, in one call that fits a lent GPU's lease
# (the correctness checks first, then the benchmarks by value, each under its own time budget, all
# inside BUDGET_S = 470 s; a stage gets at most what is left):
#
#   kernel-tests    kernels/tests on CUDA: the Triton kernels against the float64 oracle
#   cuda-tests      pytest -m cuda (the tests that need a CUDA device: CUDA graphs, storage addresses)
#   kernels-bench   bench/kernels.py: the fused loss at the Qwen2.5-VL-3B and -7B head shapes, Liger's
#                   fused GRPO loss beside ours (skipped by the bench, with the reason, without liger_kernel)
#   throughput      bench/throughput.py --peer trl on a random-init 3B (1 warm-up + 3 steps a side, 128-token
#                   completions, 448x448 images): per-phase times, tokens/s, MFU, NVML, TRL side by side
#   update-bench    bench/update.py on GPU (random-init 3B, G = 8, 448x448 images: the padded layout at its
#                   840x840 default would put ~72 x 3600 patches through the vision tower with autograd,
#                   an estimated 150+ GB): padded vs packed vs packed + vision once
#   weight-sync     bench/weight_sync.py at the 3B shapes, if the file exists (vLLM engine skipped without vllm)
#
# Usage:
#   bench/gpu.sh                  on the GPU machine; results: $OUT (the device tool's folder) or --out DIR gets
#                                 gpu-results.tar.gz (every JSON, PNG and log), summary.txt and summary.json;
#                                 the JSON and PNG files are also copied to bench/results/
#   bench/gpu.sh --dry-run        on CPU: the same stages with each one's CPU smoke settings (CI runs it, so the
#                                 script cannot rot); results in a temporary folder, never in bench/results/
#   bench/gpu.sh --fetch-wheels   here, with a network: the optional wheels the GPU image lacks (TRL and datasets
#                                 for the peer, Liger for the kernel bench) into .whl/ (git-ignored), for the
#                                 device call to carry (carry: [".whl"]); gpu.sh installs them from there
#
# A missing optional package is named at the start and its stage (or row) says it was skipped; a stage that
# fails or runs out of time is marked so in the summary, with the end of its log; the summary table is last.
# Environment: THROUGHPUT_OVERRIDES (extra key=value for the throughput stage, e.g. rollout.hf.replica=true),
# VLLM_PYTHON (an interpreter with vLLM for the throughput stage's rollout.backend=vllm row), BUDGET_S, PYTHON.
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
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5"
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
BUDGET_S=${BUDGET_S:-470}
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
    if ls .whl/*.whl >/dev/null 2>&1; then  # carried optional wheels (--fetch-wheels)
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
            && export PYTHONPATH="$WORK/site:$PYTHONPATH" || echo "warning: installing .whl/ failed; going on without"
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
$PY - <<'EOF'
import importlib.metadata as md, importlib.util
optional = {"triton": "Triton kernels", "liger_kernel": "Liger row of kernels-bench", "vllm": "vLLM engine rows",
            "trl": "TRL peer of throughput", "datasets": "TRL peer of throughput", "pynvml": "NVML telemetry",
            "flash_attn": "flash-attn varlen attention (else per-sequence SDPA)"}
for mod, what in optional.items():
    if importlib.util.find_spec(mod) is None:
        print(f"   missing {mod}: skipped or replaced: {what}")
    else:
        dist = {"liger_kernel": "liger-kernel", "pynvml": "nvidia-ml-py", "flash_attn": "flash-attn"}.get(mod, mod)
        try:
            print(f"   present {mod} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"   present {mod}")
EOF

STATUS="$WORK/status.tsv"
: >"$STATUS"
# stage NAME BUDGET_S COMMAND...: run it under what is left of both budgets, log it, record its status
stage() {
    local name=$1 budget=$2
    shift 2
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
    stage kernel-tests 90 $PY -m pytest -q -p no:cacheprovider kernels/tests
    stage cuda-tests 75 $PY -m pytest -q -p no:cacheprovider -m cuda $CUDA_TESTS
    stage kernels-bench 60 $PY bench/kernels.py --out "$R/kernels.json"
    wait_build
    stage throughput 150 $PY bench/throughput.py --peer trl --random-init qwen2.5-vl-3b --steps 3 --warmup 1 $VLLM_ARG \
        rollout.max_new_tokens=128 ${THROUGHPUT_OVERRIDES:-} --out "$R/throughput.json"
    stage update-bench 90 $PY bench/update.py --groups 8 --image 448 --reps 3 --out "$R/update.json"
    [ -f bench/weight_sync.py ] && stage weight-sync 40 $PY bench/weight_sync.py --models qwen2.5-vl-3b --reps 5 --out "$R/weight_sync.json"
else
    stage kernel-tests 60 $PY -m pytest -q -p no:cacheprovider --collect-only kernels/tests
    stage cuda-tests 90 $PY -m pytest -q -p no:cacheprovider -m cuda $CUDA_TESTS
    stage kernels-bench 60 $PY bench/kernels.py --quick --tokens 64 --reps 1 --out "$R/kernels.json"
    wait_build
    stage throughput 120 $PY bench/throughput.py --peer trl --random-init tiny --quick $VLLM_ARG ${THROUGHPUT_OVERRIDES:-} \
        --out "$R/throughput.json"
    stage update-bench 90 $PY bench/update.py --quick --out "$R/update.json"
    [ -f bench/weight_sync.py ] && stage weight-sync 60 $PY bench/weight_sync.py --models tiny --engines replica --reps 1 --out "$R/weight_sync.json"
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

def pytest_line(name):
    log = work / "logs" / f"{name}.log"
    lines = [l for l in log.read_text().splitlines() if re.search(r"\b(passed|failed|skipped|deselected|collected|error)", l)] if log.is_file() else []
    return lines[-1].strip("= ") if lines else ""

def kernels():
    k = load("kernels")
    if not k:
        return ""
    parts = [", ".join(f"{key} {v:.2f}" for key, v in s.items() if isinstance(v, float)) + f" ({s['shape']} N={s['n']})"
             for s in k["summary"] if s["n"] == max(x["n"] for x in k["summary"])]
    return "; ".join(parts) + ("; skipped: " + ", ".join(k["skipped"]) if k.get("skipped") else "")

def update():
    u = load("update")
    rows = [r for r in (u or {}).get("results", []) if r["layout"] == "packed+vision"]
    return "; ".join(f"G={r['g']}: packed+vision {r['time_vs_padded']:.2f}x padded time, "
                     f"{r['peak_vs_padded'] or 0:.2f}x memory" for r in rows)

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
    rows = [f"{r['model']} {r['engine']} {r['sync_ms']:.1f} ms = {r['ratio']:.1f}x floor" for r in w.get("results", [])]
    return "; ".join(rows + [f"skipped {k}" for k in w.get("skipped", {})])

headline = {"kernel-tests": lambda: pytest_line("kernel-tests"), "kernels-bench": kernels, "weight-sync": weight_sync,
            "update-bench": update, "throughput": throughput, "cuda-tests": lambda: pytest_line("cuda-tests")}
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
