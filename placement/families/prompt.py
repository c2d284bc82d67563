"""Prompt tuning, through PEFT's `PromptTuningConfig`: trained embeddings of `length` virtual tokens before the
input. Its one site is the input embedding it extends; a plan trains length x hidden parameters. Its init-gradient
score is the energy of the virtual tokens' first gradient (PEFT's random init), from a pass with them inserted."""
from __future__ import annotations

from ..model.sites import Site
from .base import Part
from .prompts import embedding_grad, hidden_of, register_virtual


def embedding_site(model) -> list[Site]:
    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    return [Site(name, -1, "prompt", int(embedding.weight.shape[0]), hidden_of(model.config), kind="Embedding")]


def parts(peft_model, model, length: int) -> list[Part]:
    return [Part("prompt", -1, "prompt", length * hidden_of(model.config), embedding_grad)]


PROMPT = register_virtual("prompt", "trained virtual-token embeddings before the input (PEFT PromptTuningConfig)",
                          "||grad P||^2 of the virtual tokens", "PromptTuningConfig", find_sites=embedding_site,
                          parts=parts)
