"""Figures a person would rather look at than read: heatmaps, curves, agreement matrices.

This module imports no stage of the flow (only the ground module `outputs`), so every stage may draw with it; it
only draws: the tables it draws are computed by the stages (the heatmap's in `plan.ranking`).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..outputs import atomic_path  # noqa: E402


def _save(fig, path) -> None:
    """Write a figure atomically and free it: pyplot keeps every open figure alive otherwise."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _annotate(ax, top: pd.DataFrame, roles: list, layers: list, norm) -> None:
    """Each top site's share in its cell; the first, the dominant site, boxed."""
    for i, row in enumerate(top.itertuples()):
        x, y = layers.index(row.layer), roles.index(row.role)
        colour = "white" if norm(row.share) > 0.55 else "black"
        ax.text(x, y, f"{100 * row.share:.0f}" if row.share >= 0.01 else "", ha="center", va="center",
                fontsize=7, color=colour)
        if i == 0:
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#00a0ff", linewidth=2.5))


def _margin_bars(above, side, by_role: pd.Series, by_layer: pd.Series, roles: list, layers: list) -> None:
    """The layer margins above the grid and the role margins beside it."""
    above.bar(range(len(layers)), [by_layer.get(layer, 0.0) for layer in layers], color="#555", width=0.8)
    above.set_ylabel("layer\nshare", fontsize=8)
    above.tick_params(labelbottom=False, labelsize=7)
    side.barh(range(len(roles)), [by_role.get(role, 0.0) for role in roles], color="#555", height=0.7)
    side.set_xlabel("role share", fontsize=8)
    side.tick_params(labelleft=False, labelsize=7)
    for a in (above, side):
        for spine in ("top", "right"):
            a.spines[spine].set_visible(False)


