"""A plan in the formats of the tools users train with: our plan JSON, PEFT's adapter_config.json, an axolotl or a
LLaMA-Factory config fragment, and Spectrum's per-module score file and unfrozen-parameter list.

Each format is one function from a plan to the file's text, registered in FORMATS; a plan a format cannot express
(another family than the tool trains, per-site ranks where the tool has one rank, a fractional alpha where it takes
an integer, a variant it lacks) is refused in one line rather than written so that the tool would silently train
something else. Which formats can say a family's plan is the family's own word (`Family.formats`). The keys are those
of the tools' own sources: axolotl's `LoraConfig` schema (src/axolotl/utils/schemas/peft.py) and adapter builder,
LLaMA-Factory's `LoraArguments` (src/llamafactory/hparams/finetuning_args.py), Spectrum's `save_snr_to_json` and
`generate_unfrozen_params_yaml` (spectrum.py).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..errors import PlacementError
from ..families import get_family
from ..outputs import finite, json_text
from .plan import Plan


@dataclass(frozen=True)
class Format:
    name: str
    help: str
    write: Callable[[Plan], str]
    trains: str = ""  # what the tool trains, said when it cannot train a plan's family


def expressible(plan: Plan, name: str) -> None:
    """Refuse, in one line, a plan whose family the format's tool cannot train."""
    family = get_family(plan.family)
    if name not in family.formats:
        why = FORMATS[name].trains or f"it has no {plan.family} adapter"
        raise PlacementError(f"--format {name} cannot say a {plan.family} plan ({why}): use --format "
                             f"{' or '.join(family.formats)}")


def _integer_alpha(plan: Plan, tool: str) -> int:
    alpha = plan.peft["lora_alpha"]
    if not float(alpha).is_integer():
        raise PlacementError(f"{tool} takes an integer lora_alpha and this plan's is {alpha}: make the plan with an "
                             "--r that keeps alpha whole, or use --format peft")
    return int(alpha)


AXOLOTL_PATTERNS = "0.18"  # the first axolotl release with lora_rank_pattern and lora_alpha_pattern


def _one_rank(plan: Plan, tool: str) -> None:
    if plan.peft.get("rank_pattern"):
        raise PlacementError(f"this plan gives its sites different ranks, which {tool} cannot express (one rank for "
                             "every target): use --format peft, or a strategy with one rank")


def _header(plan: Plan, tool: str, needs: str = "") -> str:
    return (f"# placement plan for {tool}: {plan.label}, {len(plan.targets)} site(s), {plan.trainable_params:,} "
            f"trainable parameters, model {plan.model.get('name', '?')}\n" + (f"# {needs}\n" if needs else ""))


def _yaml(plan: Plan, tool: str, config: dict, needs: str = "") -> str:
    return _header(plan, tool, needs) + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def axolotl(plan: Plan) -> str:
    """The adapter keys of an axolotl config: exact module names, so PEFT adapts exactly the plan's sites, and
    `lora_target_linear: false` so that a base config that sets it does not widen the plan to every linear layer.
    Per-site ranks go to `lora_rank_pattern` and `lora_alpha_pattern`, which need axolotl 0.18 or later."""
    config = {"adapter": "lora", "lora_r": int(plan.peft["r"]), "lora_alpha": _integer_alpha(plan, "axolotl"),
              "lora_dropout": float(plan.peft.get("lora_dropout", 0.0)),
              "lora_target_modules": plan.targets_by_rank(), "lora_target_linear": False}
    needs = ""
    if plan.peft.get("rank_pattern"):
        config["lora_rank_pattern"] = {t: int(v) for t, v in plan.peft["rank_pattern"].items()}
        config["lora_alpha_pattern"] = dict(plan.peft.get("alpha_pattern") or {})
        needs = f"per-site ranks (lora_rank_pattern, lora_alpha_pattern): needs axolotl {AXOLOTL_PATTERNS} or later"
    switches = {"use_dora": "peft_use_dora", "use_rslora": "peft_use_rslora"}
    config.update({key: True for flag, key in switches.items() if plan.peft.get(flag)})
    if plan.peft.get("init_lora_weights", True) is not True:
        config["peft_init_lora_weights"] = plan.peft["init_lora_weights"]
    return _yaml(plan, "axolotl", config, needs)


