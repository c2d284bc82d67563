"""Recompute the committed comparisons' intervals and p-values from the stored predictions of every arm and seed,
with the statistics `placement compare` uses now (nothing is trained again): with several seeds, the seed-level
paired t-test and the crossed bootstrap over seeds and questions; with one, Wilson intervals, McNemar's exact test
and a bootstrap over questions. Rewrites each run's comparison.csv, comparison.md and comparison.json (curves.png
and report.html are left as they are).

    python reports/reanalyse.py            # every run under reports/ that has a comparison.csv
    python reports/reanalyse.py reports/arith/compare-v2
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from placement.outputs import json_text
from placement.train import answers
from placement.study.tables import (RANDOM_KINDS, TABLE_COLUMNS, ArmRun, Comparison, draws, formatted_table, notes,
                                    statistics, variant_note)

HERE = Path(__file__).parent
STATIC = ["arm", "family", "sites", "r", "trainable_params", "params_pct", "lr", "lr_at_edge", "seeds", "eval_loss",
          "val_loss", "exact_match", "balanced_accuracy", "sec_per_step", "peak_mem_mb", "train_loss_last"]


def seed_folders(folder: Path) -> list[Path]:
    """An arm's run folders, seed 0 first (the arm's folder itself when it trained one seed)."""
    seeds = sorted(folder.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    return seeds or [folder]


def scored(path: Path) -> pd.DataFrame:
    """A predictions.csv with its per-question correctness; runs from before that column was written are scored
    here with the tool's own answer scorer."""
    frame = pd.read_csv(path)
    if "correct" not in frame and {"output", "answer"} <= set(frame.columns):
        text = pd.read_csv(path, keep_default_na=False)
        kind = answers.answer_kind([str(a) for a in text["answer"]])
        frame["correct"] = [answers.is_correct(str(o), str(a), kind) for o, a in zip(text["output"], text["answer"])]
    return frame


def arm_runs(folder: Path) -> list[ArmRun]:
    return [ArmRun(json.loads((f / "metrics.json").read_text(encoding="utf-8")), scored(f / "predictions.csv"), [])
            for f in seed_folders(folder)]


def strategy_of(folder: Path) -> str:
    plan = json.loads((seed_folders(folder)[0] / "plan.json").read_text(encoding="utf-8"))
    return plan.get("strategy", {}).get("name", "")


def reanalysed(run: Path) -> pd.DataFrame:
    """The run's table with its static columns as committed and its statistics made anew."""
    old = pd.read_csv(run / "comparison.csv")
    rows, first = [], None
    for _, committed in old.iterrows():
        label = committed["arm"]
        kept = {c: committed[c] for c in STATIC if c in committed}
        if label == "base":
            frame = scored(run / "base_predictions.csv")
            base = ArmRun({"eval_loss": committed["eval_loss"], "exact_match": committed["exact_match"]}, frame, [])
            rows.append(kept | statistics([base], None))
            continue
        folder = run / "arms" / label.replace(":", "-")
        if label == "majority" or not folder.is_dir():
            rows.append(kept)
            continue
        runs = arm_runs(folder)
        plans = [SimpleNamespace(targets=json.loads((f / "plan.json").read_text(encoding="utf-8"))["targets"])
                 for f in seed_folders(folder)]
        extra = {"draws": draws(plans) if strategy_of(folder) in RANDOM_KINDS else ""}
        for key in ("placement_version", "git_commit"):
            extra[key] = "|".join(dict.fromkeys(str(r.metrics.get(key) or "unrecorded") for r in runs))
        if len(runs) > 1:  # the committed tables' seeds all used one seed for their statistics' resamples
            extra["seeds"] = len(runs)
        rows.append(kept | extra | statistics(runs, first, seed=0))
        first = first or runs
    return pd.DataFrame(rows).reindex(columns=TABLE_COLUMNS)


def rewrite(run: Path) -> None:
    table = reanalysed(run)
    title = (run / "comparison.md").read_text(encoding="utf-8").splitlines()[0]
    note = notes(table)
    markdown = formatted_table(table).to_markdown(index=False)
    (run / "comparison.md").write_text(f"{title}\n\n{variant_note(table['arm'])}{markdown}\n"
                                       + (f"\n{note}\n" if note else ""), encoding="utf-8")
    table.to_csv(run / "comparison.csv", index=False)
    path = run / "comparison.json"
    committed = json.loads(path.read_text(encoding="utf-8"))
    comparison = Comparison(table, committed.get("curves", {}), committed.get("kind"))
    path.write_text(json_text({"kind": comparison.kind, "rows": table.to_dict("records"), "curves": comparison.curves}),
                    encoding="utf-8")
    print(f"rewrote {run}/comparison.csv, comparison.md, comparison.json")


def main(paths: list[str]) -> None:
    runs = [Path(p) for p in paths] or sorted(p.parent for p in HERE.rglob("comparison.csv"))
    for run in runs:
        rewrite(run)


if __name__ == "__main__":
    main(sys.argv[1:])
