"""Prefix tuning, through PEFT's `PrefixTuningConfig`: trained keys and values of `length` virtual tokens in every
layer. Its sites are the blocks (all of them: PEFT adds the prefix everywhere); a block trains length x 2 x the
key/value width (PEFT narrows it for grouped-query attention). Its init-gradient score is the energy of each layer's
slice of the prefix's first gradient, from a pass with the prefix inserted."""
from __future__ import annotations

from ..model.sites import Site, find_blocks
from .base import Part
from .prompts import block_sites, embedding_grad, register_virtual, text_config


def key_value_width(model_config) -> int:
    config = text_config(model_config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return hidden // heads * kv_heads


def prefix_sites(model) -> list[Site]:
    return block_sites(model, "prefix", 2 * key_value_width(model.config))


def parts(peft_model, model, length: int) -> list[Part]:
    """PEFT lays the prefix out as (tokens, layers x 2 x key/value width), layer by layer."""
    prefix, blocks = find_blocks(model)
    per_layer = peft_model.prompt_encoder["default"].embedding.weight.shape[1] // len(blocks)
    return [Part(f"{prefix}.{i}.prefix", i, "prefix", length * per_layer,
                 lambda m, i=i: embedding_grad(m)[:, i * per_layer:(i + 1) * per_layer])
            for i in range(len(blocks))]


PREFIX = register_virtual("prefix", "trained key/value prefixes in every layer (PEFT PrefixTuningConfig)",
                          "||grad P_l||^2 per layer's slice", "PrefixTuningConfig", find_sites=prefix_sites,
                          parts=parts, checkpointing=False)
