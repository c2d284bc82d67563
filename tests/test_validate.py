"""Validation: which sites are trained, the statistics on fixed numbers, the first step against its first-order
prediction, and `placement validate` end to end on a tiny model."""
import json

import numpy as np
import pandas as pd
import pytest

from placement import data as data_mod
from placement.errors import PlacementError
from placement.plan import Strategy
from placement.study import stats
from placement.study.validate import BASELINES, choose_sites, energy_scores, first_step, weight_scores
from tiny import tiny_model, tiny_tokenizer


def test_mcnemar_and_wilson_on_fixed_numbers():
    assert stats.mcnemar(13, 2) == pytest.approx(0.0074, abs=5e-5)
    assert stats.mcnemar(0, 0) == 1.0 and stats.mcnemar(5, 5) == pytest.approx(1.0)
    lo, hi = stats.wilson(7, 10)
    assert (lo, hi) == (pytest.approx(0.3968, abs=1e-4), pytest.approx(0.8922, abs=1e-4))


def test_rank_correlations_hits_and_regret():
    gain = np.array([0.1, 0.4, 0.2, 0.8, 0.3])
    same = stats.rank_correlations(gain * 10, gain, seed=1)
    assert same["spearman"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert same["spearman_lo"] == pytest.approx(1.0)
    reverse = stats.rank_correlations(-gain, gain)
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["spearman_hi"] <= -0.9
    score = np.array([5.0, 1.0, 2.0, 3.0, 4.0])  # its top site (index 0) gains 0.1; the best (index 3) is its 3rd
    assert not stats.hit_at_k(score, gain, 2) and stats.hit_at_k(score, gain, 3)
    assert stats.regret(score, gain) == pytest.approx(0.7)
    paired = stats.paired_bootstrap([1.0, 2.0, 3.0, 4.0] * 10, [0.0, 1.0, 2.0, 3.0] * 10)
    assert paired["mean"] == pytest.approx(1.0) and paired["lo"] == pytest.approx(1.0)
    assert paired["p"] == pytest.approx(1 / (stats.N_BOOT + 1))  # no resample on the far side: the floor


@pytest.mark.parametrize("n, ties", [(3, False), (8, True), (30, False), (30, True)])
def test_rank_correlation_intervals_equal_one_scipy_call_per_resample(n, ties):
    """The bootstrap's resamples are scored in one block; the oracle is scipy's spearmanr and kendalltau (tau-b)
    on each resample of the same draws, skipping those where one side is constant."""
    from scipy import stats as st

    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = x + rng.normal(size=n)
    if ties:
        x, y = np.round(x), np.round(2 * y)
    got = stats.rank_correlations(x, y, n_boot=300, seed=4)
    draws, rho, tau = np.random.default_rng(4), [], []
    for _ in range(300):
        pick = draws.integers(0, n, n)
        if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
            rho.append(st.spearmanr(x[pick], y[pick]).statistic)
            tau.append(st.kendalltau(x[pick], y[pick]).statistic)
    for name, values in (("spearman", rho), ("kendall", tau)):
        lo, hi = np.percentile(values, [2.5, 97.5])
        assert got[f"{name}_lo"] == pytest.approx(lo, abs=1e-12) and got[f"{name}_hi"] == pytest.approx(hi, abs=1e-12)
    assert got["kendall"] == pytest.approx(st.kendalltau(x, y).statistic, abs=1e-12)


def _scores(n=30, seed=0):
    rng = np.random.default_rng(seed)
    roles = ["q", "k", "v", "o", "gate", "up", "down"]
    frame = pd.DataFrame({"site": [f"s{i}" for i in range(n)], "role": [roles[i % 7] for i in range(n)],
                          "layer": [i // 7 for i in range(n)], "page": rng.random(n), "fisher": rng.random(n),
                          "snr": rng.random(n)})
    frame["rank"] = frame["page"].rank(ascending=False, method="first").astype(int)
    return frame


def test_site_choice_is_deterministic_and_covers_the_tops_and_every_role():
    frame = _scores()
    chosen = choose_sites(frame, 12, seed=3)
    assert chosen == choose_sites(frame, 12, seed=3) and len(chosen) == len(set(chosen)) == 12
    top_page = list(frame.sort_values("rank")["site"][:4])
    assert set(top_page) <= set(chosen)
    for column in ("fisher", "snr"):
        assert frame.loc[frame[column].idxmax(), "site"] in chosen
    assert set(frame.set_index("site").loc[chosen, "role"]) == set(frame["role"])
    assert choose_sites(frame, None) == list(frame.sort_values("rank")["site"])
    with pytest.raises(PlacementError, match="more than the 30"):
        choose_sites(frame, 31)


def test_first_step_drop_matches_its_first_order_prediction(make_plan):
    model = tiny_model("llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, initializer_range=0.3)
    tokenizer = tiny_tokenizer()
    examples = data_mod.to_examples(data_mod.arithmetic_records(16, 0))
    batch = data_mod.training_batches(tokenizer, examples, steps=1, batch_size=8, max_length=48)[0]
    plan = make_plan(model, Strategy("dominant"))
    kwargs = dict(batch_size=8, max_length=48)
    for optimizer in ("sgd", "adamw"):
        lr = 1e-3 if optimizer == "sgd" else 1e-5
        row = first_step(model, plan, batch, examples[:4], tokenizer, lr, optimizer, 0, kwargs)
        assert row[f"{optimizer}_predicted"] > 0
        assert row[f"{optimizer}_ratio"] == pytest.approx(1.0, abs=0.1), row


@pytest.mark.slow
def test_validate_end_to_end(invoke, model_dir, tmp_path):
    out = tmp_path / "validate"
    result = invoke("validate", "--model", model_dir, "--data", "builtin:arithmetic", "--sites", "8", "--steps", "2",
                    "--batch-size", "4", "--max-length", "48", "--batches", "2", "--out", out, "--quiet", "--json",
                    "--report")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["sites"] == 8 and "ranks sites best" in summary["verdict"]
    rows = pd.read_csv(out / "validation.csv")
    for column in ("site", "layer", "role", "params", "page", "page_sampled", "grad_energy", "fisher", "kappa", "snr",
                   "act_norm", "sgd_drop", "sgd_predicted", "adamw_drop", "adamw_predicted", "lr", "lr_at_edge",
                   "val_loss", "gain", "seconds"):
        assert column in rows.columns and rows[column].notna().all(), column
    assert len(rows) == 8
    swept = pd.read_csv(out / "role_rates.csv")
    assert set(swept["role"]) == set(rows["role"]) and set(swept["lr"]) == {1e-3, 3e-3, 1e-2, 3e-2}
    scores = pd.read_csv(out / "validation_scores.csv")
    assert {"page", "params", "depth", "kappa", "act_norm"} <= set(scores["score"])
    for name in energy_scores() + weight_scores() + list(BASELINES):  # every registered score that has values
        assert name in set(scores["score"]) or name not in rows or rows[name].isna().all(), name
    assert {"spearman", "spearman_lo", "spearman_hi", "kendall", "hit@1", "hit@3", "hit@5", "regret"} <= set(scores)
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"
    assert "Does the score predict" in (out / "report.html").read_text()
    again = invoke("validate", "--model", model_dir, "--data", "builtin:arithmetic", "--scores", out / "profile",
                   "--sites", "3", "--steps", "1", "--batch-size", "4", "--max-length", "48", "--out", tmp_path / "v2",
                   "--quiet", "--no-role-sweep", "--lr", "2e-3")
    assert again.exit_code == 0, again.output
    single = pd.read_csv(tmp_path / "v2" / "validation.csv")
    assert not (tmp_path / "v2" / "profile").exists() and len(single) == 3 and set(single["lr"]) == {2e-3}
    assert not (tmp_path / "v2" / "role_rates.csv").exists()


@pytest.mark.parametrize("args, words", [
    (["--sites", "0"], ["--sites 0"]),
    (["--sites", "999"], ["999", "at most 21"]),
    (["--sites", "many"], ["--sites many"]),
    (["--step-lr", "0"], ["--step-lr"]),
    (["--scores", "."], ["scores.csv"]),
    (["--role-lr-grid", "1e-3,fast"], ["--role-lr-grid '1e-3,fast'"]),
    (["--role-lr-grid", "0,1e-3"], ["--role-lr-grid", "0"]),
    (["--role-lr-grid", "1e-3,-1"], ["--role-lr-grid", "-1"]),
    (["--role-lr-grid", "1e-3,inf"], ["--role-lr-grid", "inf"]),
    (["--role-lr-grid", ","], ["--role-lr-grid is empty"]),
    (["--role-sweep-steps", "0"], ["--role-sweep-steps 0"]),
])
def test_validate_bad_input(invoke, assert_one_line_error, model_dir, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    result = invoke("validate", "--model", model_dir, "--data", "builtin:arithmetic", "--steps", "1",
                    "--batch-size", "4", "--max-length", "48", "--batches", "1", "--out", "o", "--quiet", *args)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "o").exists()
