"""A plan onto a model in one call, for users who train with their own loop, the transformers Trainer or TRL:

    peft_model = placement.apply(model, "runs/arith/plan.json", variant="dora", lora_dropout=0.05)
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from ..errors import PlacementError
from ..families import adapters
from ..families.lora import init_problem, lora_config
from ..model.checkpointing import is_checkpointing, quiet_renaming
from ..plan.plan import Plan

ADAPTER = "default"


def unwrap(model):
    """The model inside the wrappers a training loop adds: DistributedDataParallel / DataParallel (`.module`) and
    torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _overrides(peft: dict, overrides: dict) -> dict:
    from peft import LoraConfig

    allowed = {f.name for f in fields(LoraConfig)} - {"target_modules", "rank_pattern", "alpha_pattern"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        hint = "the plan chooses the sites" if unknown[0] in ("target_modules", "rank_pattern", "alpha_pattern") \
            else "pass LoraConfig arguments such as lora_dropout=0.05"
        raise PlacementError(f"apply() got {unknown[0]}=..., which it cannot override: {hint}")
    init = init_problem(overrides.get("init_lora_weights", True))
    if init:
        raise PlacementError(f"apply() got {init}")
    return peft | overrides


def apply(model, plan: Plan | str | Path, *, variant: str | None = None, r: int | None = None,
          adapter_name: str = ADAPTER, **overrides):
    """The plan's LoRA on `model`, checked against it first; returns the PeftModel (a plan of another family puts
    that family's adapter on instead: PEFT's, or our bottlenecks in place).

    `plan` is a Plan, a plan file or a profile's folder. `variant` (rslora, dora, pissa, olora) and `r` (alpha / r
    kept) change the plan; other keyword arguments override LoraConfig fields (lora_dropout, bias, ...). A model
    already wrapped by PEFT gets the plan as another adapter, `adapter_name`, made active; DDP and torch.compile
    wrappers are looked through. With gradient checkpointing on, the input embeddings are made to require grad,
    as PEFT does for its own preparation, so checkpointed blocks still reach the adapters.
    """
    from peft import PeftModel, get_peft_model

    plan = (plan if isinstance(plan, Plan) else Plan.load(plan)).with_rank(r).with_variant(variant)
    model = unwrap(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    plan.check(base)
    if adapters.is_ours(base):  # our adapters are in the model itself: a second plan would stack on them
        raise PlacementError("this model already has adapters of ours (a bottleneck plan was applied): apply the "
                             "plan to a fresh base model")
    if plan.family != "lora":  # another family's plan (IA3, bottleneck, virtual tokens): its own config, unchanged
        if overrides or isinstance(model, PeftModel):
            raise PlacementError(f"apply() puts a {plan.family} plan on a bare model as it is: pass no LoraConfig "
                                 "arguments and no model that already has an adapter")
        return adapters.attach(model, plan.adapter_config(model))
    config = lora_config(_overrides({k: v for k, v in plan.peft.items() if k != "target_modules"}, overrides)
                         | {"target_modules": plan.targets})
    if is_checkpointing(base):
        base.enable_input_require_grads()
    with quiet_renaming():
        if isinstance(model, PeftModel):
            if adapter_name in model.peft_config:
                raise PlacementError(f"the model already has an adapter named {adapter_name!r}: pass "
                                     "adapter_name='...' for the plan's")
            model.add_adapter(adapter_name, config)
            model.set_adapter(adapter_name)
            return model
        return get_peft_model(model, config, adapter_name=adapter_name)
