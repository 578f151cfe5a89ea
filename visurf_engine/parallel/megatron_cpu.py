"""Run megatron-core 0.16.1 on CPU (gloo): the compatibility layer for tests and CPU machines.

megatron-core assumes CUDA in a handful of places that the CPU path of this engine reaches.
``apply_cpu_shims()`` patches exactly those sites, once per process, and only when
``torch.cuda.is_available()`` is False; on a GPU machine it does nothing. Each patch
targets calls that would otherwise raise "Torch not compiled with CUDA enabled":

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``: megatron allocates with
   ``device=torch.cuda.current_device()`` in the rotary embeddings (``RotaryEmbedding``,
   ``MultimodalRotaryEmbedding.__init__``, which ignores ``use_cpu_initialization``), the
   tensor-parallel mappings and layers, the pipeline p2p buffers
   (``p2p_communication``), the global memory buffer used by ``DotProductAttention`` and
   the DDP grad buffers (``param_and_grad_buffer``).
2. ``torch.cuda.synchronize`` -> no-op: called after the p2p send/recv in
   ``p2p_communication``.
3. The literal ``device="cuda"`` of ``total_num_tokens`` in the three schedules
   (``forward_backward_no_pipelining``, ``..._pipelining_without_interleaving``,
   ``..._pipelining_with_interleaving``) is rewritten to ``"cpu"`` in their code objects
   (``"cuda"`` is the only such string constant in those functions).
4. ``torch.Tensor.cuda`` -> identity: with tied embeddings and pipeline parallelism the
   last stage's copy of the embedding is synchronised by
   ``LanguageModule.setup_embeddings_and_output_layer`` through ``weight.data.cuda()``.

What needs no patch, by configuration (``learners.megatron.model``): ``use_cpu_initialization``,
``batch_p2p_sync=False``, the inference RNG tracker of ``model_parallel_cuda_manual_seed``
(dropout is 0, so its no-op ``fork`` changes nothing), and an explicit causal attention mask
(megatron's default mask, ``transformer.utils.get_default_causal_mask``, is built on CUDA).
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_shims() -> bool:
    """Patch the sites above if CUDA is unavailable; returns whether the shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = lambda: torch.device("cpu")  # (1)
    torch.cuda.synchronize = lambda *args, **kwargs: None  # (2)
    for fn in (  # (3)
        schedules.forward_backward_no_pipelining,
        schedules.forward_backward_pipelining_without_interleaving,
        schedules.forward_backward_pipelining_with_interleaving,
    ):
        code = fn.__code__
        fn.__code__ = code.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in code.co_consts))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # (4)
    _applied = True
    return True
