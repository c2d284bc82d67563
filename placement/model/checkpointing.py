"""Activation checkpointing of a transformers model's decoder blocks, non-reentrant, under whichever name the
installed transformers gives it (`activation_checkpointing_*` from v5, `gradient_checkpointing_*` before)."""
from __future__ import annotations

from torch import nn

NON_REENTRANT = {"use_reentrant": False}  # blocks then need no input that requires grad; the base stays frozen


def enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)


def disable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
