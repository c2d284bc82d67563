"""Order sites by score, and say how concentrated the score is on the top sites."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..model.sites import ROLES


def rank(scores: pd.DataFrame, score: str = "page") -> pd.DataFrame:
    """Add `score`, `share` (of the total) and `rank` (1 = top; ties keep model order) and sort by rank."""
    if score not in scores.columns or scores[score].isna().all():
        raise ValueError(f"score {score} was not computed by this probe")
    out = scores.copy()
    values = out[score].fillna(0.0).clip(lower=0.0)
    total = values.sum()
    out["score"] = values
    out["share"] = values / total if total > 0 else 0.0
    order = np.argsort(-values.to_numpy(), kind="stable")
    ranks = np.empty(len(out), dtype=int)
    ranks[order] = np.arange(1, len(out) + 1)
    out["rank"] = ranks
    return out.sort_values("rank").reset_index(drop=True)


def margins(ranked: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Summed shares per role (largest first) and per layer: the heatmap's margins."""
    return ranked.groupby("role")["share"].sum().sort_values(ascending=False), ranked.groupby("layer")["share"].sum()


def share_grid(ranked: pd.DataFrame, roles: tuple[str, ...] = ROLES) -> pd.DataFrame:
    """Share per (role, layer): rows are the roles present, in canonical order; columns are layers."""
    grid = ranked.pivot_table(index="role", columns="layer", values="share", aggfunc="sum")
    present = [r for r in roles if r in grid.index] + [r for r in grid.index if r not in roles]
    return grid.reindex(present)


def heatmap_tables(ranked: pd.DataFrame, top: int = 5) -> dict:
    """What `report.figures.heatmap` draws: the share grid, its role and layer margins, and the top sites."""
    by_role, by_layer = margins(ranked)
    return dict(grid=share_grid(ranked), by_role=by_role, by_layer=by_layer, top=ranked.sort_values("rank").head(top))


def concentration(ranked: pd.DataFrame) -> dict:
    """Top-1 share, top-1/top-2 margin, effective number of sites exp(H(shares)), and the Gini coefficient."""
    shares = ranked.sort_values("rank")["share"].to_numpy(dtype=float)
    positive = shares[shares > 0]
    entropy = float(-(positive * np.log(positive)).sum()) if len(positive) else 0.0
    second = shares[1] if len(shares) > 1 else 0.0
    ascending = np.sort(shares)
    n = len(ascending)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ ascending / (n * ascending.sum())) if ascending.sum() > 0 else 0.0
    return {
        "top1_share": float(shares[0]),
        "top2_share": float(second),
        "top1_top2_ratio": float(shares[0] / second) if second > 0 else math.inf,
        "effective_sites": math.exp(entropy),
        "gini": gini,
        "sites": n,
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1 = largest, along the last axis; ties keep site order, as `rank` does."""
    order = np.argsort(-values, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, values.shape[-1] + 1), axis=-1)
    return ranks


def bootstrap(batch_scores: np.ndarray, sites: list[str], n: int = 200, seed: int = 0,
              level: float = 0.95) -> pd.DataFrame:
    """Resample the calibration batches with replacement `n` times and re-rank: each site's rank interval
    (`rank_lo`, `rank_hi`, the central `level` of its bootstrap ranks) and `p_top`, how often it comes out on top.

    `batch_scores` is (batches, sites), the per-batch score whose mean over batches is the site's score.
    """
    batches = batch_scores.shape[0]
    picks = np.random.default_rng(seed).integers(0, batches, size=(n, batches))
    ranks = _ranks(batch_scores[picks].mean(axis=1))  # (n, sites)
    tail = 100 * (1 - level) / 2
    return pd.DataFrame({
        "site": sites,
        "rank_lo": np.percentile(ranks, tail, axis=0, method="lower").astype(int),
        "rank_hi": np.percentile(ranks, 100 - tail, axis=0, method="higher").astype(int),
        "p_top": (ranks == 1).mean(axis=0),
    })


def convergence(batch_scores: np.ndarray, sites: list[str]) -> pd.DataFrame:
    """The ranking after the first b batches, for b = 1 .. all: its top site, that site's share, and the Spearman
    correlation of the scores with the final ones. Tells how many calibration batches a model and task need."""
    from scipy.stats import spearmanr

    final = batch_scores.mean(axis=0)
    rows = []
    for b in range(1, batch_scores.shape[0] + 1):
        means = batch_scores[:b].mean(axis=0)
        top = int(np.argmax(means))
        total = means.clip(min=0).sum()
        rho = spearmanr(means, final).statistic if b < batch_scores.shape[0] else 1.0
        rows.append({"batches": b, "top_site": sites[top], "top1_share": float(means[top] / total) if total > 0 else 0.0,
                     "spearman": float(rho)})
    return pd.DataFrame(rows)


def top_stable_after(curve: pd.DataFrame) -> int:
    """The smallest number of batches from which on the top site no longer changes."""
    tops = curve["top_site"].tolist()
    stable = len(tops)
    while stable > 1 and tops[stable - 2] == tops[-1]:
        stable -= 1
    return int(curve["batches"].iloc[stable - 1])


def stability(batch_scores: np.ndarray, sites: list[str], n: int = 200, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Bootstrap intervals per site, the convergence curve, and the plan's `stability` block."""
    intervals = bootstrap(batch_scores, sites, n=n, seed=seed)
    curve = convergence(batch_scores, sites)
    top = int(np.argmax(batch_scores.mean(axis=0)))
    block = {
        "bootstrap": n, "batches": int(batch_scores.shape[0]), "top_site": sites[top],
        "p_top": float(intervals["p_top"].iloc[top]),
        "top_rank_interval": [int(intervals["rank_lo"].iloc[top]), int(intervals["rank_hi"].iloc[top])],
        "top_stable_after_batches": top_stable_after(curve),
        "convergence": curve.to_dict("records"),
    }
    return intervals, curve, block


def agreement(a: pd.Series, b: pd.Series, k: int = 5) -> dict:
    """How far two rankings of the same sites agree: Spearman rho and Kendall tau of the scores, whether they name
    the same top site, and the overlap of their top-k sets (as a fraction of k). Series are indexed by site."""
    from scipy.stats import kendalltau, spearmanr

    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise ValueError("the two rankings share fewer than two sites: compare rankings of the same model")
    a, b = a[common].astype(float).fillna(0.0), b[common].astype(float).fillna(0.0)
    k = min(k, len(common))
    return {
        "spearman": float(spearmanr(a, b).statistic),
        "kendall": float(kendalltau(a, b).statistic),
        "top1_agree": bool(a.idxmax() == b.idxmax()),
        f"top{k}_overlap": len(set(a.nlargest(k).index) & set(b.nlargest(k).index)) / k,
    }


def agreement_table(rankings: dict[str, pd.Series], k: int = 5) -> pd.DataFrame:
    """`agreement` for every pair of named rankings (tasks, or scores of one probe)."""
    names = [n for n, s in rankings.items() if s.notna().any()]
    rows = [{"a": x, "b": y} | agreement(rankings[x], rankings[y], k) for i, x in enumerate(names)
            for y in names[i + 1:]]
    return pd.DataFrame(rows)
