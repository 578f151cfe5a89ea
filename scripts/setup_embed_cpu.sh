#!/usr/bin/env bash
# Build the embedding test environment (TRL + verl) in a fresh virtual environment: scripts/setup_embed_cpu.sh VENV_DIR
#
# What it installs (exact versions: constraints/embed-cpu.txt):
#   1. torch 2.13.0 (the CPU build) and triton 3.7.1, first, as for the main environment;
#   2. the kernels and this project with its test extra (which includes trl==1.16.0) and the verl extra
#      (verl's import-time dependencies: ray, tensordict, hydra-core, ...);
#   3. verl 0.9.1 with --no-deps: its metadata pins transformers<5.11 while this project needs >=5.17; the
#      modules integrations/verl.py uses import and run on transformers 5.24. Not installed: vllm, sglang,
#      flash-attn, wandb, pylatexenc, pybind11 (verl's other requirements; nothing used here imports them);
#   4. checks that the engine, TRL and the verl modules import.
# Then: VISURF_REQUIRE_INTEGRATIONS=1 VENV_DIR/bin/python -m pytest -q tests/test_integrations_trl.py tests/test_integrations_verl.py
set -euo pipefail

venv=${1:?usage: scripts/setup_embed_cpu.sh VENV_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
constraints=$root/constraints/embed-cpu.txt
start=$SECONDS

# shellcheck source=lib/pip_quiet.sh
source "$root/scripts/lib/pip_quiet.sh"

python3 -m venv "$venv"
pip_quiet install -q -c "$constraints" torch==2.13.0 triton==3.7.1
pip_quiet install -q -c "$constraints" -e "$root/kernels" -e "$root[test,verl]"
pip_quiet install -q -c "$constraints" --no-deps verl==0.9.1

cd "$root"
"$venv/bin/python" - <<'PY'
import transformers, trl, verl
import visurf_engine.integrations.trl  # noqa: F401
import visurf_engine.integrations.verl  # noqa: F401

print(f"transformers {transformers.__version__}, trl {trl.__version__}, verl {verl.__version__}")
PY
echo "embedding environment ready in $venv ($((SECONDS - start)) s, $(du -sh "$venv" | cut -f1))"
