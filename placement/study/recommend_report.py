"""What a recommendation writes: the decision per budget, trials.csv, recommendation.md, pareto.png and one
ordinary plan per budget (strategy `recommended`, the trials' summary in its `provenance`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..outputs import write_csv, write_json, write_text
from ..plan.budget import DECISION, RECOMMENDATION, plan_file, recommended_path
from ..plan.plan import Plan
from .rungs import final_rung


def trials_frame(results: dict, full: int) -> pd.DataFrame:
    """One row per finished trial; `full` is all-linear's parameters at the probe's rank."""
    rows = [{k: r[k] for k in ("stage", "selector", "budget", "seed", "steps", "lr", "params", "val_loss",
                               "train_loss", "seconds", "sites")} for r in results.values()]
    frame = pd.DataFrame(rows).sort_values(["stage", "budget", "selector", "lr", "seed"], kind="stable")
    frame.insert(frame.columns.get_loc("params") + 1, "params_pct", 100 * frame["params"] / full)
    return frame.reset_index(drop=True)


def _final(frame: pd.DataFrame, budget: str) -> pd.DataFrame:
    """The trials a budget's decision reads: rung 1 (two seeds), or rung 0 at the budget's swept rate when the run
    stopped there (`--rungs 1`)."""
    rows = frame[frame.budget == budget]
    if (rows.stage == "rung1").any():
        return rows[rows.stage == "rung1"]
    first = rows[rows.stage == "rung0"]
    page = first[first.selector == "page"]
    rate = page.loc[page.val_loss.idxmin(), "lr"] if len(page) else first.lr.mode().iloc[0]
    return first[first.lr == rate]


def _summaries(frame: pd.DataFrame, budget: str) -> pd.DataFrame:
    longer = _final(frame, budget)
    return longer.groupby("selector").agg(mean=("val_loss", "mean"), lo=("val_loss", "min"), hi=("val_loss", "max"),
                                          params=("params", "first"), sites=("sites", "first"),
                                          lr=("lr", "first")).reset_index()


def decide(frame: pd.DataFrame) -> dict[str, dict]:
    """Per budget: the best by mean validation loss over the seeds; among those within the best's spread over
    seeds (max - min), the one with the fewest parameters; its margins over the runner-up and page's plan."""
    out = {}
    for budget in sorted(frame.budget.unique(), key=lambda b: float(b.rstrip("%"))):
        table = _summaries(frame, budget).sort_values(["mean", "params", "selector"])
        if table.empty:
            continue
        best = table.iloc[0]
        spread = float(best.hi - best.lo)
        close = table[table["mean"] <= best["mean"] + spread]
        winner = close.sort_values(["params", "mean", "selector"]).iloc[0]
        others = table[table.sites != winner.sites]  # the runner-up is another choice of sites, not a synonym
        page = table[table.selector == "page"]
        out[budget] = {
            "selector": winner.selector, "params": int(winner.params), "val_loss": float(winner["mean"]),
            "lr": float(winner.lr),  # the rate the plan was judged at: train it there
            "same_sites": sorted(table[(table.sites == winner.sites) & (table.selector != winner.selector)].selector),
            "spread": float(winner.hi - winner.lo), "runner_up": others.iloc[0].selector if len(others) else None,
            "margin_runner_up": float(others.iloc[0]["mean"] - winner["mean"]) if len(others) else None,
            "margin_page": float(page.iloc[0]["mean"] - winner["mean"]) if len(page) else None,
            "finalists": table.to_dict("records"),
        }
    return out


def _number(value, fmt: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, fmt)


def markdown(decision: dict, full: int, settings) -> str:
    steps, seeds = final_rung(settings)
    runs = (f"after {steps} steps, mean over seeds {' and '.join(map(str, seeds))} (spread: max - min)"
            if len(seeds) > 1 else f"after {steps} steps of rung 0, seed 0 alone (no spread)")
    lines = ["# Recommendation", "",
             f"Validation loss {runs}; "
             f"budgets in percent of all-linear LoRA at r={settings.r} ({full:,} parameters). Within the best's "
             "spread the plan with fewer parameters wins.", "",
             "| budget | recommended | params | % all-linear | val loss | spread | runner-up | margin | margin over page |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for budget, d in decision.items():
        same = f" (= {', '.join(d['same_sites'])})" if d["same_sites"] else ""
        lines.append(f"| {budget} | {d['selector']}{same} | {d['params']:,} | {100 * d['params'] / full:.2f} | "
                     f"{_number(d['val_loss'])} | {_number(d['spread'])} | {d['runner_up'] or '-'} | "
                     f"{_number(d['margin_runner_up'])} | {_number(d['margin_page'])} |")
    lines += ["", "A margin is the other plan's mean validation loss minus the recommended one's: positive favours "
              "the recommendation. With two seeds the spread is all the evidence of noise there is; compare the "
              "recommended plan on the test questions with `placement compare --plan-arm`.", ""]
    return "\n".join(lines)


def pareto(frame: pd.DataFrame, decision: dict, path) -> None:
    """Rung-0 validation loss against trainable parameters, a line per selector over the budgets; winners marked."""
    from ..report.figures import _save, plt

    first = frame[frame.stage == "rung0"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for selector, rows in first.groupby("selector"):
        best = rows.sort_values("val_loss").groupby("budget").head(1).sort_values("params")
        ax.plot(best.params, best.val_loss, marker="o", label=selector, lw=1.2)
    for budget, d in decision.items():
        ax.scatter([d["params"]], [d["val_loss"]], marker="*", s=220, color="black", zorder=5)
        ax.annotate(f"{d['selector']} @ {budget}", (d["params"], d["val_loss"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation loss")
    ax.set_title("selectors at equal parameters (lines: rung 0; stars: recommended, longer runs)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def recommended(plan: Plan, budget: str, d: dict, settings) -> Plan:
    """The plan of the budget's winner, with how it was judged: its rate, trial length and seeds, its margins."""
    steps, seeds = final_rung(settings)
    provenance = {"kind": "recommend", "budget": budget, "selector": d["selector"], "lr": d.get("lr"),
                  "val_loss": d["val_loss"], "spread": d["spread"], "same_sites": d["same_sites"],
                  "runner_up": d["runner_up"], "margin_runner_up": d["margin_runner_up"],
                  "margin_page": d["margin_page"], "steps": steps, "seeds": list(seeds),
                  "finalists": [{k: f[k] for k in ("selector", "mean", "lo", "hi", "params")} for f in d["finalists"]]}
    strategy = dict(plan.strategy, name="recommended", label=f"recommended-{budget}", source=d["selector"])
    return replace(plan, strategy=strategy, provenance=provenance)


def write_outputs(folder, results: dict, plans: dict, full: int, settings) -> dict:
    folder = Path(folder)
    frame = trials_frame(results, full)
    write_csv(folder / "trials.csv", frame)
    decision = decide(frame)
    for budget, d in decision.items():
        recommended(plans[d["selector"], budget], budget, d, settings).save(folder / plan_file(budget))
    pareto(frame, decision, folder / "pareto.png")
    write_text(folder / RECOMMENDATION, markdown(decision, full, settings))
    write_json(folder / DECISION, decision)
    return decision


def recommended_plan(folder: str | Path, budget: str) -> Plan:
    """The recommended plan of a recommendation folder at `budget`."""
    return Plan.load(recommended_path(folder, budget))

