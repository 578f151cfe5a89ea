"""Activation checkpointing (``train.activation_checkpointing``) of a transformers policy.

Every decoder layer and vision block (transformers' ``GradientCheckpointingLayer``s) keeps
only its input in the forward and recomputes the rest in the backward (non-reentrant
``torch.utils.checkpoint``): the saved activations of a micro-batch drop from every layer's
intermediates to one ``[T, H]`` input per layer, for about one extra forward of compute.
transformers checkpoints each layer's ``forward``, not its ``__call__``, so module hooks (FSDP2's
all-gather and reshard, DDP's) stay outside the recomputed region; the layers' parameter
names are unchanged (no wrapper module), so checkpoints and the weight sync see the same names.
"""

from __future__ import annotations

import torch


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every decoder layer and vision block of ``model`` (a transformers ``PreTrainedModel``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
