"""Prompt tuning, through PEFT's `PromptTuningConfig`: trained embeddings of `length` virtual tokens before the
input. Its one site is the input embedding it extends; a plan trains length x hidden parameters. Its init-gradient
score is the energy of the virtual tokens' first gradient (PEFT's random init), from a pass with them inserted."""
from __future__ import annotations

from ..model.sites import Site
from .base import Family, Part, register
from .prompts import FORMATS, LENGTH, embedding_grad, hidden_of, tokens_params, virtual_kwargs


def embedding_site(model) -> list[Site]:
    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    return [Site(name, -1, "prompt", int(embedding.weight.shape[0]), hidden_of(model.config), kind="Embedding")]


def parts(peft_model, model, length: int) -> list[Part]:
    return [Part("prompt", -1, "prompt", length * hidden_of(model.config), embedding_grad)]


def prompt_config(kwargs: dict):
    from peft import PromptTuningConfig

    return PromptTuningConfig(**kwargs)


PROMPT = register(Family(
    name="prompt",
    help="trained virtual-token embeddings before the input (PEFT PromptTuningConfig)",
    score="||grad P||^2 of the virtual tokens",
    find_sites=embedding_site,
    params=tokens_params,
    config=prompt_config,
    kwargs=virtual_kwargs,
    size=LENGTH,
    count="none",
    ranked=False,
    parts=parts,
    virtual=True,
    formats=FORMATS,
))
