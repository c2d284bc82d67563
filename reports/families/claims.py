"""The claims of the adapter-family literature, tested on the committed family comparisons: for each pair of arms,
exact match of both (Wilson 95% intervals over the test questions), held-out loss, and McNemar's exact test on the
same questions (from each arm's predictions.csv, scored with the tool's own answer scorer). Writes claims.md.

    python reports/families/claims.py
"""
import functools
from pathlib import Path

import numpy as np
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
    # Runs beside the main one ("FOLDER/ARM"): prompt and prefix tuning swept over rates of their own (arithmetic),
    # FFN and attention LoRA at one fixed rate (math), where the 5-step sweep chose 1e-2 for both
    ("prefix tuning at its own rates (sweep up to 3e-1) against all-linear LoRA", "arith-prompts/prefix:len10", "all-linear"),
    ("prompt tuning at its own rates (sweep up to 3e-1) against the untrained model", "arith-prompts/prompt:len10", "base"),
    ("prefix tuning at its own rates against the untrained model", "arith-prompts/prefix:len10", "base"),
    ("FFN LoRA beats attention LoRA, both at lr 3e-3", "math-fixed-lr/ffn", "math-fixed-lr/attn-qv"),
]


def correct(path: Path) -> list[bool]:
    frame = pd.read_csv(path, keep_default_na=False)
    kind = answers.answer_kind([str(a) for a in frame["answer"]])
    return [answers.is_correct(str(o), str(a), kind) for o, a in zip(frame["output"], frame["answer"])]


def locate(run: Path, label: str) -> tuple[Path, str]:
    """(run folder, arm) of a claim's arm: ARM in the task's main run, FOLDER/ARM in a run beside it."""
    folder, _, arm = label.rpartition("/")
    return (HERE / folder if folder else run), arm


@functools.cache
def comparison(folder: Path) -> pd.DataFrame | None:
    """A run's comparison.csv indexed by arm, read once; None when the run has not written it."""
    path = folder / "comparison.csv"
    return pd.read_csv(path).set_index("arm") if path.is_file() else None


def row(run: Path, label: str) -> pd.Series | None:
    """The arm's row of its run's comparison.csv, or None when that run or arm is not there."""
    folder, arm = locate(run, label)
    table = comparison(folder)
    if table is None or arm not in table.index or not predictions(run, label).is_file():
        return None
    return table.loc[arm]


def predictions(run: Path, label: str) -> Path:
    """An arm's predictions.csv (seed 0's with several seeds); the untrained model's for `base`."""
    run, label = locate(run, label)
    if label == "base":
        return run / "base_predictions.csv"
    folder = run / "arms" / label.replace(":", "-")
    return (folder / "seed-0" if (folder / "seed-0").is_dir() else folder) / "predictions.csv"


def same_questions(a: Path, b: Path) -> bool:
    prompts = [list(pd.read_csv(path, keep_default_na=False)["prompt"]) for path in (a, b)]
    return prompts[0] == prompts[1]


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


def seed_correctness(run: Path, label: str, seeds: int) -> np.ndarray:
    """Per seed and question, whether the arm answered right (seeds x questions; the untrained model's one row
    stands for every seed, as it has no seed to vary)."""
    folder = run / "arms" / label.replace(":", "-")
    paths = sorted(folder.glob("seed-*/predictions.csv")) if label != "base" else [run / "base_predictions.csv"]
    grid = np.array([correct(path) for path in paths], dtype=float)
    return np.repeat(grid, seeds, axis=0) if label == "base" else grid


def seeds_section(run: Path) -> list[str]:
    """The claims again on the three-seed run: exact match as its mean over seeds with the t interval of
    comparison.csv; a - b as the mean difference with the t interval of the seeds' differences, its seed-level
    paired t-test (the primary test at three seeds) and the crossed bootstrap over seeds and questions."""
    table = comparison(run)
    if table is None:
        return []

    def em_seeds(label: str) -> str:
        if label == "base":
            return em(correct(run / "base_predictions.csv"))
        r = table.loc[label]
        return f"{100 * r['exact_match']:.1f}% [{100 * r['exact_match_lo']:.1f}, {100 * r['exact_match_hi']:.1f}]"

    seeds = int(table["seeds"].max())
    lines = ["## arithmetic, three seeds", "", "Exact match: mean over seeds 0-2 with the t 95% interval over seeds; "
             "a - b: mean difference in points with the t 95% interval of the three seeds' differences (seed k of "
             "a against seed k of b); p (t): the seed-level paired t-test, the primary test at three seeds; p (boot): "
             "the crossed bootstrap over seeds and questions (2000 resamples, the same draws for both arms, p floored "
             "at 1/2001), which three seeds make optimistic.", "",
             "| claim | arm a | params | exact match a | arm b | params | exact match b | a - b [95%] | p (t) | "
             "p (boot) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for claim, a, b in CLAIMS:
        if "/" in a + b or a not in table.index or b not in table.index:
            continue
        diff = stats.pair_tests(seed_correctness(run, a, seeds), seed_correctness(run, b, seeds), binary=True)
        boot = "<0.001" if diff["p2"] < 0.001 else f"{diff['p2']:.2g}"
        lines.append(f"| {claim} | {a} | {int(table.loc[a, 'trainable_params'] or 0):,} | {em_seeds(a)} | {b} | "
                     f"{int(table.loc[b, 'trainable_params'] or 0):,} | {em_seeds(b)} | {100 * diff['diff']:+.1f} "
                     f"[{100 * diff['diff_lo']:+.1f}, {100 * diff['diff_hi']:+.1f}] | {diff['p']:.2g} | {boot} |")
    return lines + [""]


def main() -> None:
    lines = ["# Family claims on the embedded model", "",
             "Made by `python reports/families/claims.py` from the committed `predictions.csv` files. Exact match "
             "with Wilson 95% intervals over the test questions; p: McNemar's exact test on the same questions "
             "(two-sided); a/b right only: questions only that arm answered right.", ""]
    for task, run in RUNS.items():
        table = comparison(run)
        if table is None:
            continue
        lines += [f"## {task}", "", "| claim | arm a | params | exact match a | arm b | params | exact match b | "
                  "loss a / b | a / b right only | p |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for claim, a, b in CLAIMS:
            ra, rb = row(run, a), row(run, b)
            if ra is None or rb is None:
                continue
            if not (same_questions(predictions(run, a), predictions(run, b))
                    and same_questions(predictions(run, a), run / "base_predictions.csv")):
                continue  # a claim of the other task's runs
            ca, cb = correct(predictions(run, a)), correct(predictions(run, b))
            only_a = sum(x and not y for x, y in zip(ca, cb))
            only_b = sum(y and not x for x, y in zip(ca, cb))
            p = stats.mcnemar(only_a, only_b)
            lines.append(f"| {claim} | {a} | {int(ra['trainable_params'] or 0):,} | {em(ca)} | {b} | "
                         f"{int(rb['trainable_params'] or 0):,} | {em(cb)} | {ra['eval_loss']:.3f} / "
                         f"{rb['eval_loss']:.3f} | {only_a} / {only_b} | {p:.2g} |")
        lines.append("")
        if (run / "arms").is_dir() and "math" in task:
            lines += per_set(run, table)
    lines += seeds_section(HERE / "arith-seeds")
    (HERE / "claims.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
