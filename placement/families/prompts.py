"""The families that add virtual tokens, through PEFT: prompt tuning (trained embeddings before the input: one site),
prefix tuning (trained keys and values in every layer: a site per layer) and LLaMA-Adapter (`AdaptionPromptConfig`:
prompts in the top layers behind a gate that starts at 0: a site per layer).

They change the forward (or, for LLaMA-Adapter, hold a gate at 0), so their init-gradient scores come from PEFT's
own model, one pass each: the energy of the first gradient of the virtual tokens (per layer's slice for prefix
tuning), and of each layer's gate for LLaMA-Adapter (while a gate is 0 its prompt's gradient is exactly 0).
They have no linear sites, so they are not in the registry of module families; `profile --families` takes them,
and a plan names the modules they reach instead: the input embedding (prompt), the blocks (prefix, LLaMA-Adapter's
top layers).
"""
from __future__ import annotations

from ..errors import PlacementError

PROMPT_FAMILIES = ("prompt", "prefix", "llama-adapter")
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


def prompt_targets(model, family: str, layers: int | None = None) -> list[str]:
    """The modules a prompt family reaches, as a plan names them: the input embedding (prompt tuning), every block
    (prefix tuning) or the top `layers` blocks (LLaMA-Adapter; all of them when None)."""
    from ..model.sites import find_blocks

    if family == "prompt":
        embedding = model.get_input_embeddings()
        return [next(name for name, module in model.named_modules() if module is embedding)]
    prefix, blocks = find_blocks(model)
    count = len(blocks) if layers is None else layers
    if not 1 <= count <= len(blocks):
        raise PlacementError(f"{family} on {count} layers: this model has {len(blocks)}; pass 1 to {len(blocks)}")
    if family == "prefix" and count != len(blocks):
        raise PlacementError("prefix tuning adds keys and values to every layer: it takes no layer count")
    return [f"{prefix}.{i}" for i in range(len(blocks) - count, len(blocks))]


def prompt_params(config, family: str, length: int, layers: int) -> int:
    """Trainable parameters PEFT gives a prompt family on a model with this `config`: prompt tuning trains
    length x hidden embeddings; prefix tuning length keys and values per layer, as wide as the key/value heads (PEFT
    narrows them for grouped-query attention); LLaMA-Adapter a length x hidden prompt and a gate per adapted layer."""
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    if family == "prompt":
        return length * hidden
    if family == "prefix":
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return length * layers * 2 * (hidden // heads * kv_heads)
    return layers * (length * hidden + 1)
