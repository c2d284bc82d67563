"""Plans leave the tool in the formats users train with, each read back the way its consumer reads it: axolotl's
and LLaMA-Factory's YAML keys (from their sources: axolotl src/axolotl/utils/schemas/peft.py and its adapter
builder, LLaMA-Factory src/llamafactory/hparams/finetuning_args.py) rebuilt into the LoraConfig those tools make,
applied by PEFT, and Spectrum's score JSON read as its generate_unfrozen_params_yaml reads it."""
import json

import pytest
import yaml
from peft import LoraConfig, get_peft_model

from placement.plan import Strategy
from placement.plan.formats import FORMATS, render, weight_type
from tiny import tiny_model

# The keys each consumer defines for a LoRA adapter (a subset of its schema); a key outside it would be ignored
# or refused there.
AXOLOTL_KEYS = {"adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "peft_use_dora",
                "peft_use_rslora", "peft_init_lora_weights"}
LLAMA_FACTORY_KEYS = {"finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
                      "use_rslora", "pissa_init"}


def axolotl_lora_config(cfg: dict) -> LoraConfig:
    """What axolotl's adapter builder passes to PEFT (build_common_config_kwargs and build_config)."""
    kwargs = {}
    if cfg.get("peft_init_lora_weights"):
        kwargs["init_lora_weights"] = cfg["peft_init_lora_weights"]
    if cfg.get("peft_use_dora"):
        kwargs["use_dora"] = cfg["peft_use_dora"]
    if cfg.get("peft_use_rslora"):
        kwargs["use_rslora"] = cfg["peft_use_rslora"]
    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["lora_target_modules"],
                      lora_dropout=cfg["lora_dropout"], **kwargs)


def llama_factory_lora_config(cfg: dict) -> LoraConfig:
    """What LLaMA-Factory passes to PEFT: lora_target split at commas, pissa_init as init_lora_weights."""
    return LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=[t.strip() for t in cfg["lora_target"].split(",")],
                      use_rslora=cfg.get("use_rslora", False), use_dora=cfg.get("use_dora", False),
                      init_lora_weights="pissa" if cfg.get("pissa_init") else True)


def adapted(model, config: LoraConfig) -> tuple[set[str], int]:
    peft_model = get_peft_model(model, config)
    sites = {name.removesuffix(".lora_A.default") for name, _ in peft_model.get_base_model().named_modules()
             if name.endswith(".lora_A.default")}
    return sites, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
@pytest.mark.parametrize("tool,keys,rebuild", [("axolotl", AXOLOTL_KEYS, axolotl_lora_config),
                                               ("llama-factory", LLAMA_FACTORY_KEYS, llama_factory_lora_config)])
def test_yaml_formats_make_the_plans_adapter_in_the_tool(make_plan, family, variant, tool, keys, rebuild):
    model = tiny_model(family)
    plan = make_plan(model, Strategy("top-k", k=3)).with_variant(variant)
    cfg = yaml.safe_load(render(plan, tool))
    assert set(cfg) <= keys, set(cfg) - keys
    assert isinstance(cfg[{"axolotl": "lora_alpha", "llama-factory": "lora_alpha"}[tool]], int)
    sites, params = adapted(model, rebuild(cfg))
    assert sites == set(plan.targets)
    assert params == plan.trainable_params


def test_axolotl_carries_pissa_and_llama_factory_its_pissa_init(make_plan):
    plan = make_plan(tiny_model("llama"), Strategy("dominant")).with_variant("pissa")
    assert yaml.safe_load(render(plan, "axolotl"))["peft_init_lora_weights"] == "pissa"
    assert yaml.safe_load(render(plan, "llama-factory"))["pissa_init"] is True


@pytest.mark.parametrize("tool", ["axolotl", "llama-factory"])
def test_per_site_ranks_and_fractional_alpha_are_refused_where_they_cannot_be_said(make_plan, tool):
    from placement.errors import PlacementError

    model = tiny_model("llama")
    ranks = make_plan(model, Strategy("top-k", k=2), rank_pattern=None)
    ranks.peft["rank_pattern"] = {ranks.targets[0]: 4}
    with pytest.raises(PlacementError, match="different ranks"):
        render(ranks, tool)
    fractional = make_plan(model, Strategy("dominant"))
    fractional.peft["lora_alpha"] = 12.5
    with pytest.raises(PlacementError, match="integer lora_alpha"):
        render(fractional, tool)


def test_llama_factory_refuses_olora(make_plan):
    from placement.errors import PlacementError

    with pytest.raises(PlacementError, match="olora"):
        render(make_plan(tiny_model("llama"), Strategy("dominant")).with_variant("olora"), "llama-factory")


def test_spectrum_json_has_spectrums_shape_and_ranks_by_our_score(make_plan):
    plan = make_plan(tiny_model("llama"), Strategy("dominant"))
    data = json.loads(render(plan, "spectrum"))
    assert set(data) == {row["site"] for row in plan.sites}
    assert all(set(info) == {"snr", "type"} for info in data.values())
    # Spectrum's generate_unfrozen_params_yaml groups by type and sorts by "snr", largest first
    by_type = {}
    for name, info in data.items():
        by_type.setdefault(info["type"], []).append((name, info["snr"]))
    best = max(data, key=lambda name: data[name]["snr"])
    assert best == plan.dominant_site
    assert data[best]["type"] == weight_type(best) == "mlp.down_proj" or "." in data[best]["type"]
    assert weight_type("model.layers.11.mlp.down_proj") == "mlp.down_proj"


def test_spectrum_unfrozen_lists_exactly_the_plans_sites(make_plan):
    plan = make_plan(tiny_model("gpt2"), Strategy("top-k", k=3))
    data = yaml.safe_load(render(plan, "spectrum-unfrozen"))
    assert data == {"unfrozen_parameters": plan.targets_by_rank()}
    assert "not LoRA" in render(plan, "spectrum-unfrozen").splitlines()[0]


def test_every_format_renders_and_the_cli_writes_it(make_plan, invoke, tmp_path):
    plan = make_plan(tiny_model("llama"), Strategy("dominant"))
    plan.save(tmp_path / "plan.json")
    for name in FORMATS:
        out = tmp_path / f"plan.{name}"
        result = invoke("plan", str(tmp_path / "plan.json"), "--format", name, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert out.read_text() == render(plan, name)
    assert json.loads((tmp_path / "plan.peft").read_text())["target_modules"] == plan.targets


def test_unknown_format_and_inexpressible_plan_are_one_line(make_plan, invoke, assert_one_line_error, tmp_path):
    plan = make_plan(tiny_model("llama"), Strategy("top-k", k=2))
    plan.peft["rank_pattern"] = {plan.targets[0]: 4}
    plan.peft["alpha_pattern"] = {plan.targets[0]: 8}
    plan.save(tmp_path / "plan.json")
    assert_one_line_error(invoke("plan", str(tmp_path / "plan.json"), "--format", "yaml"), "yaml")
    out = tmp_path / "axolotl.yaml"
    result = invoke("plan", str(tmp_path / "plan.json"), "--format", "axolotl", "--out", str(out))
    assert_one_line_error(result, "different ranks", "--format peft")
    assert not out.exists()
