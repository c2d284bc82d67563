"""Order sites by score, and say how concentrated the score is on the top sites."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

SCORES = ("page", "page_sampled", "grad_energy", "fisher")


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


def margins(ranked: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Summed shares per role and per layer: the heatmap's margins."""
    return ranked.groupby("role")["share"].sum().sort_values(ascending=False), ranked.groupby("layer")["share"].sum()


def share_grid(ranked: pd.DataFrame, roles: tuple[str, ...]) -> pd.DataFrame:
    """Share per (role, layer): rows are the roles present, in canonical order; columns are layers."""
    grid = ranked.pivot_table(index="role", columns="layer", values="share", aggfunc="sum")
    present = [r for r in roles if r in grid.index] + [r for r in grid.index if r not in roles]
    return grid.reindex(present)
