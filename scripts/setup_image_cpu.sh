#!/usr/bin/env bash
# The GPU image's versions on CPU, in a fresh virtual environment: scripts/setup_image_cpu.sh VENV_DIR
#
# The lent GPU machines run torch 2.11 (cu130), Triton 3.6 and transformers 5.17, without vLLM, flash-attn or
# megatron-core (bench/gpu.sh carries megatron-core's wheel). This environment comes as close to that as a CPU
# machine can, so that CI finds what those versions break before a GPU call does:
#   1. torch 2.13.0, the CPU build (as the main environment), not 2.11: PyPI's torch 2.11.0 for Linux is the
#      CUDA 13 build (530 MB) that needs the nvidia-* and cuda-toolkit wheels (several GB) to import at all
#      (without them: "libcudnn.so.9: cannot open shared object file"), and the CPU build of 2.11 is only on the
#      PyTorch package index, which this machine cannot reach. Triton's AOT compile, what step 5 checks, does not
#      go through torch;
#   2. triton 3.6.0 and transformers 5.17.0, the image's (5.17.0 is the only 5.17 release; it resolves with this
#      project's other requirements, no conflict);
#   3. the kernels and this project, editable (no extras), and pytest; megatron-core 0.16.1 with --no-deps, as
#      gpu.sh installs its carried wheel (it needs only torch, numpy and packaging, which the rest brings);
#   4. scripts/import_check.py: every module of visurf_engine and visurf_kernels imports here (the modules of
#      the absent optional stacks, TRL, verl, vLLM, are skipped and named).
# Then (as .ci/run does) the sm_90 AOT compile of every Triton kernel variant with Triton 3.6:
#   VENV_DIR/bin/python -m pytest -q -p no:cacheprovider \
#       kernels/tests/test_kernels_triton.py::test_kernels_compile_for_sm90_without_spills
# Measured once here (2-core CPU, Triton 3.6 and transformers 5.17 downloaded from PyPI, torch from local disk):
# 98 s and 2.3 GB for steps 1-4; the compile test then takes about 20 s.
set -euo pipefail

venv=${1:?usage: scripts/setup_image_cpu.sh VENV_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS

# shellcheck source=lib/pip_quiet.sh
source "$root/scripts/lib/pip_quiet.sh"

python3 -m venv "$venv"
pip_quiet install -q torch==2.13.0 triton==3.6.0
pip_quiet install -q transformers==5.17.0 pytest -e "$root/kernels" -e "$root"
pip_quiet install -q --no-deps megatron-core==0.16.1

cd "$root"
"$venv/bin/python" -c "import torch, triton, transformers; print(f'torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}')"
"$venv/bin/python" scripts/import_check.py
echo "GPU-image environment ready in $venv ($((SECONDS - start)) s, $(du -sh "$venv" | cut -f1))"
