"""LLaMA-Adapter, through PEFT's `AdaptionPromptConfig`: a prompt of `length` tokens in each of the top layers,
behind a gate that starts at 0. Its sites are the blocks (an arm's -N takes the top N); a block trains length x hidden
prompt weights and one gate. While a gate is 0 its prompt's gradient is exactly 0, so its init-gradient score is
the energy of each layer's gate gradient, from a pass with every layer gated."""
from __future__ import annotations

from ..errors import PlacementError
from ..model.sites import Site, find_blocks
from .base import Part
from .prompts import LENGTH, TASK, block_sites, hidden_of, length_of, register_virtual

# Model types PEFT's adaption prompt accepts under our transformers (others raise in get_peft_model)
MODEL_TYPES = ("llama", "mistral", "gpt2")


def supports(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise PlacementError(f"PEFT's LLaMA-Adapter does not support {model_type} models (it takes "
                             f"{', '.join(MODEL_TYPES)}): drop llama-adapter")


def gate_sites(model) -> list[Site]:
    return block_sites(model, "gate", hidden_of(model.config))


def gate_params(site: dict, length: int | None) -> int:
    return (length or LENGTH.default) * int(site["d_out"]) + 1


def plan_kwargs(plan, model=None) -> dict:
    supports(plan.model.get("model_type") or getattr(getattr(model, "config", None), "model_type", ""))
    return {"task_type": TASK, "adapter_len": length_of(plan), "adapter_layers": len(plan.targets)}


def parts(peft_model, model, length: int) -> list[Part]:
    prefix, _ = find_blocks(model)
    out = []
    for name, _ in peft_model.named_parameters():
        if name.endswith("adaption_gate"):
            layer = int(name.split(f"{prefix}.")[1].split(".")[0]) if f"{prefix}." in name else -1
            out.append(Part(name.split("base_model.model.", 1)[-1], layer, "gate", length * hidden_of(model.config) + 1,
                            lambda m, n=name: m.get_parameter(n).grad))
    return out


LLAMA_ADAPTER = register_virtual(
    "llama-adapter", "gated prompts in the top N layers, all without N (PEFT AdaptionPromptConfig)",
    "||grad g||^2 of each layer's gate", "AdaptionPromptConfig", find_sites=gate_sites, params=gate_params,
    kwargs=plan_kwargs, count="optional", parts=parts, supports=supports)
