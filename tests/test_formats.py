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
AXOLOTL_KEYS = {"adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                "peft_use_dora", "peft_use_rslora", "peft_init_lora_weights", "lora_rank_pattern", "lora_alpha_pattern"}
LLAMA_FACTORY_KEYS = {"finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
                      "use_rslora", "pissa_init", "pissa_iter"}


def axolotl_lora_config(cfg: dict) -> LoraConfig:
    """What axolotl's adapter builder passes to PEFT (build_common_config_kwargs and build_config); with
    lora_target_linear true it would target every linear layer instead of the list."""
    assert cfg["lora_target_linear"] is False
    kwargs = {"rank_pattern": cfg.get("lora_rank_pattern") or {}, "alpha_pattern": cfg.get("lora_alpha_pattern") or {}}
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
    factory = yaml.safe_load(render(plan, "llama-factory"))
    assert factory["pissa_init"] is True and factory["pissa_iter"] == -1  # PEFT's exact pissa, not pissa_niter_16


def allocated(make_plan, model):
    """A plan that gives its two sites their own ranks, as allocate makes them."""
    sites = [s["site"] for s in make_plan(model, Strategy("top-k", k=2)).sites[:2]]
    return make_plan(model, Strategy("allocate", max_params=10**6, ranks={sites[0]: 2, sites[1]: 6}))


def test_per_site_ranks_and_fractional_alpha_are_refused_where_they_cannot_be_said(make_plan):
    from placement.errors import PlacementError

    model = tiny_model("llama")
    with pytest.raises(PlacementError, match="different ranks"):
        render(allocated(make_plan, model), "llama-factory")
    fractional = make_plan(model, Strategy("dominant"))
    fractional.peft["lora_alpha"] = 12.5
    for tool in ("axolotl", "llama-factory"):
        with pytest.raises(PlacementError, match="integer lora_alpha"):
            render(fractional, tool)


def test_axolotl_says_per_site_ranks_with_its_patterns_and_the_version_it_needs(make_plan):
    model = tiny_model("llama")
    plan = allocated(make_plan, model)
    text = render(plan, "axolotl")
    assert "axolotl 0.18 or later" in text.splitlines()[1]
    cfg = yaml.safe_load(text)
    assert cfg["lora_rank_pattern"] == plan.peft["rank_pattern"]
    assert cfg["lora_alpha_pattern"] == plan.peft["alpha_pattern"]
    sites, params = adapted(model, axolotl_lora_config(cfg))
    assert sites == set(plan.targets) and params == plan.trainable_params


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
    out = tmp_path / "factory.yaml"
    result = invoke("plan", str(tmp_path / "plan.json"), "--format", "llama-factory", "--out", str(out))
    assert_one_line_error(result, "different ranks", "--format peft")
    assert not out.exists()


def family_plans(make_plan, model) -> dict:
    """A plan of each family other than LoRA, as compare's arms make them."""
    from placement.plan.plan import prompt_plan

    base = make_plan(model, Strategy("dominant"))
    plans = {name: make_plan(model, Strategy(name)).with_family(name, size)
             for name, size in (("ia3", None), ("series-bn", 4), ("parallel-bn", 4))}
    plans |= {name: prompt_plan(base, model, name, 3) for name in ("prompt", "prefix", "llama-adapter")}
    for plan in plans.values():
        plan.model["model_type"] = model.config.model_type
    return plans


def test_family_plans_export_to_peft_as_their_own_method_or_are_refused(make_plan):
    from peft import PeftConfig

    from placement.errors import PlacementError

    model = tiny_model("llama")
    for name, plan in family_plans(make_plan, model).items():
        for tool in ("axolotl", "llama-factory", "spectrum", "spectrum-unfrozen"):  # each trains LoRA or whole modules
            with pytest.raises(PlacementError, match=f"cannot say a {name} plan") as err:
                render(plan, tool)
            assert "\n" not in str(err.value) and "--format plan" in str(err.value)
        if plan.family in ("series-bn", "parallel-bn"):  # ours: PEFT has no bottleneck method
            with pytest.raises(PlacementError, match="PEFT has no such method"):
                render(plan, "peft")
            continue
        data = json.loads(render(plan, "peft"))
        assert data["peft_type"] == {"ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING",
                                     "llama-adapter": "ADAPTION_PROMPT"}[name]
        peft_model = get_peft_model(tiny_model("llama"), PeftConfig.from_peft_type(**data))
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == plan.trainable_params
        if name == "ia3":
            assert sorted(data["target_modules"]) == sorted(plan.targets)


def test_family_plans_in_the_plan_command(make_plan, invoke, assert_one_line_error, tmp_path):
    plans = family_plans(make_plan, tiny_model("llama"))
    for name in ("prompt", "series-bn"):
        plans[name].save(tmp_path / f"{name}.json")
    prompt, bottleneck = str(tmp_path / "prompt.json"), str(tmp_path / "series-bn.json")
    assert_one_line_error(invoke("plan", prompt, "--format", "axolotl"), "cannot say a prompt plan")
    assert_one_line_error(invoke("plan", bottleneck, "--peft-config", str(tmp_path / "p")), "PEFT has no such method")
    assert not (tmp_path / "p").exists()
    assert_one_line_error(invoke("plan", bottleneck, "--r", "8"), "not LoRA", "drop --r")
    assert_one_line_error(invoke("plan", prompt, "--strategy", "top-k", "--k", "2"), "not LoRA", "--strategy")
    result = invoke("plan", prompt, "--format", "peft")
    assert result.exit_code == 0 and json.loads(result.output)["num_virtual_tokens"] == 3


def test_plan_r_keeps_alpha_over_r_and_counts_again_as_train_r(make_plan, invoke, tmp_path):
    plan = make_plan(tiny_model("llama"), Strategy("top-k", k=2))
    plan.save(tmp_path / "plan.json")
    result = invoke("plan", str(tmp_path / "plan.json"), "--r", "3", "--out", str(tmp_path / "r3.json"), "--json")
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "r3.json").read_text())
    assert again["peft"]["r"] == 3
    assert again["peft"]["lora_alpha"] / 3 == pytest.approx(plan.peft["lora_alpha"] / plan.peft["r"])
    assert again["trainable_params"] == json.loads(result.output)["trainable_params"] == plan.with_rank(3).trainable_params
    assert again["trainable_params"] == sum(3 * (r["d_in"] + r["d_out"]) for r in plan.sites if r["site"] in plan.targets)


def test_plan_r_refuses_what_one_rank_cannot_say(make_plan):
    from placement.errors import PlacementError

    model = tiny_model("llama")
    with pytest.raises(PlacementError, match="its own rank"):
        allocated(make_plan, model).with_rank(3)  # the per-site ranks would be replaced
    for rank in (2.5, 0, True):
        with pytest.raises(PlacementError, match="not a LoRA rank"):
            make_plan(model, Strategy("dominant")).with_rank(rank)
