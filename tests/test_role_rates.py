"""The role sweep of `validate`: which data it sees, which rate each site trains at, and the single rate without it."""
import types
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from placement import data as data_mod
from placement.model.sites import find_sites
from placement.plan import Strategy
from placement.study import role_rates as rr
from placement.study import validate as vd
from placement.train.trainer import TrainSettings
from tiny import tiny_model, tiny_tokenizer

GRID = (1e-4, 3e-3, 1e-1)


def _ranked(model) -> pd.DataFrame:
    sites = find_sites(model)
    page = np.random.default_rng(1).random(len(sites))
    frame = pd.DataFrame({"site": [s.name for s in sites], "layer": [s.layer for s in sites],
                          "role": [s.role for s in sites], "d_in": [s.d_in for s in sites],
                          "d_out": [s.d_out for s in sites], "page": page})
    frame["rank"] = frame["page"].rank(ascending=False, method="first").astype(int)
    return frame


def _run(settings, spy: dict, make_plan):
    """run_validate on a tiny model, recording what the sweep trains and scores on, and each site's training rate."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    examples = data_mod.to_examples(data_mod.arithmetic_records(120, 0))
    train_set, val_set, _ = data_mod.split_examples(examples, test=0, validation=12, seed=0)
    spy.update(train_set=train_set, val_set=val_set, sweep_fit=[], sweep_scored=[], trained={})
    sweep_train, site_train, sweep_ev = rr.train, vd.train, rr.ev

    def sweep_train_spy(model, tokenizer, plan, examples, settings):
        spy["sweep_fit"].append(list(examples))
        return sweep_train(model, tokenizer, plan, examples, settings)

    def site_train_spy(model, tokenizer, plan, examples, settings):
        spy["trained"][plan.targets[0]] = (settings.lr, len(examples))
        return site_train(model, tokenizer, plan, examples, settings)

    def scored(model, tokenizer, examples, **kwargs):
        spy["sweep_scored"].append(list(examples))
        return sweep_ev.mean_loss(model, tokenizer, examples, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rr, "train", sweep_train_spy)
        patch.setattr(vd, "train", site_train_spy)
        patch.setattr(rr, "ev", types.SimpleNamespace(mean_loss=scored))
        base = make_plan(model, Strategy("dominant"))
        return vd.run_validate(model, tokenizer, _ranked(model), base, (train_set, val_set), settings)


SETTINGS = vd.ValidateSettings(sites=5, train=TrainSettings(steps=3, batch_size=4, max_length=48),
                               role_lr_grid=GRID, role_sweep_steps=2, eval_batch_size=8)


@pytest.fixture(scope="module")
def swept(make_plan):
    spy = {}
    return _run(SETTINGS, spy, make_plan), spy


def _prompts(examples) -> set:
    return {repr(e) for e in examples}


@pytest.mark.slow
def test_the_sweep_scores_on_a_training_slice_disjoint_from_the_validation_split(swept):
    result, spy = swept
    scored = _prompts(sum(spy["sweep_scored"], []))
    assert scored and scored <= _prompts(spy["train_set"])
    assert not scored & _prompts(spy["val_set"])
    fit = _prompts(sum(spy["sweep_fit"], []))
    assert fit and not fit & scored and not fit & _prompts(spy["val_set"])
    assert len(spy["sweep_fit"]) == len(GRID) * len(result.rates.best)  # every rate of every role, nothing more


@pytest.mark.slow
def test_each_site_trains_at_its_roles_best_rate(swept):
    result, spy = swept
    history, best = result.rates.history, result.rates.best
    roles = set(result.sites["role"])
    assert set(best) == roles and len(result.sites) == 5
    for role, rows in history.groupby("role"):
        assert best[role] == rows.loc[rows["sweep_loss"].idxmin(), "lr"]
        assert result.rates.at_edge[role] == (best[role] in (GRID[0], GRID[-1]))
        top = result.sites[result.sites["role"] == role].sort_values("rank")["site"].iloc[0]
        assert set(rows["site"]) == {top} and sorted(rows["lr"]) == list(GRID)
    for row in result.sites.itertuples():
        assert row.lr == best[row.role] and row.lr_at_edge == result.rates.at_edge[row.role]
        assert spy["trained"][row.site] == (best[row.role], len(spy["train_set"]))  # the whole training split


@pytest.mark.slow
def test_no_role_sweep_trains_every_site_at_one_rate(swept, make_plan, tmp_path):
    one_rate = replace(SETTINGS, role_sweep=False, train=replace(SETTINGS.train, lr=2e-3))
    spy = {}
    result = _run(one_rate, spy, make_plan)
    assert result.rates is None and not spy["sweep_fit"]
    assert set(result.sites["lr"]) == {2e-3} and {lr for lr, _ in spy["trained"].values()} == {2e-3}
    single_grid = _run(replace(SETTINGS, role_lr_grid=(2e-3,)), {}, make_plan)
    assert list(single_grid.sites["gain"]) == pytest.approx(list(result.sites["gain"]), abs=1e-6)
    assert not single_grid.rates.at_edge[single_grid.sites["role"].iloc[0]]  # one rate has no edge to sit on
    vd.write_validation(result, tmp_path / "one")
    assert "one rate" in (tmp_path / "one" / "validation.md").read_text()
    assert not (tmp_path / "one" / "role_rates.csv").exists()
    vd.write_validation(swept[0], tmp_path / "swept")
    assert len(pd.read_csv(tmp_path / "swept" / "role_rates.csv")) == len(GRID) * len(swept[0].rates.best)
    assert {"lr", "lr_at_edge"} <= set(pd.read_csv(tmp_path / "swept" / "validation.csv"))


def test_the_sweep_slice_and_steps():
    train_set = list(range(100))
    fit, held = rr.sweep_split(train_set)
    assert held == train_set[-10:] and fit == train_set[:-10]
    assert rr.sweep_split(list(range(20)))[1] == list(range(12, 20))  # at least eight held out
    assert rr.sweep_split(list(range(4000)))[1] == list(range(3936, 4000))  # at most 64
    assert rr.sweep_steps(60, None) == 20 and rr.sweep_steps(2, None) == 1 and rr.sweep_steps(60, 5) == 5
    assert rr.parse_grid("3e-2, 1e-3,1e-3") == (1e-3, 3e-2)
