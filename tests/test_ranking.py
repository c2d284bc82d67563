"""Ranking and concentration on hand-made scores with known answers."""
import math

import numpy as np
import pandas as pd
import pytest

from placement.plan.ranking import concentration, heatmap_tables, margins, rank, share_grid
from placement.model.sites import ROLES

LLAMA_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def frame(values, layers=None, roles=None, column="page"):
    n = len(values)
    layers = layers if layers is not None else [i // len(LLAMA_ROLES) for i in range(n)]
    roles = roles if roles is not None else [LLAMA_ROLES[i % len(LLAMA_ROLES)] for i in range(n)]
    return pd.DataFrame({
        "site": [f"site{i}" for i in range(n)], "layer": layers, "role": roles, column: values,
    })


def test_rank_shares_and_order():
    scores = frame([1.0, 5.0, 3.0, 0.5, 2.0])
    ranked = rank(scores)
    assert ranked["share"].sum() == pytest.approx(1.0)
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5]
    assert ranked["site"].tolist() == ["site1", "site2", "site4", "site0", "site3"]
    assert ranked["share"].tolist() == pytest.approx([5 / 11.5, 3 / 11.5, 2 / 11.5, 1 / 11.5, 0.5 / 11.5])
    assert ranked["score"].tolist() == [5.0, 3.0, 2.0, 1.0, 0.5]
    assert (np.diff(ranked["share"]) <= 0).all()
    # The input is not modified.
    assert "rank" not in scores.columns


def test_rank_ties_keep_model_order():
    ranked = rank(frame([2.0, 7.0, 2.0, 7.0, 2.0, 1.0]))
    assert ranked["site"].tolist() == ["site1", "site3", "site0", "site2", "site4", "site5"]
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5, 6]


def test_rank_nan_and_negative_count_as_zero():
    ranked = rank(frame([np.nan, 4.0, -3.0, 1.0]))
    by_site = ranked.set_index("site")
    assert by_site.loc["site0", "share"] == 0.0 and by_site.loc["site2", "share"] == 0.0
    assert by_site.loc["site1", "share"] == pytest.approx(0.8)
    assert ranked["share"].sum() == pytest.approx(1.0)
    assert ranked["rank"].tolist() == [1, 2, 3, 4]
    assert ranked["site"].tolist()[:2] == ["site1", "site3"]
    assert ranked["site"].tolist()[2:] == ["site0", "site2"]  # zero-score ties in model order


def test_rank_all_zero_gives_zero_shares():
    ranked = rank(frame([0.0, 0.0, 0.0]))
    assert ranked["share"].tolist() == [0.0, 0.0, 0.0]
    assert ranked["site"].tolist() == ["site0", "site1", "site2"]


def test_rank_other_score_column():
    scores = frame([1.0, 2.0, 3.0])
    scores["fisher"] = [9.0, 1.0, 0.0]
    ranked = rank(scores, "fisher")
    assert ranked["site"].tolist() == ["site0", "site1", "site2"]
    assert ranked["share"].tolist() == pytest.approx([0.9, 0.1, 0.0])


def test_rank_refuses_a_missing_score():
    with pytest.raises(ValueError, match="fisher"):
        rank(frame([1.0, 2.0]), "fisher")
    with pytest.raises(ValueError, match="page"):
        rank(frame([np.nan, np.nan]))


