"""Every registered adapter family through the shared harness, on every tiny architecture it adapts; a family
registered from outside the package (`placement.register_family`) gets its arms, scores, help and checks the same
way; and what the registry must refuse."""
import copy

import pytest
import torch
from peft import get_peft_model

import placement
from conftest import random_batch
from family_harness import FamilyChecks
from helpers import peft_lora_b_energy
from placement.errors import PlacementError
from placement.families import FAMILIES, Candidate, Family, families_help, get_family, unregister
from placement.families.ia3 import ia3_config, ia3_gradient
from placement.model.loss import token_loss
from placement.model.sites import find_sites
from placement.probe import ProbeSettings, probe
from placement.probe.families import family_scores
from placement.probe.prompts import prompt_scores
from tiny import tiny_model


# -- a family of this test module: IA3's output scaling on the query projections alone ----------------------------
def _query_sites(model):
    return [s for s in find_sites(model) if s.role in ("q", "qkv")]


QUERY = Family(
    name="query-scale", help="learned scaling of the query projections' outputs (PEFT IA3Config)",
    score="||grad l||^2 at l = 1", roles=("q", "qkv"), find_sites=_query_sites,
    params=lambda row, size: int(row["d_out"]), config=ia3_config,
    kwargs=lambda plan, model=None: {"target_modules": list(plan.targets), "feedforward_modules": []},
    candidate=lambda site, module, options: Candidate(site.d_out, lambda x, y, g: ia3_gradient(x, y, g, None, False)),
    formats=("plan", "peft"),
)


@pytest.fixture(scope="module", autouse=True)
def query_family():
    placement.register_family(QUERY)
    yield QUERY
    unregister(QUERY.name)


def _all(cls):
    return [c for sub in cls.__subclasses__() for c in [sub, *_all(sub)] if getattr(c, "family", None)]


def test_every_registered_family_has_a_test_class():
    tested = {cls.family for cls in _all(FamilyChecks)}
    assert tested == set(FAMILIES)
    assert {"lora", "ia3", "series-bn", "parallel-bn", "prompt", "prefix", "llama-adapter"} < tested


def test_a_family_registered_outside_the_package_has_its_arms_scores_and_help():
    from placement.plan.strategies import check_arms, parse_arms

    assert "query-scale:" in families_help()
    arm = parse_arms("query-scale-1")[0]
    assert (arm.strategy, arm.k) == ("query-scale", 1)
    with pytest.raises(PlacementError, match="takes no size"):
        parse_arms("query-scale:r4")
    model = tiny_model("llama")
    with pytest.raises(PlacementError, match="has 2"):
        check_arms(parse_arms("query-scale-3"), model)
    scores = family_scores(model, [random_batch(0)], ["query-scale"])
    assert list(scores["site"]) == [s.name for s in _query_sites(model)] and (scores["page"] > 0).all()
    with pytest.raises(ValueError, match="twice"):
        placement.register_family(QUERY)


def test_lora_plans_name_only_sites_and_inits_the_tool_trains(make_plan, tmp_path):
    from placement.plan import Plan, Strategy

    model = tiny_model("llama")
    plan = make_plan(model, Strategy("dominant"))
    plan.targets = plan.peft["target_modules"] = ["model.embed_tokens"]
    with pytest.raises(PlacementError, match="model.embed_tokens is not a lora site"):
        plan.check(model)
    with pytest.raises(PlacementError, match="not a lora site"):
        placement.apply(model, plan)
    eva = make_plan(model, Strategy("dominant"))
    eva.peft["init_lora_weights"] = "eva"
    eva.save(tmp_path / "plan.json")
    with pytest.raises(PlacementError, match="init_lora_weights 'eva'"):
        Plan.load(tmp_path / "plan.json")
    with pytest.raises(PlacementError, match="init_lora_weights 'corda'"):
        placement.apply(model, make_plan(model, Strategy("dominant")), init_lora_weights="corda")


def test_a_bottleneck_plan_applied_twice_is_refused(make_plan):
    from placement.plan import Strategy

    model = tiny_model("llama")
    plan = make_plan(model, Strategy("series-bn")).with_family("series-bn", 4)
    adapted = placement.apply(model, plan)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    for again in (plan, make_plan(model, Strategy("dominant"))):
        with pytest.raises(PlacementError, match="already has"):
            placement.apply(adapted, again)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == trainable == plan.trainable_params


