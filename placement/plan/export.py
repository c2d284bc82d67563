"""A plan leaves the tool: from a profile's folder or a plan file, as our plan JSON or PEFT's adapter_config.json,
each a single file written atomically and replaced only when asked."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import PlacementError
from ..outputs import finite, json_text, write_new_file
from .plan import Plan
from .strategies import Strategy, allocate_strategy, read_spectrum


def plan_from_source(source: str | Path, rank: int | None = None) -> Plan:
    """The plan of a profile's folder, its scores.csv or a plan file; `rank` sets another r (alpha as it is)."""
    path = Path(source)
    if not path.exists():
        raise PlacementError(f"{source} not found: pass the --out folder of placement profile or a plan file")
    plan = Plan.load(path.parent / "plan.json" if path.suffix == ".csv" else path)
    if rank is not None:
        if rank < 1:
            raise PlacementError(f"--r {rank} is not a LoRA rank: pass a positive integer")
        plan.peft = dict(plan.peft, r=rank)
    return plan


def replan(source: str | Path, base: Plan, strategy: Strategy) -> Plan:
    """`base` with another strategy; allocate reads the gradient spectrum the profile folder kept."""
    if strategy.name == "allocate" and not strategy.ranks:
        folder = Path(source).parent if Path(source).is_file() else Path(source)
        strategy = allocate_strategy(strategy.max_params, read_spectrum(folder), base.sites)
    return base.with_strategy(strategy)


def adapter_config_text(config: dict, model_name: str | None) -> str:
    """PEFT's adapter_config.json made deterministic: targets sorted, keys sorted, no bare NaN, and the base named
    as the user gave it (never a cache path of this machine) when `model_name` is given."""
    config = dict(config)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    if model_name is not None:
        config["base_model_name_or_path"] = model_name
    return json.dumps(finite(config), indent=2, sort_keys=True, allow_nan=False) + "\n"


def peft_config_json(plan: Plan) -> str:
    """PEFT's own adapter_config.json for a plan, naming the model as the user gave it."""
    with tempfile.TemporaryDirectory() as tmp:
        plan.lora_config().save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text(encoding="utf-8"))
    return adapter_config_text(config, plan.model.get("name"))


def export(plan: Plan, out: str | None, peft_config: str | None, overwrite: bool) -> tuple[dict, list[str]]:
    """Write the plan file and/or PEFT's adapter_config.json (each replaced only with `overwrite`); returns what
    `placement plan` prints, and its JSON form."""
    if out:
        write_new_file(out, json_text(plan.to_json()), overwrite)
    if peft_config:
        write_new_file(Path(peft_config) / "adapter_config.json", peft_config_json(plan), overwrite)
    ranked = plan.targets_by_rank()
    summary = {"strategy": plan.label, "targets": ranked, "trainable_params": plan.trainable_params,
               "out": out, "peft_config": peft_config}
    return summary, [
        f"strategy   {plan.label}",
        f"targets    {len(ranked)} by rank: {', '.join(ranked[:6])}" + (" ..." if len(ranked) > 6 else ""),
        f"trainable  {plan.trainable_params:,} LoRA parameters at r={plan.peft['r']}",
    ] + [f"wrote      {path}" for path in (out, peft_config and f"{peft_config}/adapter_config.json") if path]
