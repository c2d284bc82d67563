"""Activation checkpointing of a transformers model's decoder blocks, non-reentrant, under whichever name the
installed transformers gives it (`activation_checkpointing_*` from v5, `gradient_checkpointing_*` before)."""
from __future__ import annotations

import contextlib
import warnings

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


def is_checkpointing(model: nn.Module) -> bool:
    """Whether checkpointing is on, read under the current name: the old one warns of its renaming from v5."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def quiet_renaming():
    """For calls into PEFT, which still reads `is_gradient_checkpointing` and so sets off its renaming warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
