"""The statistics the studies report: rank correlations with bootstrap intervals, whether a score finds the best
site, and the intervals and paired tests that tell two placements apart. scipy does the distributions."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as st


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # a constant ranks nothing
    return float(st.spearmanr(x, y).statistic)


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(st.kendalltau(x, y).statistic)  # tau-b: ties take average ranks


def rank_correlations(score, gain, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman and Kendall correlation of `score` with `gain` over the trained sites, each with the central 95% of
    a bootstrap over sites (resampled with replacement; resamples where one side is constant are skipped)."""
    x, y = np.asarray(score, dtype=float), np.asarray(gain, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"sites": int(len(x)), "spearman": _spearman(x, y), "kendall": _kendall(x, y)}
    rng = np.random.default_rng(seed)
    boot = {"spearman": [], "kendall": []}
    for _ in range(n_boot if len(x) > 2 else 0):
        pick = rng.integers(0, len(x), len(x))
        rho, tau = _spearman(x[pick], y[pick]), _kendall(x[pick], y[pick])
        if math.isfinite(rho):
            boot["spearman"].append(rho)
            boot["kendall"].append(tau)
    for name, values in boot.items():
        lo, hi = np.percentile(values, [2.5, 97.5]) if len(values) >= 10 else (float("nan"), float("nan"))
        out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


def hit_at_k(score, gain, k: int) -> bool:
    """Is the site of the largest realised gain among the score's top k (ties in the score broken by order)?"""
    x, y = np.asarray(score, dtype=float), np.asarray(gain, dtype=float)
    top = np.argsort(-np.nan_to_num(x, nan=-np.inf), kind="stable")[:k]
    return bool(int(np.nanargmax(y)) in set(top.tolist()))


def regret(score, gain) -> float:
    """Gain of the realised best site minus the gain of the score's top site: what following the score costs."""
    x, y = np.asarray(score, dtype=float), np.asarray(gain, dtype=float)
    return float(np.nanmax(y) - y[int(np.nanargmax(np.nan_to_num(x, nan=-np.inf)))])


def wilson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (e.g. exact match over test questions)."""
    if n == 0:
        return float("nan"), float("nan")
    ci = st.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(b: int, c: int) -> float:
    """McNemar's exact test on paired correctness: b questions only the first arm got right, c only the second;
    the two-sided binomial p-value of b among the b + c discordant pairs (1.0 when there are none)."""
    if b + c == 0:
        return 1.0
    return float(st.binomtest(int(b), int(b + c), 0.5).pvalue)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over paired items (questions), its 95% bootstrap interval, and a two-sided bootstrap p-value
    (twice the share of resampled means on the far side of zero)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan")}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi), "p": float(min(1.0, p))}
