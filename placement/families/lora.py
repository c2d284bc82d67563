"""LoRA, the first family: PEFT's `LoraConfig` on linear sites (`nn.Linear`, GPT-2's `Conv1D`).

Its sites are every linear map inside the decoder blocks; its init-gradient score is PAGE (the probe computes it
from the draw of A below); a plan applies it through PEFT; a rank-r adapter trains r (d_in + d_out) parameters.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..model.sites import find_sites
from .base import Family, register


def lora_params(site: dict, r: int) -> int:
    """Trainable parameters of a rank-r LoRA on a site row: A is r x d_in, B is d_out x r."""
    return r * (site["d_in"] + site["d_out"])


def lora_config(peft: dict) -> LoraConfig:
    return LoraConfig(**peft)


def draw_lora_a(module: nn.Module, lora_kwargs: dict, seed: int) -> torch.Tensor:
    """The lora_A that PEFT draws for this site after `torch.manual_seed(seed)`, taken from PEFT's own layer.

    PEFT draws other tensors before A (the default init of its lora_A and lora_B Linears), so re-deriving the
    order would be fragile; a shape-alike placeholder wrapped by PEFT consumes the RNG exactly as the real
    `get_peft_model(model, LoraConfig(target_modules=[site]))` does (a test holds the two equal).
    """
    conv = isinstance(module, Conv1D)
    with torch.device("meta"):
        if conv:
            placeholder = Conv1D(module.weight.shape[1], module.weight.shape[0])
        else:
            placeholder = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    box = nn.Module()
    box.site = placeholder.to_empty(device="cpu")
    kwargs = {k: v for k, v in lora_kwargs.items() if k != "task_type"}
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(target_modules=["site"], fan_in_fan_out=conv, **kwargs), box)
    return box.site.lora_A["default"].weight.detach().float().clone()


LORA = register(Family(
    name="lora",
    help="low-rank update s * B A x beside a linear site (PEFT LoraConfig); score: PAGE",
    find_sites=find_sites,
    params=lora_params,
    config=lora_config,
))