def heatmap(grid: pd.DataFrame, by_role: pd.Series, by_layer: pd.Series, top: pd.DataFrame, path, title: str = "",
            log: bool = False) -> None:
    """Share of the score per (role, layer), layers across, roles down, with margins; the top sites annotated and the
    first of them, the dominant site, boxed. The tables come from `plan.ranking.heatmap_tables`.

    Roles run down because there are few of them and layers run across because there can be many: a 30-layer
    model stays readable on a laptop screen.
    """
    roles, layers = list(grid.index), list(grid.columns)
    values = grid.to_numpy(dtype=float)

    fig = plt.figure(figsize=(max(8.0, 0.32 * len(layers) + 3.5), 1.1 + 0.42 * len(roles) + 1.6))
    grid_spec = fig.add_gridspec(2, 3, width_ratios=[max(4, len(layers)), 3.2, 0.35], height_ratios=[1.2, len(roles)],
                                 wspace=0.05, hspace=0.06)
    ax = fig.add_subplot(grid_spec[1, 0])
    above = fig.add_subplot(grid_spec[0, 0], sharex=ax)
    side = fig.add_subplot(grid_spec[1, 1], sharey=ax)
    cax = fig.add_subplot(grid_spec[1, 2])

    positive = values[np.isfinite(values) & (values > 0)]
    if log and len(positive):
        norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-4), vmax=positive.max())
        shown = np.where(values > 0, values, np.nan)
    else:
        norm = Normalize(vmin=0, vmax=np.nanmax(values) if np.isfinite(values).any() else 1)
        shown = values
    # grey: role absent in this layer, or zero share on a log scale
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#f2f2f2")
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, cax=cax, label="share of total score" + (" (log)" if log else ""))

    ax.set_yticks(range(len(roles)), roles)
    step = 1 if len(layers) <= 32 else int(np.ceil(len(layers) / 32))
    ax.set_xticks(range(0, len(layers), step), [str(layer) for layer in layers][::step], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("role")

    _annotate(ax, top, roles, layers, norm)
    _margin_bars(above, side, by_role, by_layer, roles, layers)
    dominant = top.iloc[0]
    headline = f"dominant: {dominant.site}  ({100 * dominant.share:.1f}% of the score)"
    fig.suptitle(f"{title}\n{headline}" if title else headline, fontsize=10, y=0.995)
    fig.text(0.01, 0.005, "cells: % share for the top sites; boxed: the dominant site", fontsize=7, color="#666")
    _save(fig, path)


def _smooth(values, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction, as training dashboards draw it."""
    out, running = [], 0.0
    for i, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        out.append(running / (1 - weight**i))
    return np.asarray(out)


def loss_curves(curves: dict[str, list[float]], table: pd.DataFrame | None, path, title: str = "") -> None:
    """Training loss per arm (smoothed, raw values faint), and beside it quality against trainable parameters."""
    with_table = table is not None and len(table)
    fig, axes = plt.subplots(1, 2 if with_table else 1, figsize=(13 if with_table else 7.5, 4.6), squeeze=False)
    ax = axes[0, 0]
    colours = _palette(len(curves))
    for i, (label, losses) in enumerate(curves.items()):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color=colours(i), alpha=0.18, linewidth=0.8)
        ax.plot(steps, _smooth(losses), color=colours(i), linewidth=1.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("training loss, smoothed", fontsize=10)
    if with_table:
        _quality_panel(axes[0, 1], table, list(curves), colours)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def step_curves(steps: pd.DataFrame, table: pd.DataFrame | None, path, title: str = "") -> None:
    """Quality against training steps, one line per arm through the steps its runs were evaluated at: the mean over
    seeds with its 95% interval as a band (none with two seeds), each seed a faint dot; the untrained base a line."""
    metric = "exact_match" if steps["exact_match"].notna().any() else "eval_loss"
    scale = 100 if metric == "exact_match" else 1
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    arms = list(dict.fromkeys(steps["arm"]))
    colours = _palette(len(arms))
    for i, arm in enumerate(arms):
        rows = steps[steps["arm"] == arm].sort_values("step")
        x = rows["step"].to_numpy(dtype=float)
        ax.plot(x, scale * rows[metric], color=colours(i), marker="o", linewidth=1.8, label=arm)
        lo, hi = rows[f"{metric}_lo"].to_numpy(dtype=float), rows[f"{metric}_hi"].to_numpy(dtype=float)
        if np.isfinite(lo).any():
            ax.fill_between(x, scale * lo, scale * hi, color=colours(i), alpha=0.15, linewidth=0)
        if metric == "exact_match":
            for step, seeds in zip(x, rows["exact_match_per_seed"].fillna("").astype(str)):
                values = [float(v) for v in seeds.split("|") if v]
                ax.scatter([step] * len(values), values, color=colours(i), s=10, alpha=0.45, zorder=1)
    base = table[table["arm"] == "base"] if table is not None else pd.DataFrame()
    if len(base) and pd.notna(base[metric].iloc[0]):
        ax.axhline(scale * base[metric].iloc[0], color="#777", linestyle="--", linewidth=1, label="base")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(steps["step"].astype(int)))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("training steps (one run per arm and seed, evaluated part-way)")
    ax.set_ylabel("exact match on the test split (%)" if metric == "exact_match" else "held-out loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False, loc="best")
    ax.set_title("quality against training steps: mean over seeds, 95% interval, seeds as dots", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _palette(count: int):
    """A colour per arm: tab10 while it has one for each, tab20 beyond (twice as many, in light/dark pairs)."""
    name, size = ("tab10", 10) if count <= 10 else ("tab20", 20)
    cmap = plt.get_cmap(name)
    return lambda i: cmap(i % size)


FAMILY_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _quality_panel(ax, table: pd.DataFrame, arm_order: list[str], colours) -> None:
    """Exact match where the task has answers, held-out loss otherwise, against trainable parameters (log scale),
    each arm with its 95% interval and the Pareto front (the best quality at no more parameters) drawn through
    them; the untrained base and the majority answer are reference lines."""
    metric = "exact_match" if table["exact_match"].notna().any() else "eval_loss"
    scale = 100 if metric == "exact_match" else 1
    for name, style in (("base", "--"), ("majority", ":")):
        row = table[table["arm"] == name]
        if len(row) and pd.notna(row[metric].iloc[0]):
            ax.axhline(scale * row[metric].iloc[0], color="#777", linestyle=style, linewidth=1, label=name)
    points = []
    families = [f for f in dict.fromkeys(table.get("family", pd.Series(dtype=object)).dropna()) if f]
    marker = {family: FAMILY_MARKERS[i % len(FAMILY_MARKERS)] for i, family in enumerate(families)}
    for i, label in enumerate(arm_order):
        row = table[table["arm"] == label]
        if not len(row) or pd.isna(row[metric].iloc[0]):
            continue
        x, y = row["trainable_params"].iloc[0], scale * row[metric].iloc[0]
        lo, hi = (row.get(f"{metric}_lo"), row.get(f"{metric}_hi"))
        if lo is not None and hi is not None and pd.notna(lo.iloc[0]) and pd.notna(hi.iloc[0]):
            ax.errorbar([x], [y], yerr=[[y - scale * lo.iloc[0]], [scale * hi.iloc[0] - y]], color=colours(i),
                        capsize=3, linewidth=1, zorder=2)
        family = row["family"].iloc[0] if "family" in row else None
        ax.scatter([x], [y], color=colours(i), s=46, zorder=3, marker=marker.get(family, "o"))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        points.append((x, y))
    better = (lambda a, b: a > b) if metric == "exact_match" else (lambda a, b: a < b)
    front, best = [], None
    for x, y in sorted(points):
        if best is None or better(y, best):
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front), color="#444", linewidth=1, linestyle="-", alpha=0.6, zorder=1, label="Pareto front")
    if len(families) > 1:  # one marker per adapter family, named in the legend
        for family, shape in marker.items():
            ax.scatter([], [], marker=shape, color="#555", s=40, label=family)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("exact match on the test split (%)" if metric == "exact_match" else "held-out loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False, loc="best")
    ax.set_title("quality against cost", fontsize=10)


def convergence_plot(curve: pd.DataFrame, stability: dict, path, title: str = "") -> None:
    """How the ranking settles as calibration batches accumulate: the top site's share and the rank correlation
    with the final scores, with the batch from which the top site no longer changes marked."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.plot(curve["batches"], curve["spearman"], marker="o", color="#1f77b4", label="Spearman with the final scores")
    ax.set_ylim(min(0.0, float(curve["spearman"].min())) - 0.02, 1.02)
    ax.set_xlabel("calibration batches")
    ax.set_ylabel("Spearman rho", color="#1f77b4")
    share = ax.twinx()
    share.plot(curve["batches"], 100 * curve["top1_share"], marker="s", color="#d62728", label="top site's share")
    share.set_ylabel("top site's share (%)", color="#d62728")
    share.set_ylim(0, max(1.0, 100 * float(curve["top1_share"].max())) * 1.15)
    stable = stability.get("top_stable_after_batches")
    if stable:
        ax.axvline(stable, color="#777", linestyle="--", linewidth=1)
        ax.annotate(f"top site fixed from batch {stable}", (stable, 0.05), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize=8, color="#555")
    ax.set_xticks(list(curve["batches"]))
    ax.grid(alpha=0.3)
    p_top = stability.get("p_top")
    headline = f"top site {stability.get('top_site')}" + (f": top in {100 * p_top:.0f}% of "
                                                          f"{stability.get('bootstrap')} bootstrap resamples"
                                                          if p_top is not None else "")
    fig.suptitle(f"{title}\n{headline}" if title else headline, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def agreement_matrix(table: pd.DataFrame, names: list[str], path, title: str = "") -> None:
    """Spearman rho between every pair of rankings as a matrix; each cell also says whether the pair names the same
    top site (T1) and how much of the top-k they share."""
    n = len(names)
    rho = np.eye(n)
    notes = [["" for _ in names] for _ in names]
    overlap = next((c for c in table.columns if c.endswith("_overlap")), None)
    for row in table.itertuples(index=False):
        i, j = names.index(row.a), names.index(row.b)
        rho[i, j] = rho[j, i] = row.spearman
        text = f"{row.spearman:.2f}\n" + ("same top" if row.top1_agree else "other top")
        if overlap:
            text += f"\n{overlap.split('_')[0]} {100 * getattr(row, overlap):.0f}%"
        notes[i][j] = notes[j][i] = text
    fig, ax = plt.subplots(figsize=(1.7 * n + 2.2, 1.4 * n + 1.2))
    image = ax.imshow(rho, cmap="viridis", vmin=min(0.0, float(rho.min())), vmax=1.0)
    for i in range(n):
        for j in range(n):
            if i != j:
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8,
                        color="white" if rho[i, j] < 0.6 else "black")
    ax.set_xticks(range(n), names, rotation=20, ha="right")
    ax.set_yticks(range(n), names)
    fig.colorbar(image, ax=ax, label="Spearman rho of the site scores")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


SCORE_NAMES = {"kappa": "-kappa (condition number)", "params": "parameters per rank", "depth": "layer"}


def validation_plot(sites: pd.DataFrame, correlations: pd.DataFrame, path, title: str = "") -> None:
    """One panel per score: the score of each trained site against its realised gain (log x where the score is
    positive), Spearman rho in the panel's title, the score's top site ringed and the realised best filled."""
    panels = list(correlations["score"])
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    best = sites["gain"].idxmax()
    for ax, (_, corr) in zip(axes.flat, correlations.iterrows()):
        x = sites[corr.score].astype(float)
        ax.scatter(x, sites["gain"], s=16, color="#1f77b4", alpha=0.8)
        top = x.idxmax()
        ax.scatter([x[top]], [sites["gain"][top]], s=90, facecolors="none", edgecolors="#d62728", linewidths=1.5,
                   label="score's top site")
        ax.scatter([x[best]], [sites["gain"][best]], s=30, color="#2ca02c", label="best realised gain")
        if (x > 0).all() and x.max() / max(x.min(), 1e-300) > 20:
            ax.set_xscale("log")
        rho = "n/a" if pd.isna(corr.spearman) else f"{corr.spearman:.2f}"
        ax.set_title(f"{SCORE_NAMES.get(corr.score, corr.score)}: rho {rho}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("gain (validation loss)", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def family_layers(frame: pd.DataFrame, path, title: str = "") -> None:
    """Each family's share of its own score per layer, one line per family: where in depth each family's first
    gradient concentrates. Scores of different families are not on one scale; shares within a family are."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for family, rows in frame.groupby("family", sort=False):
        per_layer = rows.groupby("layer")["page"].sum()
        total = per_layer.sum()
        ax.plot(per_layer.index, per_layer / total if total > 0 else per_layer, marker="o", ms=3, label=family)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the family's score")
    ax.set_title(title or "init-gradient score by layer, per family", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
