"""LoRA, the first family: PEFT's `LoraConfig` on linear sites (`nn.Linear`, GPT-2's `Conv1D`).

Its sites are every linear map inside the decoder blocks; its init-gradient score is PAGE (the probe computes it
from the draw of A below); a plan applies it through PEFT; a rank-r adapter trains r (d_in + d_out) parameters.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import PlacementError
from ..model.sites import find_sites
from .base import Family, Size, register


def lora_params(site: dict, r: int, dora: bool = False) -> int:
    """Trainable parameters of a rank-r LoRA on a site row: A is r x d_in, B is d_out x r; DoRA adds a magnitude
    per output."""
    return r * (site["d_in"] + site["d_out"]) + (site["d_out"] if dora else 0)


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


# -- variants: PEFT's own switches on the same sites ----------------------------------------------------------------
# name -> the LoraConfig arguments that make it; the plain LoRA sets none of them.
VARIANTS: dict[str, dict] = {
    "lora": {},
    "rslora": {"use_rslora": True},  # scale alpha / sqrt(r) instead of alpha / r
    "dora": {"use_dora": True},  # a trained magnitude per output, direction by LoRA
    "pissa": {"init_lora_weights": "pissa"},  # A, B from W's top singular vectors; W keeps the residual
    "olora": {"init_lora_weights": "olora"},  # A, B from a QR of W; W keeps the residual
}
VARIANT_KEYS = ("use_rslora", "use_dora", "init_lora_weights")
# Variants that start from W itself and change the base weights when applied: their adapter is saved as the
# difference from its initial value (PEFT's conversion), a plain LoRA of twice the rank that loads on the original
# base. Their first gradients also differ from the default init the probe scores.
MUTATES_BASE = {"pissa", "olora"}
INIT_DIFFERS = {"pissa", "olora", "dora"}


# init_lora_weights values a plan may carry: what PEFT draws from the weights alone. EVA, CorDA and LoftQ need data
# or a config of their own that this tool never passes, so PEFT would fail or fall back mid-run.
INITS = (True, False, "gaussian", "pissa", "olora", "orthogonal")


def init_problem(value) -> str | None:
    """Why a plan's `init_lora_weights` cannot be trained here, or None."""
    if value in INITS and (isinstance(value, str) or isinstance(value, bool)):
        return None
    if isinstance(value, str) and value.startswith("pissa_niter_") and value[12:].isdigit():
        return None
    shown = ", ".join(str(v) for v in INITS)
    return f"init_lora_weights {value!r} is not one this tool trains (it takes {shown} or pissa_niter_N)"


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise PlacementError(f"unknown LoRA variant '{name}': choose one of {', '.join(VARIANTS)}")
    return name


def with_variant(peft: dict, name: str) -> dict:
    """A plan's PEFT arguments with the variant's switches, and no other variant's."""
    plain = {"use_rslora": False, "use_dora": False, "init_lora_weights": True}  # LoraConfig's defaults
    return {k: v for k, v in peft.items() if k not in VARIANT_KEYS} | plain | VARIANTS[check_variant(name)]


def variant_of(peft: dict) -> str:
    """The variant a plan's PEFT arguments make: `lora` when they set none of the switches, `custom` for a
    combination no variant names (say DoRA with PiSSA's init, or a Gaussian init)."""
    found = {k: True for k in ("use_rslora", "use_dora") if peft.get(k)}
    if peft.get("init_lora_weights", True) is not True:
        found["init_lora_weights"] = peft["init_lora_weights"]
    return next((name for name, switches in VARIANTS.items() if found == switches), "custom")


LORA = register(Family(
    name="lora",
    help="low-rank update s * B A x beside every linear site (PEFT LoraConfig)",
    score="PAGE",
    find_sites=find_sites,
    params=lora_params,
    config=lora_config,
    kwargs=lambda plan, model=None: dict(plan.peft),
    size=Size("r", "rank", "a LoRA rank, e.g. dominant:r64"),
    mergeable=True,
    formats=("plan", "peft", "axolotl", "llama-factory", "spectrum", "spectrum-unfrozen"),
))