def llama_factory(plan: Plan) -> str:
    """The LoRA arguments of a LLaMA-Factory config; `lora_target` is split at commas and handed to PEFT."""
    _one_rank(plan, "LLaMA-Factory")
    init = plan.peft.get("init_lora_weights", True)
    if init not in (True, "pissa"):
        raise PlacementError(f"LLaMA-Factory has no {init} init (it offers pissa_init only): use --format peft")
    config = {"finetuning_type": "lora", "lora_rank": int(plan.peft["r"]),
              "lora_alpha": _integer_alpha(plan, "LLaMA-Factory"),
              "lora_dropout": float(plan.peft.get("lora_dropout", 0.0)),
              "lora_target": ",".join(plan.targets_by_rank())}
    config.update({flag: True for flag in ("use_dora", "use_rslora") if plan.peft.get(flag)})
    if init == "pissa":  # pissa_iter -1: PEFT's exact SVD, as the plan's `pissa` (alone: the approximate niter_16)
        config.update(pissa_init=True, pissa_iter=-1)
    return _yaml(plan, "LLaMA-Factory", config)


def weight_type(site: str) -> str:
    """Spectrum's type of a module: its path after the layer index (`mlp.down_proj`)."""
    parts = site.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), -1)
    return ".".join(parts[index + 1:]) if index != -1 else site


def spectrum(plan: Plan) -> str:
    """Spectrum's `snr_results_<model>.json` shape, {module: {"snr": score, "type": weight type}}, with the plan's
    score (PAGE by default) in place of the SNR, for every candidate site."""
    rows = {row["site"]: {"snr": float(row["score"]), "type": weight_type(row["site"])} for row in plan.sites}
    return json.dumps(rows, indent=4) + "\n"


def spectrum_unfrozen(plan: Plan) -> str:
    """Spectrum's `unfrozen_parameters` list with the plan's sites: whole modules unfrozen for full fine-tuning (no
    LoRA), grouped by type as Spectrum writes it. Spectrum also unfreezes the embeddings and the LM head; this
    list holds the plan's sites only."""
    by_name = {row["site"]: row for row in plan.sites}
    weights = sum(int(by_name[t]["d_in"]) * int(by_name[t]["d_out"]) for t in plan.targets)
    lines = [f"# placement plan for Spectrum: {plan.label}, {len(plan.targets)} module(s) unfrozen whole for full "
             f"fine-tuning (not LoRA), {weights:,} weights, model {plan.model.get('name', '?')}",
             "unfrozen_parameters:"]
    by_type: dict[str, list[str]] = {}
    for site in plan.targets_by_rank():
        by_type.setdefault(weight_type(site), []).append(site)
    for kind, names in by_type.items():
        lines.append(f"# {kind} layers")
        lines.extend(f"- {name}" for name in names)
    return "\n".join(lines) + "\n"


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
    """PEFT's own adapter_config.json for a plan (of LoRA or another of PEFT's methods), naming the model as the user
    gave it."""
    expressible(plan, "peft")
    with tempfile.TemporaryDirectory() as tmp:
        plan.adapter_config().save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text(encoding="utf-8"))
    return adapter_config_text(config, plan.model.get("name"))


def _plan_json(plan: Plan) -> str:
    return json_text(plan.to_json())


def _peft(plan: Plan) -> str:
    return peft_config_json(plan)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("plan", "our plan JSON, which train --plan reads", _plan_json),
    Format("peft", "PEFT's adapter_config.json (PeftConfig.from_pretrained reads it)", _peft,
           "PEFT has no such method: the adapter is ours, saved by placement train and loaded by "
           "placement.families.load"),
    Format("axolotl", "the adapter keys of an axolotl YAML config", axolotl, "axolotl trains LoRA and QLoRA adapters"),
    Format("llama-factory", "the LoRA keys of a LLaMA-Factory YAML config", llama_factory,
           "LLaMA-Factory's adapter is LoRA"),
    Format("spectrum", "Spectrum's per-module score JSON, our score in place of the SNR", spectrum,
           "Spectrum fine-tunes whole linear modules, and the file would carry LoRA's scores"),
    Format("spectrum-unfrozen", "Spectrum's unfrozen_parameters YAML: full fine-tuning of the sites, not LoRA",
           spectrum_unfrozen, "Spectrum unfreezes whole linear modules for full fine-tuning"),
)}


def render(plan: Plan, name: str) -> str:
    if name not in FORMATS:
        raise PlacementError(f"unknown --format '{name}': choose one of {', '.join(FORMATS)}")
    expressible(plan, name)
    return FORMATS[name].write(plan)
