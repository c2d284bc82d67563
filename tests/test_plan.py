"""Plans: each strategy on a synthetic ranking, the JSON file format, the model check, and PEFT as the oracle."""
import copy
import json
import math

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model

from placement.errors import PlacementError
from placement.plan import SCHEMA, STRATEGIES, Plan, Strategy, select
from placement.model.sites import find_sites
from helpers import R, make_plan, ranked_rows
from tiny import tiny_model

@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def phi3():
    return tiny_model("phi3")


@pytest.fixture(scope="module")
def sites(llama):
    return find_sites(llama)


@pytest.fixture(scope="module")
def scores(sites):
    return np.random.default_rng(0).permutation(len(sites)) + 1.0


def names(sites):
    return [s.name for s in sites]


def strategy_for(name):
    ranks = {"model.layers.1.mlp.down_proj": 2, "model.layers.0.self_attn.q_proj": 1} if name == "allocate" else None
    return Strategy(name, k=2 if name in ("top-k", "last-k") else None,
                    max_params=2000 if name in ("budget", "allocate") else None, seed=3, ranks=ranks)


def test_every_strategy_builds_a_plan_in_model_order(llama, sites, scores):
    order = names(sites)
    for name in STRATEGIES:
        plan = make_plan(llama, strategy_for(name), scores)
        assert plan.targets, name
        assert plan.targets == [n for n in order if n in plan.targets], name  # model order, no duplicates
        assert plan.peft["target_modules"] == plan.targets
        assert plan.strategy["name"] == name
        assert plan.schema == SCHEMA


def test_dominant_is_the_top_site(llama, sites, scores):
    plan = make_plan(llama, Strategy("dominant"), scores)
    assert plan.targets == [sites[int(np.argmax(scores))].name]
    assert plan.label == "dominant"


@pytest.mark.parametrize("k", [1, 3, 5, 14, 20])
def test_top_k_picks_the_k_best_in_model_order(llama, sites, scores, k):
    plan = make_plan(llama, Strategy("top-k", k=k), scores)
    best = {sites[i].name for i in np.argsort(-scores)[:k]}
    assert plan.targets == [s.name for s in sites if s.name in best]
    assert len(plan.targets) == min(k, len(sites))
    assert plan.label == f"top-{k}"
    assert plan.trainable_params == sum(s.lora_params(R) for s in sites if s.name in best)


def test_budget_prefers_score_per_parameter(llama, sites):
    by_name = {s.name: s for s in sites}
    gate, k, v = "model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"
    # gate has the top score but costs 40r; k and v cost 24r each and score more per parameter.
    scores = [{gate: 10.0, k: 9.0, v: 8.0}.get(s.name, 1.0) for s in sites]
    budget = by_name[k].lora_params(R) + by_name[v].lora_params(R)
    assert by_name[gate].lora_params(R) < budget
    plan = make_plan(llama, Strategy("budget", max_params=budget), scores)
    assert plan.targets == [k, v]
    assert plan.trainable_params == budget
    assert make_plan(llama, Strategy("top-k", k=1), scores).targets == [gate]


@pytest.mark.parametrize("max_params", [100, 150, 400, 1000, 3000, 10 ** 6])
def test_budget_respects_max_params_and_fills_it(llama, sites, scores, max_params):
    plan = make_plan(llama, Strategy("budget", max_params=max_params), scores)
    chosen = set(plan.targets)
    assert plan.trainable_params == sum(s.lora_params(R) for s in sites if s.name in chosen)
    assert plan.trainable_params <= max_params
    # Greedy: no site left out would still fit.
    for s in sites:
        if s.name not in chosen:
            assert plan.trainable_params + s.lora_params(R) > max_params
    if max_params >= sum(s.lora_params(R) for s in sites):
        assert plan.targets == names(sites)


