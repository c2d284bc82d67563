"""The statistics the studies report: rank correlations with bootstrap intervals, whether a score finds the best
site, and the intervals and paired tests that tell two placements apart. scipy does the distributions."""
from __future__ import annotations

import numpy as np
from scipy import stats as st

N_BOOT = 2000  # resamples of every bootstrap of a comparison


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # a constant ranks nothing
    return float(st.spearmanr(x, y).statistic)


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(st.kendalltau(x, y).statistic)  # tau-b: ties take average ranks


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair: Pearson's r of the rows' average ranks (ties as in spearmanr)."""
    rx, ry = st.rankdata(x, axis=1), st.rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    return (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair, from the signs of every pair of positions (ties count as in kendalltau);
    rows a block at a time, so the pair-sign arrays stay a few MB."""
    n = x.shape[1]
    step = max(1, 2_000_000 // max(1, n * n))
    taus = []
    for i in range(0, len(x), step):
        sx = np.sign(x[i:i + step, :, None] - x[i:i + step, None, :])
        sy = np.sign(y[i:i + step, :, None] - y[i:i + step, None, :])
        concordance = (sx * sy).sum(axis=(1, 2)) / 2
        pairs_x, pairs_y = np.abs(sx).sum(axis=(1, 2)) / 2, np.abs(sy).sum(axis=(1, 2)) / 2
        taus.append(concordance / np.sqrt(pairs_x * pairs_y))
    return np.concatenate(taus) if taus else np.zeros(0)


def rank_correlations(score, gain, n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman and Kendall correlation of `score` with `gain` over the trained sites, each with the central 95% of
    a bootstrap over sites (resampled with replacement; resamples where one side is constant are skipped). The
    resamples are drawn in one block and scored row-wise (the same draws and values as one scipy call each)."""
    x, y = np.asarray(score, dtype=float), np.asarray(gain, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"sites": int(len(x)), "spearman": _spearman(x, y), "kendall": _kendall(x, y)}
    boot = {"spearman": np.zeros(0), "kendall": np.zeros(0)}
    if len(x) > 2:
        picks = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
        xs, ys = x[picks], y[picks]
        varied = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
        if varied.any():
            xs, ys = xs[varied], ys[varied]
            boot = {"spearman": _spearman_rows(xs, ys), "kendall": _kendall_rows(xs, ys)}
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


def _floored_p(shares_below: float, shares_above: float, n_boot: int) -> float:
    """Two-sided bootstrap p: twice the smaller tail share on either side of 0, at most 1, and never below
    1/(B + 1), since B resamples cannot show a p smaller than that."""
    return float(min(1.0, max(2 * min(shares_below, shares_above), 1 / (n_boot + 1))))


def paired_bootstrap(a, b, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean of a - b over paired items (questions), its 95% bootstrap interval, and a two-sided bootstrap p-value
    (twice the share of resampled means on the far side of zero, floored at 1/(B + 1))."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan")}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi),
            "p": _floored_p((means <= 0).mean(), (means >= 0).mean(), n_boot)}


def _crossed_chunks(seeds: int, questions: int, n_boot: int, seed: int, chunk: int = 250):
    """The resamples of a crossed design, a chunk at a time (B x questions indices at once could fill the memory):
    per resample, seed indices and question indices drawn with replacement, one draw serving both arms, which is
    what pairs them."""
    seed_rng, question_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        yield seed_rng.integers(0, seeds, (size, seeds)), question_rng.integers(0, questions, (size, questions))


def crossed_draws(seeds: int, questions: int, n_boot: int = N_BOOT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every resample's seed indices (B x seeds) and question indices (B x questions), as the bootstrap draws them."""
    chunks = list(_crossed_chunks(seeds, questions, n_boot, seed))
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def crossed_bootstrap(a, b, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Difference of two arms' means over a seeds x questions grid (row k of both arms: training seed k; column j:
    test question j), with the 95% interval and two-sided p of a crossed bootstrap: each resample draws seed and
    question indices with replacement, the same for both arms, and takes the difference of the arms' means over the
    resampled grid. Several seeds answer the same questions, so both the seed-to-seed spread of training and the
    question sample enter the interval. Questions either arm left unscored are dropped."""
    diff = np.atleast_2d(np.asarray(a, dtype=float)) - np.atleast_2d(np.asarray(b, dtype=float))
    diff = diff[:, np.isfinite(diff).all(axis=0)]
    n_seeds, n_questions = diff.shape
    if diff.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan")}
    means = []
    for seed_idx, question_idx in _crossed_chunks(n_seeds, n_questions, n_boot, seed):
        # the mean over the resampled grid, from how often each seed and each question was drawn
        seed_counts = np.stack([np.bincount(row, minlength=n_seeds) for row in seed_idx])
        question_counts = np.stack([np.bincount(row, minlength=n_questions) for row in question_idx])
        means.append(((seed_counts @ diff) * question_counts).sum(axis=1) / (n_seeds * n_questions))
    means = np.concatenate(means)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi),
            "p": _floored_p((means <= 0).mean(), (means >= 0).mean(), n_boot)}


def seed_t_test(a, b) -> float:
    """Seed-level paired t-test: one mean per seed and arm, seed k of one arm paired with seed k of the other."""
    if len(a) < 2:
        return float("nan")
    return float(st.ttest_rel(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).pvalue)


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of a few values (one per seed)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = st.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


# -- two placements over seeds and questions ---------------------------------------------------------------------
SEED_T_MAX = 3  # at this many seeds or fewer the seed-level t-test is the primary test, the bootstrap the second
TESTS = {  # the tests behind a comparison's p-values, by the short name its table shows
    "McNemar": "McNemar's exact test on the test questions (one seed)",
    "q-boot": f"paired bootstrap over the test questions ({N_BOOT} resamples, p floored at 1/{N_BOOT + 1})",
    "t": "seed-level paired t-test (one mean per seed; seed k of one arm against seed k of the other)",
    "boot": f"crossed bootstrap over seeds and questions ({N_BOOT} resamples, the same seed and question draws for "
            f"both arms, p floored at 1/{N_BOOT + 1})",
}
INTERVALS = {  # how an arm's 95% interval was made, by the short name the table records
    "Wilson": "Wilson interval over the test questions (one seed)",
    "q-boot": "bootstrap over the test questions (one seed)",
    "none": "no interval: two seeds give no usable interval over seeds",
    "t": "t interval over the seeds' means",
    "boot": "crossed bootstrap over seeds and questions",
}


def pair_tests(mine, theirs, binary: bool, seed: int = 0) -> dict:
    """One arm against another on seeds x questions grids (row k: training seed k; a 0/1 grid when `binary`):
    the primary p and its test, the second p and its test, and the difference of means with its interval.
    One seed: McNemar (0/1) or a bootstrap over questions. Two or three seeds: the seed-level paired t-test first,
    the crossed bootstrap second; the difference's interval is a t interval over the seeds' differences at three
    and none at two. Four or more: the crossed bootstrap first (and its interval), the t-test second."""
    n = min(len(mine), len(theirs))
    mine, theirs = np.asarray(mine[:n], dtype=float), np.asarray(theirs[:n], dtype=float)
    if n == 1:
        boot = paired_bootstrap(mine[0], theirs[0], seed=seed)
        out = {"diff": boot["mean"], "diff_lo": boot["lo"], "diff_hi": boot["hi"], "p2": float("nan"), "test2": None}
        if not binary:
            return out | {"p": boot["p"], "test": "q-boot"}
        right, other = mine[0] > 0.5, theirs[0] > 0.5
        return out | {"p": mcnemar(int((right & ~other).sum()), int((~right & other).sum())), "test": "McNemar",
                      "p2": boot["p"], "test2": "q-boot"}
    boot = crossed_bootstrap(mine, theirs, seed=seed)
    seed_diffs = np.nanmean(mine, axis=1) - np.nanmean(theirs, axis=1)
    t_p = seed_t_test(np.nanmean(mine, axis=1), np.nanmean(theirs, axis=1))
    if n <= SEED_T_MAX:
        lo, hi = t_interval(seed_diffs) if n > 2 else (float("nan"), float("nan"))
        return {"diff": boot["mean"], "diff_lo": lo, "diff_hi": hi, "p": t_p, "test": "t", "p2": boot["p"],
                "test2": "boot"}
    return {"diff": boot["mean"], "diff_lo": boot["lo"], "diff_hi": boot["hi"], "p": boot["p"], "test": "boot",
            "p2": t_p, "test2": "t"}


def arm_interval(grid, per_seed, binary: bool, top: float = np.inf, seed: int = 0) -> tuple[float, float, str]:
    """95% interval of one arm's measure (exact match when `binary`, else loss) and how it was made. `grid` holds
    the per-question values of every seed, `per_seed` the measure each seed reports (for loss, token-weighted: the
    per-question interval is moved to centre on it). An interval reaching past what the measure can take (below 0%
    exact match) is clipped to [0, top]."""
    grid = np.atleast_2d(np.asarray(grid, dtype=float))
    centre = float(np.mean(per_seed))
    if len(grid) == 1:
        if binary:
            right = grid[0][np.isfinite(grid[0])] > 0.5
            return (*wilson(int(right.sum()), len(right)), "Wilson")
        boot = paired_bootstrap(grid[0], np.zeros(grid.shape[1]), seed=seed)
        lo, hi, method = boot["lo"] + centre - boot["mean"], boot["hi"] + centre - boot["mean"], "q-boot"
    elif len(grid) == 2:
        return float("nan"), float("nan"), "none"
    elif len(grid) <= SEED_T_MAX:
        (lo, hi), method = t_interval(per_seed), "t"
    else:
        boot = crossed_bootstrap(grid, np.zeros_like(grid), seed=seed)
        lo, hi, method = boot["lo"] + centre - boot["mean"], boot["hi"] + centre - boot["mean"], "boot"
    return max(lo, 0.0), min(hi, top), method
