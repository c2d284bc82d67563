"""One interface over the adapters the trainer puts on a model, PEFT's and ours: attach one from its config, read and
restore its tensors (checkpoints), save it, and reach the base model under it.

PEFT's methods (LoRA and its variants, IA3, prompt and prefix tuning, LLaMA-Adapter) go through `get_peft_model` and
save as PEFT adapters that load with `PeftModel.from_pretrained`. Ours (the bottleneck adapters, which PEFT lacks) are
inserted in place and save as our own files that `placement.families.load` reads back. The config's type says which.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from . import bottleneck

OURS = (bottleneck.BottleneckConfig,)


def is_ours(model_or_config) -> bool:
    return isinstance(model_or_config, OURS) or hasattr(model_or_config, bottleneck.CONFIG_ATTRIBUTE)


def attach(model, config, seed: int = 0):
    """The model with the adapter of `config` on it, every base weight frozen; the adapter's random draws are fixed
    by `seed`. PEFT's methods return a PeftModel, ours the model itself, changed in place."""
    if isinstance(config, OURS):
        return bottleneck.apply(model, config, seed)
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, config)


def base_of(model):
    """The transformers model under the adapter (what gradient checkpointing is switched on for)."""
    return model if is_ours(model) else model.base_model.model


def tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by name, as its saved file holds them."""
    if is_ours(model):
        return bottleneck.adapter_state(model)
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_tensors(model, state: dict[str, torch.Tensor]) -> None:
    """Restore what `tensors` returned (a checkpoint's adapter)."""
    if is_ours(model):
        bottleneck.load_state(model, state)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


def save_ours(model, folder: str | Path) -> None:
    bottleneck.save(model, getattr(model, bottleneck.CONFIG_ATTRIBUTE), folder)


def mergeable(config) -> bool:
    """Whether the adapter folds into the base weights (`--merge`): LoRA and IA3 do; virtual tokens, gates and
    bottleneck MLPs do not."""
    return getattr(config, "peft_type", None) in ("LORA", "IA3")


@contextlib.contextmanager
def quiet():
    """PEFT's prompt and prefix tuning call transformers with arguments it now warns about on every step (position
    ids ignored; past_key_values renamed): nothing a user can act on, so it is kept out of the run's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Position ids are not supported", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield
