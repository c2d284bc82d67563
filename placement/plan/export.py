"""A plan leaves the tool: from a profile's folder or a plan file, in one of the formats of `formats.py` or as PEFT's
adapter_config.json in a folder, each a single file written atomically and replaced only when asked."""
from __future__ import annotations

from pathlib import Path

from ..errors import PlacementError
from ..outputs import write_new_file
from .formats import peft_config_json, render
from .plan import Plan
from .strategies import Strategy, allocate_strategy, read_spectrum


def plan_from_source(source: str | Path, rank: int | None = None) -> Plan:
    """The plan of a profile's folder, its scores.csv or a plan file; `rank` sets another r as `train --r` does
    (alpha / r kept, the parameters counted again)."""
    path = Path(source)
    if not path.exists():
        raise PlacementError(f"{source} not found: pass the --out folder of placement profile or a plan file")
    plan = Plan.load(path.parent / "plan.json" if path.suffix == ".csv" else path)
    return plan.with_rank(rank)


def replan(source: str | Path, base: Plan, strategy: Strategy | None) -> Plan:
    """`base` with another strategy (itself without one); allocate reads the gradient spectrum the profile folder
    kept."""
    if strategy is None:
        return base
    if strategy.name == "allocate" and not strategy.ranks:
        folder = Path(source).parent if Path(source).is_file() else Path(source)
        strategy = allocate_strategy(strategy.max_params, read_spectrum(folder), base.sites)
    return base.with_strategy(strategy)


def export(plan: Plan, out: str | None, peft_config: str | None, overwrite: bool,
           fmt: str = "plan") -> tuple[dict, list[str]]:
    """Write the plan in `fmt` to `out` and/or PEFT's adapter_config.json into `peft_config` (each replaced only
    with `overwrite`); returns what `placement plan` prints, and its JSON form."""
    if out:
        write_new_file(out, render(plan, fmt), overwrite)
    if peft_config:
        write_new_file(Path(peft_config) / "adapter_config.json", peft_config_json(plan), overwrite)
    ranked = plan.targets_by_rank()
    summary = {"strategy": plan.label, "family": plan.family, "targets": ranked,
               "trainable_params": plan.trainable_params, "variant": plan.variant, "format": fmt, "out": out, "peft_config": peft_config}
    return summary, [
        f"strategy   {plan.label}",
        f"targets    {len(ranked)} by rank: {', '.join(ranked[:6])}" + (" ..." if len(ranked) > 6 else ""),
        _trainable(plan),
    ] + [f"wrote      {path}" + (f" ({fmt})" if path == out and fmt != "plan" else "") for path in (out, peft_config and f"{peft_config}/adapter_config.json") if path]


def _trainable(plan: Plan) -> str:
    if plan.family != "lora":
        sizes = ", ".join(f"{k} {v}" for k, v in (plan.family_args or {}).items())
        return f"trainable  {plan.trainable_params:,} {plan.family} parameters" + (f" ({sizes})" if sizes else "")
    return (f"trainable  {plan.trainable_params:,} LoRA parameters at r={plan.peft['r']}"
            + ("" if plan.variant == "lora" else f" ({plan.variant})"))
