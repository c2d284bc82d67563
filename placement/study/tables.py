"""The comparison's table: one row per arm (means over seeds, intervals, the tests against the first arm, costs),
the form people read it in, and the files it is written to (comparison.csv, .md, .json, curves.png)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..families import lora
from ..outputs import write_csv, write_json, write_text
from ..plan.plan import Plan
from ..report.figures import loss_curves, step_curves
from . import stats

TABLE_COLUMNS = ["arm", "family", "sites", "r", "trainable_params", "params_pct", "lr", "lr_at_edge", "seeds",
                 "eval_loss", "eval_loss_lo", "eval_loss_hi", "val_loss", "exact_match", "exact_match_lo",
                 "exact_match_hi", "balanced_accuracy", "p_exact_match", "p_eval_loss", "sec_per_step", "peak_mem_mb",
                 "train_loss_last",
                 "interval", "p_exact_match_test", "p_exact_match_2", "p_exact_match_2_test", "p_eval_loss_test",
                 "p_eval_loss_2", "p_eval_loss_2_test", "diff_exact_match", "diff_exact_match_lo",
                 "diff_exact_match_hi", "diff_eval_loss", "diff_eval_loss_lo", "diff_eval_loss_hi", "exact_match_sd",
                 "eval_loss_sd", "draws", "placement_version", "git_commit"]
RANDOM_KINDS = ("random-1", "random")  # arms that draw their sites anew for every seed


@dataclass
class ArmRun:
    """One arm trained with one seed, as its folder records it."""

    metrics: dict
    predictions: pd.DataFrame
    losses: list[float]
    milestones: dict[int, "ArmRun"] = field(default_factory=dict)  # evaluations before the last step, by step


@dataclass
class Comparison:
    table: pd.DataFrame
    curves: dict[str, list[float]]
    kind: str | None
    steps: pd.DataFrame | None = None  # the learning curves of --eval-at: a row per arm and evaluated step

    def markdown(self) -> str:
        return formatted_table(self.table).to_markdown(index=False)


def row(label: str, **values) -> dict:
    return {c: values.get(c, float("nan")) for c in TABLE_COLUMNS} | {"arm": label}


def grid(runs: list[ArmRun], column: str) -> np.ndarray | None:
    """A per-question column of every seed, seeds x questions (None when the task does not score it)."""
    frames = [r.predictions[column] for r in runs if column in r.predictions and r.predictions[column].notna().any()]
    if len(frames) < len(runs) or not frames:
        return None
    return np.stack([f.astype(float).to_numpy() for f in frames])


def statistics(runs: list[ArmRun], first: list[ArmRun] | None, seed: int = 0) -> dict:
    """An arm's intervals, spread over seeds, and its tests against the first arm on the same questions."""
    out = {}
    for name, column, binary, top in (("exact_match", "correct", True, 1.0), ("eval_loss", "loss", False, np.inf)):
        per_seed = [r.metrics.get(name) for r in runs]
        mine = grid(runs, column)
        if mine is None or any(v is None or pd.isna(v) for v in per_seed):
            continue
        out[f"{name}_lo"], out[f"{name}_hi"], method = stats.arm_interval(mine, per_seed, binary, top, seed)
        out["interval"] = "/".join(dict.fromkeys(filter(None, [out.get("interval"), method])))
        if len(runs) > 1:
            out[f"{name}_sd"] = float(np.std(per_seed, ddof=1))
        theirs = grid(first, column) if first is not None else None
        if theirs is not None:
            tests = stats.pair_tests(mine, theirs, binary, seed)
            out |= {f"p_{name}": tests["p"], f"p_{name}_test": tests["test"], f"p_{name}_2": tests["p2"],
                    f"p_{name}_2_test": tests["test2"], f"diff_{name}": tests["diff"],
                    f"diff_{name}_lo": tests["diff_lo"], f"diff_{name}_hi": tests["diff_hi"]}
    return out


