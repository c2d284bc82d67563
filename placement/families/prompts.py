"""The families that add virtual tokens, through PEFT: prompt tuning (trained embeddings before the input: one site),
prefix tuning (trained keys and values in every layer: a site per layer) and LLaMA-Adapter (`AdaptionPromptConfig`:
prompts in the top layers behind a gate that starts at 0: a site per layer).

They change the forward (or, for LLaMA-Adapter, hold a gate at 0), so their init-gradient scores come from PEFT's
own model, one pass each: the energy of the first gradient of the virtual tokens (per layer's slice for prefix
tuning), and of each layer's gate for LLaMA-Adapter (while a gate is 0 its prompt's gradient is exactly 0).
They have no module sites, so they are not in the registry of module families; `profile --families` takes them.
"""
from __future__ import annotations

from ..errors import PlacementError

DEFAULT_LENGTH = 10
# Model types PEFT's adaption prompt accepts under our transformers (others raise in get_peft_model)
LLAMA_ADAPTER_TYPES = ("llama", "mistral", "gpt2")


def prompt_config(family: str, length: int, num_layers: int, model_type: str):
    """PEFT's config for a prompt family at `length` virtual tokens (LLaMA-Adapter on every layer, to score each)."""
    from peft import AdaptionPromptConfig, PrefixTuningConfig, PromptTuningConfig

    if length < 1:
        raise PlacementError(f"a {family} length of {length} adds no virtual token: pass 1 or more")
    if family == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
    if family == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
    if model_type not in LLAMA_ADAPTER_TYPES:
        raise PlacementError(f"PEFT's LLaMA-Adapter does not support {model_type} models (it takes "
                             f"{', '.join(LLAMA_ADAPTER_TYPES)}): drop llama-adapter from --families")
    return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=length, adapter_layers=num_layers)
