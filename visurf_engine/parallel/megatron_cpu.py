"""Run megatron-core 0.16.1 on CPU (gloo): the compatibility layer for tests and CPU machines.

megatron-core assumes CUDA in a handful of places that the CPU path of this engine reaches.
``apply_cpu_shims()`` patches exactly those sites, once per process, and only when
``torch.cuda.is_available()`` is False; on a GPU machine it does nothing. Each patch
targets calls that would otherwise raise "Torch not compiled with CUDA enabled" (1-4) or
reject a CPU tensor (5):

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``: megatron allocates with
   ``device=torch.cuda.current_device()`` in the rotary embeddings (``RotaryEmbedding``,
   ``MultimodalRotaryEmbedding.__init__``, which ignores ``use_cpu_initialization``), the
   tensor-parallel mappings and layers, the pipeline p2p buffers
   (``p2p_communication``), the global memory buffer used by ``DotProductAttention`` and
   the DDP param and grad buffers (``param_and_grad_buffer``).
2. ``torch.cuda.synchronize`` -> no-op: called after the p2p send/recv in
   ``p2p_communication``.
3. The literal ``device="cuda"`` of ``total_num_tokens`` in the three schedules
   (``forward_backward_no_pipelining``, ``..._pipelining_without_interleaving``,
   ``..._pipelining_with_interleaving``) is rewritten to ``"cpu"`` in their code objects
   (``"cuda"`` is the only such string constant in those functions).
4. ``torch.Tensor.cuda`` -> identity: with tied embeddings and pipeline parallelism the
   last stage's copy of the embedding is synchronised by
   ``LanguageModule.setup_embeddings_and_output_layer`` through ``weight.data.cuda()``.
5. The distributed optimizer (``learners.megatron.learner``), same rewrite as (3), nested code
   objects included: ``device='cuda'`` becomes ``'cpu'`` and the tensor type names it accepts,
   ``'torch.cuda.FloatTensor'`` / ``'torch.cuda.HalfTensor'`` / ``'torch.cuda.BFloat16Tensor'``,
   become their CPU names (``'torch.FloatTensor'`` ...), in ``MixedPrecisionOptimizer.__init__``
   (its unit loss scale and overflow buffer), ``DistributedOptimizer.__init__`` and
   ``DistributedOptimizer._build_model_and_main_param_groups`` (which sort the parameters into
   fp32 and 16-bit groups by ``param.type()`` and raise ``TypeError`` on anything else),
   ``clip_grads.get_grad_norm_fp32`` and ``clip_grads.clip_grad_by_total_norm_fp32`` (buffers,
   and an ``assert param.grad.type() == 'torch.cuda.FloatTensor'``), and
   ``utils.local_multi_tensor_l2_norm`` (the norm without Apex / Transformer Engine, returned on
   ``"cuda"``). Only those exact constants change (an error message that lists the CUDA type
   names and the attribute name ``"cuda_graph_impl"`` stay as they are).

What needs no patch, by configuration (``learners.megatron.model``): ``use_cpu_initialization``,
``batch_p2p_sync=False``, the inference RNG tracker of ``model_parallel_cuda_manual_seed``
(dropout is 0, so its no-op ``fork`` changes nothing), and an explicit causal attention mask
(megatron's default mask, ``transformer.utils.get_default_causal_mask``, is built on CUDA).
gloo has the reduce-scatter and all-gather of the distributed optimizer's buffers.
"""

from __future__ import annotations

import types

import torch

_applied = False


def _cpu_constant(value):
    if value == "cuda":
        return "cpu"
    if isinstance(value, str) and value.startswith("torch.cuda.") and value.endswith("Tensor"):
        return "torch." + value[len("torch.cuda.") :]
    if isinstance(value, tuple):
        return tuple(_cpu_constant(v) for v in value)
    if isinstance(value, types.CodeType):
        return _on_cpu(value)
    return value


def _on_cpu(code: types.CodeType) -> types.CodeType:
    """``code`` with the CUDA constants of (3) and (5) rewritten (nested code objects too)."""
    return code.replace(co_consts=tuple(_cpu_constant(c) for c in code.co_consts))


def apply_cpu_shims() -> bool:
    """Patch the sites above if CUDA is unavailable; returns whether the shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = lambda: torch.device("cpu")  # (1)
    torch.cuda.synchronize = lambda *args, **kwargs: None  # (2)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # (4)
    for fn in (
        schedules.forward_backward_no_pipelining,  # (3)
        schedules.forward_backward_pipelining_without_interleaving,
        schedules.forward_backward_pipelining_with_interleaving,
        optimizer.MixedPrecisionOptimizer.__init__,  # (5)
        distrib_optimizer.DistributedOptimizer.__init__,
        distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups.__func__,
        clip_grads.get_grad_norm_fp32,
        clip_grads.clip_grad_by_total_norm_fp32,
        utils.local_multi_tensor_l2_norm,
    ):
        fn.__code__ = _on_cpu(fn.__code__)
    _applied = True
    return True