def draws(plans: list[Plan]) -> str:
    """What a random arm drew for each seed: its sites, or how many when there are more than three."""
    shown = [",".join(p.targets) if len(p.targets) <= 3 else f"{len(p.targets)} sites" for p in plans]
    return "; ".join(f"seed {k}: {s}" for k, s in enumerate(shown))


def arm_row(label: str, strategy: str, plans: list[Plan], runs: list[ArmRun], full: int,
            first: list[ArmRun] | None, seed: int = 0) -> dict:
    """An arm's row: means over seeds (and over draws for a random arm), intervals, the tests against the first arm,
    costs of seed 0, and the code each seed ran with."""
    metrics = [r.metrics for r in runs]

    def mean(key: str) -> float:
        values = [m.get(key) for m in metrics]
        return float(np.mean(values)) if all(v is not None for v in values) else float("nan")

    def distinct(key: str) -> str:
        return "|".join(dict.fromkeys(str(m.get(key) or "unrecorded") for m in metrics))

    plan = plans[0]
    params = mean("trainable_params")
    out = row(label, family=plan.family, sites=float(np.mean([len(p.targets) for p in plans])),
              r=plan.peft["r"] if plan.family == "lora" else None, trainable_params=params,
              params_pct=100 * params / full, lr=metrics[0]["lr"], lr_at_edge=metrics[0].get("lr_at_edge"),
              seeds=len(runs), eval_loss=mean("eval_loss"), val_loss=mean("val_loss"), exact_match=mean("exact_match"),
              balanced_accuracy=mean("balanced_accuracy"), sec_per_step=metrics[0]["sec_per_step"],
              peak_mem_mb=metrics[0]["peak_mem_mb"], train_loss_last=mean("train_loss_last"),
              draws=draws(plans) if strategy in RANDOM_KINDS else "",
              placement_version=distinct("placement_version"), git_commit=distinct("git_commit"))
    return out | statistics(runs, first, seed)


STEP_VALUES = ("eval_loss", "exact_match", "val_loss")  # what each evaluated step records, per run and per arm
STEP_COLUMNS = ["arm", "step", "seeds", "exact_match", "exact_match_lo", "exact_match_hi", "eval_loss",
                "eval_loss_lo", "eval_loss_hi", "val_loss", "interval", "exact_match_per_seed"]


def step_rows(label: str, runs: list[ArmRun], seed: int = 0) -> list[dict]:
    """An arm's learning curve: at each step every seed was evaluated at (the last included), the means over seeds
    with the intervals the table gives, so the last row is the arm's row of the table."""
    if not runs or not runs[0].milestones:
        return []
    shared = sorted(set.intersection(*(set(r.milestones) for r in runs)))
    points = [(step, [r.milestones[step] for r in runs]) for step in shared]
    points.append((int(runs[0].metrics["steps"]), runs))
    rows = []
    for step, at in points:
        values = {k: float(np.mean([r.metrics.get(k, np.nan) for r in at])) for k in STEP_VALUES}
        per_seed = "|".join(f"{100 * r.metrics['exact_match']:.1f}" for r in at
                            if r.metrics.get("exact_match") is not None and pd.notna(r.metrics["exact_match"]))
        found = statistics(at, None, seed)
        rows.append({c: found.get(c, np.nan) for c in STEP_COLUMNS} | values
                    | {"arm": label, "step": step, "seeds": len(at), "exact_match_per_seed": per_seed})
    return rows