def test_structural_strategies(llama, sites, scores):
    assert make_plan(llama, Strategy("all-linear"), scores).targets == names(sites)
    assert make_plan(llama, Strategy("attn-qv"), scores).targets == [s.name for s in sites if s.role in ("q", "v")]
    assert make_plan(llama, Strategy("ffn"), scores).targets == [
        s.name for s in sites if s.role in ("gate", "up", "down")]
    last1 = make_plan(llama, Strategy("last-k", k=1), scores)
    assert last1.targets == [s.name for s in sites if s.layer == 1] and len(last1.targets) == 7
    assert last1.label == "last-1"
    assert make_plan(llama, Strategy("last-k", k=2), scores).targets == names(sites)
    assert make_plan(llama, Strategy("last-k", k=9), scores).targets == names(sites)


def test_structural_strategies_do_not_look_at_scores(llama, sites, scores):
    other = scores[::-1].copy()
    for name in ("all-linear", "attn-qv", "ffn", "last-k", "random-1"):
        strategy = strategy_for(name)
        assert make_plan(llama, strategy, scores).targets == make_plan(llama, strategy, other).targets, name


def test_fused_projections(phi3):
    sites = find_sites(phi3)
    assert make_plan(phi3, Strategy("attn-qv")).targets == [s.name for s in sites if s.role == "qkv"]
    assert make_plan(phi3, Strategy("ffn")).targets == [s.name for s in sites if s.role in ("gate_up", "down")]
    assert len(make_plan(phi3, Strategy("attn-qv")).targets) == 2


def test_random_one_is_seeded(llama, sites, scores):
    picks = [make_plan(llama, Strategy("random-1", seed=seed), scores).targets for seed in range(20)]
    assert all(len(p) == 1 and p[0] in names(sites) for p in picks)
    assert picks == [make_plan(llama, Strategy("random-1", seed=seed), scores).targets for seed in range(20)]
    assert len({p[0] for p in picks}) > 3


def test_select_accepts_rows_in_any_order(llama, sites, scores):
    rows, _ = ranked_rows(sites, scores)
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    for name in STRATEGIES:
        strategy = strategy_for(name)
        assert select(shuffled, strategy, R) == select(rows, strategy, R), name


@pytest.mark.parametrize("strategy, message", [
    (Strategy("top-k"), "top-k needs --k"),
    (Strategy("top-k", k=0), "top-k needs --k"),
    (Strategy("last-k"), "last-k needs --k"),
    (Strategy("budget"), "budget needs --max-params"),
    (Strategy("budget", max_params=10), "--max-params 10 fits no site"),
    (Strategy("best-site"), "unknown strategy best-site"),
])
def test_strategy_errors(llama, scores, strategy, message):
    with pytest.raises(PlacementError, match=message) as err:
        make_plan(llama, strategy, scores)
    assert "\n" not in str(err.value)


def test_strategy_that_selects_nothing(llama, sites, scores):
    rows, _ = ranked_rows(sites, scores)
    ffn_only = [row for row in rows if row["role"] in ("gate", "up", "down")]
    with pytest.raises(PlacementError, match="attn-qv selects no site"):
        select(ffn_only, Strategy("attn-qv"), R)


# -- files -----------------------------------------------------------------------------------------------------------

def test_save_load_round_trip(llama, scores, tmp_path):
    plan = make_plan(llama, Strategy("top-k", k=3), scores)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert list(data)[0] == "schema" and data["schema"] == "placement-plan/1"
    assert data["targets"] == plan.targets and data["peft"]["target_modules"] == plan.targets
    assert data["trainable_params"] == plan.trainable_params
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert Plan.load(tmp_path) == plan  # a folder means its plan.json


