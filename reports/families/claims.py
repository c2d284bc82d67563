"""The claims of the adapter-family literature, tested on the committed family comparisons: for each pair of arms,
exact match of both (Wilson 95% intervals over the test questions), held-out loss, and McNemar's exact test on the
same questions (from each arm's predictions.csv, scored with the tool's own answer scorer). Writes claims.md.

    python reports/families/claims.py
"""
from pathlib import Path

import pandas as pd

from placement.study import stats
from placement.train import answers

HERE = Path(__file__).parent
RUNS = {"arithmetic": HERE / "arith-compare", "math (AddSub, SingleEq, MultiArith held out)": HERE / "math-compare"}
CLAIMS = [  # (claim, arm a, arm b): "a beats b" is what the claim expects
    ("FFN LoRA beats attention LoRA", "ffn", "attn-qv"),
    ("more parameters help: all-linear r32 over r8", "all-linear:r32", "all-linear"),
    ("more parameters help: all-linear r8 over r2", "all-linear", "all-linear:r2"),
    ("more parameters help: ffn r32 over r8", "ffn:r32", "ffn"),
    ("a series bottleneck does well: against all-linear LoRA", "series-bn:rf16", "all-linear"),
    ("a parallel bottleneck does well: against all-linear LoRA", "parallel-bn:rf16", "all-linear"),
    ("a parallel bottleneck at all-linear's budget (reduction factor 55)", "parallel-bn:rf55", "all-linear"),
    ("IA3 is weak: all-linear LoRA over IA3", "all-linear", "ia3"),
    ("prefix tuning is weak: all-linear LoRA over prefix", "all-linear", "prefix:len10"),
    ("prefix tuning learns the task at all: prefix over the untrained model", "prefix:len10", "base"),
    ("prompt tuning against prefix tuning", "prompt:len10", "prefix:len10"),
    ("LLaMA-Adapter against IA3", "llama-adapter:len10", "ia3"),
    ("one LoRA on the dominant site against all-linear LoRA", "dominant", "all-linear"),
    ("training helps at all: all-linear LoRA over the untrained model", "all-linear", "base"),
]


def correct(path: Path) -> list[bool]:
    frame = pd.read_csv(path, keep_default_na=False)
    kind = answers.answer_kind([str(a) for a in frame["answer"]])
    return [answers.is_correct(str(o), str(a), kind) for o, a in zip(frame["output"], frame["answer"])]


def predictions(run: Path, label: str) -> Path:
    """An arm's predictions.csv (seed 0's with several seeds); the untrained model's for `base`."""
    if label == "base":
        return run / "base_predictions.csv"
    folder = run / "arms" / label.replace(":", "-")
    return (folder / "seed-0" if (folder / "seed-0").is_dir() else folder) / "predictions.csv"


def em(values: list[bool]) -> str:
    lo, hi = stats.wilson(sum(values), len(values))
    return f"{100 * sum(values) / len(values):.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def per_set(run: Path, table: pd.DataFrame) -> list[str]:
    """Exact match per math set (AddSub, SingleEq, MultiArith), joining each prediction to heldout.json's set."""
    import json

    sets = {r["instruction"].strip(): r["set"] for r in json.loads((HERE / "math" / "heldout.json").read_text())}
    rows = []
    for arm in [a for a in table.index if predictions(run, a).is_file()]:
        frame = pd.read_csv(predictions(run, arm), keep_default_na=False)
        frame["set"] = [sets.get(str(p).strip(), "?") for p in frame["prompt"]]
        frame["right"] = correct(predictions(run, arm))
        counts = frame.groupby("set")["right"].agg(["sum", "count"])
        rows.append("| " + arm + " | " + " | ".join(f"{int(counts.loc[s, 'sum'])} / {int(counts.loc[s, 'count'])}"
                                                  if s in counts.index else "" for s in ("AddSub", "SingleEq", "MultiArith")) + " |")
    return ["Right answers per set (of the test questions drawn from it):", "", "| arm | AddSub | SingleEq | MultiArith |",
            "| --- | --- | --- | --- |", *rows, ""]


def main() -> None:
    lines = ["# Family claims on the embedded model", "",
             "Made by `python reports/families/claims.py` from the committed `predictions.csv` files. Exact match "
             "with Wilson 95% intervals over the test questions; p: McNemar's exact test on the same questions "
             "(two-sided); a/b right only: questions only that arm answered right.", ""]
    for task, run in RUNS.items():
        if not (run / "comparison.csv").is_file():
            continue
        table = pd.read_csv(run / "comparison.csv").set_index("arm")
        lines += [f"## {task}", "", "| claim | arm a | params | exact match a | arm b | params | exact match b | "
                  "loss a / b | a / b right only | p |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for claim, a, b in CLAIMS:
            if a not in table.index or b not in table.index:
                continue
            ca, cb = correct(predictions(run, a)), correct(predictions(run, b))
            only_a = sum(x and not y for x, y in zip(ca, cb))
            only_b = sum(y and not x for x, y in zip(ca, cb))
            p = stats.mcnemar(only_a, only_b)
            lines.append(f"| {claim} | {a} | {int(table.loc[a, 'trainable_params']):,} | {em(ca)} | {b} | "
                         f"{int(table.loc[b, 'trainable_params'] or 0):,} | {em(cb)} | {table.loc[a, 'eval_loss']:.3f} / "
                         f"{table.loc[b, 'eval_loss']:.3f} | {only_a} / {only_b} | {p:.2g} |")
        lines.append("")
        if (run / "arms").is_dir() and "math" in task:
            lines += per_set(run, table)
    (HERE / "claims.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
