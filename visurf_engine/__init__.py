"""visurf-engine. Importing the package first makes torchvision importable on a CPU torch
(a no-op unless a CUDA-only torchvision sits beside a CPU torch, as in the vLLM CPU env):
see ``rollout/vllm_cpu.py``. It must run before transformers is imported."""

from .rollout.vllm_cpu import apply_torchvision_cpu_shim

apply_torchvision_cpu_shim()