def formatted_table(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table as people read it: percentages, thousands separators, few decimals, each quality
    figure with its 95% interval, and the p-values against the first arm, each naming its test and marked "n.s."
    at or above 0.05. The CLI, the markdown file and the HTML report all show this form."""
    def value(v, fmt):
        return "" if v is None or pd.isna(v) else fmt(v)

    def with_interval(row, name, fmt):
        shown = value(row.get(name), fmt)
        if shown and row.get("interval") == "none" and int(row.get("seeds") or 0) == 2:
            return shown + " [none: 2 seeds]"
        lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
        return shown + (f" [{fmt(lo)}, {fmt(hi)}]" if shown and pd.notna(lo) and pd.notna(hi) else "")

    def p_value(row, name):  # B bootstrap resamples cannot tell p below 1/(B + 1) apart from 0
        test = row.get(f"{name}_test")
        return value(row.get(name), lambda p: ("<0.001" if p < 0.001 else f"{p:.3g}") + (" n.s." if p >= 0.05 else "")
                     + (f" ({test})" if isinstance(test, str) and test else ""))

    percent, loss = (lambda v: f"{100 * v:.1f}%"), (lambda v: f"{v:.3f}")
    points = lambda v: f"{100 * v:+.1f}"  # noqa: E731  (percentage points)
    rows = []
    for _, row in table.iterrows():
        rows.append({
            "arm": row["arm"], "family": value(row.get("family"), str),
            "sites": value(row["sites"], lambda v: f"{v:g}"),
            "r": value(row["r"], lambda v: f"{int(v)}"),
            "trainable params": value(row["trainable_params"], lambda v: f"{int(v):,}"),
            "of all-linear": value(row["params_pct"], lambda v: f"{v:.2f}%"),
            "lr": value(row["lr"], lambda v: f"{v:g}") + (" (edge)" if row.get("lr_at_edge") in (True,) else ""),
            "seeds": value(row.get("seeds"), lambda v: f"{int(v)}"),
            "held-out loss [95%]": with_interval(row, "eval_loss", loss),
            "Δ loss [95%]": with_interval(row, "diff_eval_loss", lambda v: f"{v:+.3f}"),
            "p loss": p_value(row, "p_eval_loss"), "p loss (2nd)": p_value(row, "p_eval_loss_2"),
            "exact match [95%]": with_interval(row, "exact_match", percent),
            "Δ exact, pts [95%]": with_interval(row, "diff_exact_match", points),
            "p exact": p_value(row, "p_exact_match"), "p exact (2nd)": p_value(row, "p_exact_match_2"),
            "sd exact": value(row.get("exact_match_sd"), lambda v: f"{100 * v:.1f} pts"),
            "sd loss": value(row.get("eval_loss_sd"), loss),
            "balanced acc.": value(row["balanced_accuracy"], percent),
            "val loss": value(row["val_loss"], loss), "s/step": value(row["sec_per_step"], lambda v: f"{v:.2f}"),
            "peak MiB": value(row["peak_mem_mb"], lambda v: f"{v:.0f}"),
        })
    shown = pd.DataFrame(rows)
    if set(shown["family"]) <= {"", "lora"}:  # a comparison of LoRA placements alone needs no family column
        shown = shown.drop(columns="family")
    # columns with nothing to show (no answers, no balanced accuracy, one arm without tests) are left out
    return shown[[c for c in shown.columns if c == "arm" or (shown[c] != "").any()]]


def notes(table: pd.DataFrame) -> str:
    """What comparison.md says under the table: the arm the tests compare with, each test and interval behind the
    numbers, what the random arms drew, and the code each arm ran with."""
    arms = table[~table["arm"].isin(["base", "majority"])]
    lines = []
    tested = arms.iloc[1:]
    used = {t for c in ("p_exact_match_test", "p_exact_match_2_test", "p_eval_loss_test", "p_eval_loss_2_test")
            if c in tested for t in tested[c].dropna() if t}
    if used:
        lines.append(f"Δ and p compare each arm with the first, {arms.iloc[0]['arm']}, on the same test questions; "
                     "(2nd) is the second test. Tests: "
                     + "; ".join(f"{name} = {stats.TESTS[name]}" for name in stats.TESTS if name in used) + ".")
    found = {m for text in table.get("interval", pd.Series(dtype=str)).dropna() for m in str(text).split("/")}
    if found & set(stats.INTERVALS):
        lines.append("Intervals: " + "; ".join(f"{m} = {v}" for m, v in stats.INTERVALS.items() if m in found) + ".")
    lines += [draws_note(arm["arm"], arm["draws"]) for _, arm in arms.iterrows()
              if isinstance(arm.get("draws"), str) and arm["draws"]]
    lines.append(code_note(arms))
    return "\n\n".join(line for line in lines if line)


def draws_note(label: str, drawn: str) -> str:
    """What a random control drew; several seeds that drew the same sites spread over training seeds alone."""
    per_seed = [d.split(": ", 1)[-1] for d in drawn.split("; ")]
    if len(per_seed) == 1:
        return f"{label} drew {per_seed[0]}."
    if len(per_seed) > 1 and len(set(per_seed)) == 1:
        return (f"{label} drew the same sites for every seed ({per_seed[0]}): its spread is over training seeds "
                "only, not over draws.")
    return f"{label} draws its sites anew for each seed, so its spread is over draws ({drawn})."


def code_note(arms: pd.DataFrame) -> str:
    if "git_commit" not in arms:
        return ""
    code = arms["placement_version"].fillna("unrecorded").astype(str) + " (commit " + \
        arms["git_commit"].fillna("unrecorded").astype(str) + ")"
    if code.nunique() == 1:
        return "" if "unrecorded" in code.iloc[0] else f"Every arm ran with placement {code.iloc[0]}."
    by_code = {c: list(arms["arm"][code == c]) for c in dict.fromkeys(code)}
    return "The arms ran with different code (a resumed run): " + "; ".join(
        f"{', '.join(labels)} with placement {c}" for c, labels in by_code.items()) + "."


def em_text(evaluation) -> str:
    if evaluation.exact_match is None:
        return ""
    text = f", exact match {100 * evaluation.exact_match:.1f}%"
    if evaluation.balanced_accuracy is not None:
        text += f" (balanced {100 * evaluation.balanced_accuracy:.1f}%)"
    return text


def variant_note(labels) -> str:
    """What comparison.md says when an arm's LoRA starts elsewhere than the init the probe scored."""
    found = sorted({label.rsplit("+", 1)[1] for label in labels if "+" in label} & lora.INIT_DIFFERS)
    if not found:
        return ""
    return (f"The site ranking behind these arms assumes PEFT's default LoRA init (B = 0, A random); "
            f"{', '.join(found)} start elsewhere (DoRA also trains a magnitude from the first step), so for those "
            "arms the ranking came from the default init, not from their own.\n\n")


def demo_summary(comparison: Comparison, base: Plan, out) -> tuple[dict, list[str]]:
    """What `placement demo` prints, and its JSON form."""
    top = min(base.sites, key=lambda row: row["rank"])
    summary = {"dominant_site": top["site"], "share": top["share"], "out": out,
               "rows": comparison.table.to_dict("records")}
    return summary, [
        f"dominant site {top['site']} holds {100 * top['share']:.1f}% of PAGE",
        comparison.markdown(),
        f"wrote {out}/report.html, {out}/profile (scores.csv, plan.json, top4.json, heatmap.png), {out}/arms/, "
        f"{out}/comparison.md, {out}/curves.png",
    ]


def write_comparison(comparison: Comparison, out, title: str = "") -> list:
    """comparison.csv, comparison.md, comparison.json and curves.png, each written atomically."""
    out = Path(out)
    write_csv(out / "comparison.csv", comparison.table)
    note = notes(comparison.table)
    write_text(out / "comparison.md", (f"# {title}\n\n" if title else "") + variant_note(comparison.table["arm"])
               + comparison.markdown() + "\n" + (f"\n{note}\n" if note else ""))
    write_json(out / "comparison.json", ({"kind": comparison.kind, "rows": comparison.table.to_dict("records"),
                                          "curves": comparison.curves}))
    loss_curves(comparison.curves, comparison.table, out / "curves.png", title=title)
    written = ["comparison.csv", "comparison.md", "comparison.json", "curves.png"]
    if comparison.steps is not None and len(comparison.steps):
        write_csv(out / "steps.csv", comparison.steps)
        step_curves(comparison.steps, comparison.table, out / "steps.png", title=title)
        written += ["steps.csv", "steps.png"]
    return [out / n for n in written]