@pytest.mark.parametrize("n", [1, 2, 7, 14])
def test_concentration_uniform(n):
    conc = concentration(rank(frame([3.0] * n)))
    assert conc["sites"] == n
    assert conc["top1_share"] == pytest.approx(1 / n)
    assert conc["effective_sites"] == pytest.approx(n)
    assert conc["gini"] == pytest.approx(0.0, abs=1e-12)
    if n > 1:
        assert conc["top2_share"] == pytest.approx(1 / n)
        assert conc["top1_top2_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("n", [2, 7, 14, 50])
def test_concentration_one_hot(n):
    values = [0.0] * n
    values[n // 2] = 4.0
    conc = concentration(rank(frame(values)))
    assert conc["top1_share"] == pytest.approx(1.0)
    assert conc["top2_share"] == 0.0
    assert conc["top1_top2_ratio"] == math.inf
    assert conc["effective_sites"] == pytest.approx(1.0)
    assert conc["gini"] == pytest.approx((n - 1) / n)
    if n >= 14:
        assert conc["gini"] > 0.9


def test_concentration_known_values():
    conc = concentration(rank(frame([1.0, 2.0, 1.0])))
    assert conc["top1_share"] == pytest.approx(0.5)
    assert conc["top2_share"] == pytest.approx(0.25)
    assert conc["top1_top2_ratio"] == pytest.approx(2.0)
    assert conc["effective_sites"] == pytest.approx(2 ** 1.5)  # exp(0.5 ln 2 + 0.5 ln 4)
    assert conc["gini"] == pytest.approx(1 / 6)
    # More concentrated scores: fewer effective sites, higher Gini.
    sharper = concentration(rank(frame([1.0, 8.0, 1.0])))
    assert sharper["effective_sites"] < conc["effective_sites"]
    assert sharper["gini"] > conc["gini"]


def test_concentration_single_site():
    conc = concentration(rank(frame([2.0])))
    assert conc["top1_share"] == 1.0 and conc["effective_sites"] == pytest.approx(1.0)
    assert conc["top1_top2_ratio"] == math.inf and conc["gini"] == 0.0


def test_concentration_does_not_depend_on_row_order():
    ranked = rank(frame([1.0, 4.0, 2.0, 3.0]))
    shuffled = ranked.sample(frac=1.0, random_state=3)
    assert concentration(shuffled) == concentration(ranked)


def test_margins():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 10.0]
    ranked = rank(frame(values))
    by_role, by_layer = margins(ranked)
    total = sum(values)
    assert by_role.sum() == pytest.approx(1.0) and by_layer.sum() == pytest.approx(1.0)
    assert by_role["q"] == pytest.approx(8 / total)
    assert by_role["down"] == pytest.approx(17 / total)
    assert by_role.index[0] == "down"
    assert (np.diff(by_role.to_numpy()) <= 0).all()
    assert by_layer.index.tolist() == [0, 1]
    assert by_layer.tolist() == pytest.approx([28 / total, 37 / total])


def test_share_grid():
    roles = ["down", "q", "custom", "k", "q"]
    ranked = rank(frame([1.0, 2.0, 3.0, 4.0, 10.0], layers=[0, 0, 1, 1, 1], roles=roles))
    grid = share_grid(ranked, ROLES)
    assert grid.index.tolist() == ["q", "k", "down", "custom"]  # canonical roles first, unknown ones after
    assert grid.columns.tolist() == [0, 1]
    assert grid.loc["q", 0] == pytest.approx(2 / 20)
    assert grid.loc["q", 1] == pytest.approx(10 / 20)
    assert grid.loc["down", 0] == pytest.approx(1 / 20)
    assert np.isnan(grid.loc["k", 0]) and np.isnan(grid.loc["custom", 0])
    assert np.nansum(grid.to_numpy()) == pytest.approx(1.0)


def test_heatmap_tables_are_what_the_heatmap_draws(tmp_path):
    from placement.report.figures import heatmap

    ranked = rank(frame([1.0, 2.0, 3.0, 4.0, 10.0], layers=[0, 0, 1, 1, 1], roles=["down", "q", "up", "k", "q"]))
    tables = heatmap_tables(ranked, top=2)
    assert tables["grid"].equals(share_grid(ranked))  # the canonical roles by default
    assert tables["by_role"].equals(margins(ranked)[0]) and tables["by_layer"].equals(margins(ranked)[1])
    assert tables["top"]["rank"].tolist() == [1, 2] and tables["top"]["share"].iloc[0] == pytest.approx(0.5)
    heatmap(**tables, path=tmp_path / "heatmap.png", log=True)
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_bootstrap_intervals_and_top_probability():
    from placement.plan.ranking import bootstrap

    rng = np.random.default_rng(0)
    # site a dominates every batch; b and c trade places from batch to batch; d is always last
    scores = np.stack([[10.0, 2 + rng.normal(), 2 + rng.normal(), 0.1] for _ in range(8)])
    out = bootstrap(scores, list("abcd"), n=300, seed=1).set_index("site")
    assert out.loc["a", "p_top"] == 1.0 and (out.loc["a", "rank_lo"], out.loc["a", "rank_hi"]) == (1, 1)
    assert (out.loc["d", "rank_lo"], out.loc["d", "rank_hi"]) == (4, 4)
    assert out.loc["b", "rank_lo"] == 2 and out.loc["b", "rank_hi"] == 3
    assert out["p_top"].sum() == pytest.approx(1.0)


def test_convergence_finds_when_the_top_site_settles():
    from placement.plan.ranking import convergence, stability, top_stable_after

    # batch 1 favours b; from batch 2 on the running mean favours a for good
    scores = np.array([[1.0, 5.0, 0.0], [9.0, 1.0, 0.0], [9.0, 1.0, 0.0], [9.0, 1.0, 0.0]])
    curve = convergence(scores, list("abc"))
    assert list(curve["top_site"]) == ["b", "a", "a", "a"]
    assert top_stable_after(curve) == 2
    assert curve["spearman"].iloc[-1] == 1.0
    _, _, block = stability(scores, list("abc"), n=50)
    assert block["top_site"] == "a" and block["top_stable_after_batches"] == 2 and 0 < block["p_top"] <= 1