# -- the families' test classes -------------------------------------------------------------------------------------
class TestLoRA(FamilyChecks):
    family = "lora"

    def adapter_kwargs(self, model, targets):
        return dict(task_type="CAUSAL_LM", r=self.size, lora_alpha=2 * self.size, target_modules=targets)

    def score_and_oracle(self, model, site, batch):
        settings = ProbeSettings(r=self.size, alpha=2 * self.size, seed=7)
        ours = probe(model, [site], [batch], settings).scores.set_index("site").loc[site.name, "page_sampled"]
        return float(ours), peft_lora_b_energy(model, site.name, batch, self.size, 2 * self.size, 7)


class _IA3Like(FamilyChecks):
    def score_and_oracle(self, model, site, batch):
        ours = family_scores(model, [batch], [self.family]).set_index("site").loc[site.name, "page"]
        config = get_family(self.family).config(self.adapter_kwargs(model, [site.name]))
        peft_model = get_peft_model(copy.deepcopy(model), config)
        token_loss(peft_model.base_model.model, batch).backward()
        grad = peft_model.base_model.model.get_submodule(site.name).ia3_l["default"].grad
        return float(ours), float(grad.double().pow(2).sum())


class TestIA3(_IA3Like):
    family = "ia3"


class TestQueryScale(_IA3Like):
    family = "query-scale"
    architectures = ("llama", "gpt2")


class _Bottleneck(FamilyChecks):
    placement = "series"
    size = 4  # the reduction factor a plan gives (width = read width // 4); the scores below take a width

    def score_and_oracle(self, model, site, batch):
        from placement.families import bottleneck as bn

        ours = family_scores(model, [batch], [self.family], width=self.size, activation="tanh", seed=5)
        config = bn.BottleneckConfig([site.name], self.placement, width=self.size, activation="tanh")
        adapted = bn.apply(copy.deepcopy(model), config, seed=5)
        token_loss(adapted, batch).backward()
        grad = adapted.get_submodule(site.name).adapter.up.weight.grad
        return float(ours.set_index("site").loc[site.name, "page"]), float(grad.double().pow(2).sum())


class TestSeriesBottleneck(_Bottleneck):
    family, placement = "series-bn", "series"


class TestParallelBottleneck(_Bottleneck):
    family, placement = "parallel-bn", "parallel"


class _VirtualTokens(FamilyChecks):
    """Scored from PEFT's own model after `torch.manual_seed(0)`; the oracle is the same draw's `.grad`, cut into
    sites by the widths the family's site rows state."""
    size = 3
    architectures = ("llama", "gpt2")

    def score_and_oracle(self, model, site, batch):
        ours = prompt_scores(model, [batch], [self.family], length=self.size, seed=0)
        row = ours[ours["layer"] == site.layer].iloc[0]
        config = get_family(self.family).config(self.adapter_kwargs(model, [r["site"] for r in self.rows(model)]))
        torch.manual_seed(0)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
        return float(row["page"]), float(self.oracle(peft_model, model, site).double().pow(2).sum())


class TestPrompt(_VirtualTokens):
    family = "prompt"
    per_block = False

    def oracle(self, peft_model, model, site):
        return peft_model.prompt_encoder["default"].embedding.weight.grad


class TestPrefix(_VirtualTokens):
    family = "prefix"

    def chosen(self, rows):  # PEFT's prefix reaches every layer
        return rows

    one = chosen

    def oracle(self, peft_model, model, site):
        width = site.d_out  # 2 x the key/value width, layer after layer
        return peft_model.prompt_encoder["default"].embedding.weight.grad[:, site.layer * width:(site.layer + 1) * width]


class TestLlamaAdapter(_VirtualTokens):
    family = "llama-adapter"
    architectures = ("llama", "mistral", "gpt2")

    def chosen(self, rows):  # the top layers
        return rows[-2:]

    def oracle(self, peft_model, model, site):
        return next(p.grad for name, p in peft_model.named_parameters()
                    if name.endswith("adaption_gate") and f".{site.layer}." in name)
