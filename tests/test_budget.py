"""Budgets and the selector rules, on synthetic site rows."""
import pytest

from placement.errors import PlacementError
from placement.plan.budget import (all_linear_params, budget_params, get_selector, parse_budgets, pick, selectors)


def _rows():
    """Two layers of q (8 -> 8), down (24 -> 8), up (8 -> 24): rank-1 costs 16, 32, 32."""
    rows = []
    for layer in range(2):
        rows += [
            dict(site=f"l{layer}.q", layer=layer, role="q", d_in=8, d_out=8),
            dict(site=f"l{layer}.up", layer=layer, role="up", d_in=8, d_out=24),
            dict(site=f"l{layer}.down", layer=layer, role="down", d_in=24, d_out=8),
        ]
    return rows


def test_budget_is_a_percent_of_all_linear_at_the_same_rank():
    rows = _rows()
    assert all_linear_params(rows, 2) == 2 * 2 * (16 + 32 + 32)
    assert parse_budgets("1%, 2.5%,5") == [1.0, 2.5, 5.0]
    assert budget_params(50, rows, 2) == 160
    with pytest.raises(PlacementError, match="below the smallest"):
        budget_params(1, rows, 2)  # 3 parameters, the smallest adapter has 32
    for bad in ("0%", "101%", "x%"):
        with pytest.raises(PlacementError, match="budget"):
            parse_budgets(bad)


def test_energy_rule_is_greedy_per_parameter_and_skips_what_does_not_fit():
    rows = _rows()
    # per parameter at r=1: l0.q 10/16, l1.up 30/32, l0.down 28/32, others small
    scores = {"l0.q": 10, "l0.up": 1, "l0.down": 28, "l1.q": 1, "l1.up": 30, "l1.down": 2}
    chosen = pick("page", rows, scores, max_params=80, r=1)
    assert chosen.targets == ["l0.q", "l0.down", "l1.up"]  # model order; 32 + 32 + 16 = 80
    chosen = pick("page", rows, scores, max_params=70, r=1)
    assert chosen.targets == ["l0.down", "l1.up"]  # after the two best, 64 + 16 > 70: every q is skipped
    assert chosen.params(rows) == 64


def test_energy_rule_ties_go_to_model_order():
    rows = _rows()
    scores = {row["site"]: 1.0 * (row["d_in"] + row["d_out"]) for row in rows}  # equal per parameter
    assert pick("lookahead", rows, scores, max_params=32, r=1).targets == ["l0.q", "l1.q"]  # l0.up skipped
    assert pick("lookahead", rows, scores, max_params=48, r=1).targets == ["l0.q", "l0.up"]


def test_order_rules_follow_the_score_direction():
    rows = _rows()
    kappa = {"l0.q": 5, "l0.up": 1, "l0.down": 3, "l1.q": 2, "l1.up": 9, "l1.down": 4}
    assert pick("kappa", rows, kappa, max_params=48, r=1).targets == ["l0.up", "l1.q"]  # lowest first
    snr = {"l0.q": 1, "l0.up": 0.5, "l0.down": 7, "l1.q": 9, "l1.up": 3, "l1.down": float("nan")}
    assert pick("snr", rows, snr, max_params=48, r=1).targets == ["l0.down", "l1.q"]  # highest first
    params = {row["site"]: row["d_in"] + row["d_out"] for row in rows}
    # largest first, ties in model order: l0.up, l0.down fill 64; no q fits afterwards at 70
    assert pick("params", rows, params, max_params=70, r=1).targets == ["l0.up", "l0.down"]


def test_snr_takes_the_best_of_each_role_before_any_role_twice():
    rows = _rows()
    snr = {"l0.q": 8, "l1.q": 9, "l0.up": 3, "l1.up": 0.5, "l0.down": 1, "l1.down": float("nan")}
    # highest first would take both q sites (9, 8) and then l0.up; Spectrum's round takes l1.q, l0.up and l0.down
    assert pick("snr", rows, snr, max_params=80, r=1).targets == ["l0.up", "l0.down", "l1.q"]
    assert pick("snr", rows, snr, max_params=96, r=1).targets == ["l0.q", "l0.up", "l0.down", "l1.q"]  # round 2


def test_role_rules_take_the_largest_uniform_rank_that_fits_or_skip():
    rows = _rows()
    down = pick("down", rows, None, max_params=200, r=8)
    assert down.ranks == {"l0.down": 3, "l1.down": 3}  # 64 per rank
    ffn = pick("ffn", rows, None, max_params=200, r=8)
    assert ffn.ranks == {"l0.up": 1, "l0.down": 1, "l1.up": 1, "l1.down": 1}  # 128 per rank
    skipped = pick("ffn", rows, None, max_params=100, r=8)
    assert skipped.ranks == {} and "over the budget" in skipped.skipped


def test_page_opt_takes_allocates_ranks():
    import numpy as np

    rows = _rows()
    spectrum = {"l0.q": np.array([10.0, 9.0, 0.1]), "l1.up": np.array([1.0, 0.5])}
    chosen = pick("page_opt", rows, None, max_params=48, r=1, spectrum=spectrum)
    assert chosen.ranks == {"l0.q": 2, "l1.up": 1} or chosen.ranks == {"l0.q": 3}
    assert chosen.params(rows) <= 48
    with pytest.raises(PlacementError, match="spectrum"):
        pick("page_opt", rows, None, max_params=48, r=1)


def test_unknown_selector_is_one_clear_error():
    with pytest.raises(PlacementError, match="unknown selector nope"):
        get_selector("nope")
    assert {"page", "lookahead", "lora_drop", "kappa", "snr", "params", "down", "ffn", "page_opt"} <= set(selectors())