def test_non_finite_values_are_written_as_null(llama, tmp_path):
    scores = [0.0] * 14
    scores[3] = 2.0  # one-hot: top1/top2 ratio is infinite
    plan = make_plan(llama, Strategy("dominant"), scores)
    assert plan.concentration["top1_top2_ratio"] == math.inf
    plan.sites[5]["score"] = float("nan")
    plan.save(tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["concentration"]["top1_top2_ratio"] is None
    assert data["sites"][5]["score"] is None
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.concentration["top1_top2_ratio"] is None and loaded.sites[5]["score"] is None
    assert loaded.to_json() == plan.to_json()
    assert loaded.targets == plan.targets


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: "", "not valid JSON"),
    (lambda d: d | {"schema": "placement-plan/2"}, "schema 'placement-plan/2'"),
    (lambda d: {k: v for k, v in d.items() if k != "schema"}, "schema None"),
    (lambda d: [d], "schema 'list'"),
    (lambda d: {k: v for k, v in d.items() if k != "targets"}, "lacks targets"),
    (lambda d: {k: v for k, v in d.items() if k not in ("peft", "sites")}, "lacks sites, peft"),
])
def test_load_refuses_bad_files(llama, scores, tmp_path, mutate, message):
    data = make_plan(llama, Strategy("dominant"), scores).to_json()
    path = write(tmp_path / "plan.json", mutate(data))
    with pytest.raises(PlacementError, match=message) as err:
        Plan.load(path)
    assert "\n" not in str(err.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(PlacementError, match="not found"):
        Plan.load(tmp_path / "absent.json")
    with pytest.raises(PlacementError, match="not found"):
        Plan.load(tmp_path)  # a folder without plan.json


def test_load_ignores_unknown_keys(llama, scores, tmp_path):
    plan = make_plan(llama, Strategy("dominant"), scores)
    path = write(tmp_path / "plan.json", plan.to_json() | {"comment": "added by hand"})
    assert Plan.load(path) == plan


# -- use -------------------------------------------------------------------------------------------------------------

def test_check_accepts_the_same_model(llama, scores):
    plan = make_plan(llama, Strategy("all-linear"), scores)
    plan.check(llama)
    plan.check(tiny_model("llama", seed=9))  # other weights, same sites


@pytest.mark.parametrize("other, message", [
    (dict(family="gpt2"), "is not in this model"),
    (dict(num_hidden_layers=1), r"site model\.layers\.1\.\S+ of the plan is not in this model"),
    (dict(intermediate_size=32), "fingerprint"),
    (dict(num_hidden_layers=3), "fingerprint"),
])
def test_check_refuses_another_model(llama, scores, other, message):
    plan = make_plan(llama, Strategy("all-linear"), scores)
    model = tiny_model(**other)
    with pytest.raises(PlacementError, match=message) as err:
        plan.check(model)
    assert "\n" not in str(err.value)


def test_check_refuses_a_different_fingerprint_even_when_targets_exist(llama, scores):
    plan = make_plan(llama, Strategy("dominant"), scores)
    with pytest.raises(PlacementError, match="fingerprint"):
        plan.check(tiny_model("llama", intermediate_size=32))


def wrapped(peft_model):
    return [name for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("strategy", [Strategy("dominant"), Strategy("top-k", k=3), Strategy("budget", max_params=600),
                                      Strategy("attn-qv"), Strategy("all-linear"), Strategy("random-1", seed=4)])
def test_lora_config_wraps_exactly_the_targets(family, strategy):
    model = tiny_model(family)
    plan = make_plan(model, strategy)
    config = plan.lora_config()
    assert isinstance(config, LoraConfig)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    assert sorted(wrapped(peft_model)) == sorted(plan.targets)  # phi3 registers o_proj before qkv_proj
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == plan.trainable_params


def test_rank_pattern_changes_params_and_peft_honours_it(llama, sites, scores):
    by_name = {s.name: s for s in sites}
    base = make_plan(llama, Strategy("top-k", k=3), scores)
    first, second = base.targets[0], base.targets[1]
    plan = base.with_strategy(Strategy("top-k", k=3), rank_pattern={first: 8, second: 1})
    assert plan.targets == base.targets
    assert plan.peft["rank_pattern"] == {first: 8, second: 1}
    delta = (8 - R) * (by_name[first].d_in + by_name[first].d_out) \
        + (1 - R) * (by_name[second].d_in + by_name[second].d_out)
    assert plan.trainable_params == base.trainable_params + delta
    assert plan.trainable_params != base.trainable_params

    peft_model = get_peft_model(copy.deepcopy(llama), plan.lora_config())
    assert wrapped(peft_model) == plan.targets
    inner = peft_model.base_model.model
    assert inner.get_submodule(first).lora_A["default"].weight.shape[0] == 8
    assert inner.get_submodule(second).lora_A["default"].weight.shape[0] == 1
    assert inner.get_submodule(base.targets[2]).lora_A["default"].weight.shape[0] == R
    assert peft_model.get_nb_trainable_parameters()[0] == plan.trainable_params

    # A later choice without a pattern drops it.
    again = plan.with_strategy(Strategy("top-k", k=3))
    assert "rank_pattern" not in again.peft and again.trainable_params == base.trainable_params


def test_with_strategy_keeps_probe_and_ranking(llama, scores):
    base = make_plan(llama, Strategy("dominant"), scores)
    other = base.with_strategy(Strategy("ffn"))
    assert other.sites == base.sites and other.probe == base.probe and other.model == base.model
    assert other.concentration == base.concentration
    assert {k: v for k, v in other.peft.items() if k != "target_modules"} == \
        {k: v for k, v in base.peft.items() if k != "target_modules"}
    assert other.targets != base.targets and other.label == "ffn"


def test_allocate_beats_uniform_ranks_on_captured_energy():
    from placement.plan.strategies import allocate_ranks

    rows = [{"site": "a", "d_in": 6, "d_out": 4}, {"site": "b", "d_in": 6, "d_out": 4},
            {"site": "c", "d_in": 30, "d_out": 30}]
    spectrum = {"a": np.array([10.0, 9.0, 8.0, 7.0, 0.0]), "b": np.array([1.0, 0.5, 0.2, 0.0, 0.0]),
                "c": np.array([40.0, 1.0, 0.0, 0.0, 0.0])}
    ranks = allocate_ranks(spectrum, rows, max_params=40)
    captured = lambda rk: sum(spectrum[s][:r].sum() for s, r in rk.items())  # noqa: E731
    assert ranks == {"a": 4}  # c's first rank (60 parameters) does not fit; a's energy per parameter beats b's
    assert captured(ranks) > captured({"a": 2, "b": 2}) and sum(10 * r for r in ranks.values()) <= 40
    assert allocate_ranks(spectrum, rows, max_params=70) == {"a": 4, "b": 3}  # what is left is filled
    with pytest.raises(PlacementError, match="fits no site"):
        allocate_ranks(spectrum, rows, max_params=9)


def test_an_allocated_plan_trains_exactly_its_stated_parameters(tmp_path):
    from placement.probe import ProbeSettings
    from placement.study.profile import run_profile
    from placement.train import apply_plan
    from tiny import tiny_tokenizer

    model = tiny_model("llama")
    source = type("Source", (), {"name": "tiny", "path": "tiny", "revision": None, "note": None})()
    profile = run_profile(model, tiny_tokenizer(), source, "builtin:arithmetic", batches=2, batch_size=4,
                          max_length=48, settings=ProbeSettings(r=4, alpha=8), bootstrap=0,
                          strategy=Strategy("allocate", max_params=600))
    plan = profile.plan
    assert set(plan.peft["rank_pattern"]) == set(plan.targets) and 0 < plan.trainable_params <= 600
    assert all(plan.peft["alpha_pattern"][t] == 2 * r for t, r in plan.peft["rank_pattern"].items())  # alpha/r kept
    adapted = apply_plan(tiny_model("llama"), plan)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == plan.trainable_params
    for target, rank in plan.peft["rank_pattern"].items():
        layer = adapted.base_model.model.get_submodule(target)
        assert layer.lora_A["default"].weight.shape[0] == rank and layer.scaling["default"] == 2.0
