"""One interface over the adapters the trainer puts on a model, PEFT's and ours: attach one from its config, read and
restore its tensors (checkpoints), save it, and reach the base model under it.

PEFT's methods (LoRA and its variants, IA3, prompt and prefix tuning, LLaMA-Adapter) go through `get_peft_model` and
save as PEFT adapters that load with `PeftModel.from_pretrained`. Ours (the bottleneck adapters, which PEFT lacks) are
inserted in place and save as our own files that `placement.families.load` reads back. The config's type says which.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from ..model.checkpointing import quiet_renaming
from .base import FAMILIES, Own


def own_of(model_or_config) -> Own | None:
    """The family of ours whose adapter is on this model (or whose config this is), or None: PEFT's."""
    for family in FAMILIES.values():
        own = family.own
        if own is not None and (isinstance(model_or_config, own.config_type) or (
                not isinstance(model_or_config, type) and hasattr(model_or_config, "modules")
                and own.holds(model_or_config))):
            return own
    return None


def is_ours(model_or_config) -> bool:
    return own_of(model_or_config) is not None


def attach(model, config, seed: int = 0):
    """The model with the adapter of `config` on it, every base weight frozen; the adapter's random draws are fixed
    by `seed`. PEFT's methods return a PeftModel, ours the model itself, changed in place."""
    own = own_of(config)
    if own is not None:
        return own.attach(model, config, seed)
    from peft import get_peft_model

    torch.manual_seed(seed)
    with quiet_renaming():
        return get_peft_model(model, config)


def base_of(model):
    """The transformers model under the adapter (what gradient checkpointing is switched on for)."""
    return model if is_ours(model) else model.base_model.model


def tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by name, as its saved file holds them."""
    own = own_of(model)
    if own is not None:
        return own.tensors(model)
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_tensors(model, state: dict[str, torch.Tensor]) -> None:
    """Restore what `tensors` returned (a checkpoint's adapter)."""
    own = own_of(model)
    if own is not None:
        own.load_tensors(model, state)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


def save_ours(model, folder: str | Path) -> None:
    own_of(model).save(model, folder)


def load(model, folder: str | Path):
    """A saved adapter of ours back on its base model: the family is the one whose schema its config names."""
    from ..errors import PlacementError

    path = Path(folder) / "adapter_config.json"
    try:
        schema = json.loads(path.read_text(encoding="utf-8")).get("schema")
    except (OSError, ValueError, AttributeError) as err:
        raise PlacementError(f"{folder} holds no readable adapter_config.json: pass a saved adapter folder") from err
    own = next((f.own for f in FAMILIES.values() if f.own is not None and f.own.schema == schema), None)
    if own is None:
        raise PlacementError(f"{folder} is not an adapter of ours (schema {schema!r}); a PEFT adapter loads with "
                             "PeftModel.from_pretrained")
    return own.load(model, folder)


def mergeable(config) -> bool:
    """Whether the adapter folds into the base weights (`--merge`): LoRA and IA3 do; virtual tokens, gates and
    bottleneck MLPs do not."""
    name = str(getattr(config, "peft_type", "")).split(".")[-1].lower()
    return any(f.mergeable and f.name == name for f in FAMILIES.values())


@contextlib.contextmanager
def quiet():
    """PEFT's prompt and prefix tuning call transformers with arguments it now warns about on every step (position
    ids ignored; past_key_values renamed): nothing a user can act on, so it is kept out of the run's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Position ids are not supported", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield
