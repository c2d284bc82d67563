"""Train several placements on the same task and tabulate them: the claim under test is that one LoRA on the
dominant site matches LoRA on every linear layer at a small fraction of its trainable parameters.

Every arm is a plan. Every arm trains on the same examples in the same order, for the same steps, from the same
seed, under the trainer's one rule; with a learning-rate sweep each arm gets the rate with the lowest validation
loss from the same grid. Test examples are never seen by training or by the sweep.
"""
from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..errors import PlacementError
from ..outputs import write_csv, write_json, write_text
from ..plan.plan import Plan
from ..plan.strategies import Arm, arm_strategy, check_arms, parse_arms, selector_k  # noqa: F401
from ..report.figures import loss_curves
from ..train import evaluate as ev
from ..train.run import finish_run
from ..train.trainer import TrainSettings, train

SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
TABLE_COLUMNS = ["arm", "sites", "r", "trainable_params", "params_pct", "lr", "eval_loss", "val_loss",
                 "exact_match", "balanced_accuracy", "sec_per_step", "peak_mem_mb", "train_loss_last"]


def arm_plan(arm: Arm, base: Plan, model, default_k: int, seed: int = 0) -> Plan:
    plan = base.with_strategy(arm_strategy(arm, model, default_k, seed), r=arm.r)
    plan.strategy["label"] = arm.label
    return plan


@dataclass
class CompareSettings:
    arms: list[Arm]
    train: TrainSettings = field(default_factory=TrainSettings)
    lr_sweep: bool = False
    sweep_arms: list[str] | None = None  # labels; None sweeps every arm
    lrs: tuple[float, ...] = SWEEP_LRS
    eval_batch_size: int = 16
    max_new_tokens: int = 32

    def sweeps(self, arm: Arm) -> bool:
        return self.lr_sweep and (self.sweep_arms is None or arm.label in self.sweep_arms)


@dataclass
class Comparison:
    table: pd.DataFrame
    curves: dict[str, list[float]]
    kind: str | None

    def markdown(self) -> str:
        return formatted_table(self.table).to_markdown(index=False)


def formatted_table(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table as people read it (percentages, thousands separators, few decimals): the CLI, the
    markdown file and the HTML report all show this form."""
    shown = table.copy()
    blank = lambda fmt: (lambda v: "" if pd.isna(v) else fmt(v))  # noqa: E731
    percent = blank(lambda v: f"{100 * v:.1f}%")
    formats = {
        "exact_match": percent, "balanced_accuracy": percent, "params_pct": blank(lambda v: f"{v:.2f}%"),
        "trainable_params": blank(lambda v: f"{int(v):,}"), "lr": blank(lambda v: f"{v:g}"),
        "eval_loss": blank(lambda v: f"{v:.3f}"), "val_loss": blank(lambda v: f"{v:.3f}"),
        "train_loss_last": blank(lambda v: f"{v:.3f}"), "sec_per_step": blank(lambda v: f"{v:.2f}"),
        "peak_mem_mb": blank(lambda v: f"{v:.0f}"), "sites": blank(lambda v: f"{int(v)}"),
        "r": blank(lambda v: f"{int(v)}"),
    }
    for column, fmt in formats.items():
        if column in shown.columns:
            shown[column] = shown[column].map(fmt)
    return shown


def _row(label: str, **values) -> dict:
    return {c: values.get(c, float("nan")) for c in TABLE_COLUMNS} | {"arm": label}


def _train_arm(model, tokenizer, plan: Plan, arm: Arm, splits, settings: CompareSettings, progress: bool):
    """Train one arm (once, or once per rate of the sweep) and return the run with the lowest validation loss."""
    train_set, val_set, _ = splits
    rates = settings.lrs if settings.sweeps(arm) else (settings.train.lr,)
    best, best_val, history = None, math.inf, []
    for lr in rates:
        run = train(copy.deepcopy(model), tokenizer, plan, train_set, replace(settings.train, lr=lr, save_every=0),
                    progress=progress)
        val_loss = (ev.mean_loss(run.model, tokenizer, val_set, batch_size=settings.eval_batch_size,
                                 max_length=settings.train.max_length) if val_set else float("nan"))
        history.append({"lr": lr, "val_loss": val_loss})
        if best is None or val_loss < best_val:
            best, best_val = run, val_loss
        del run
        gc.collect()
    best.extra.update(val_loss=best_val if best_val < math.inf else float("nan"), sweep=history)
    return best


def run_compare(model, tokenizer, base: Plan, splits, settings: CompareSettings, out: str | Path,
                progress: bool = False, log=print) -> Comparison:
    """Evaluate the base model, a majority answer where it applies, and every arm; write each arm's adapter, metrics
    and predictions under `out/arms/`. `report.write_comparison` writes the table and the curves."""
    out = Path(out)
    train_set, val_set, test_set = splits
    kind = ev.task_kind(test_set)
    eval_kwargs = dict(kind=kind, batch_size=settings.eval_batch_size, max_length=settings.train.max_length,
                       max_new_tokens=settings.max_new_tokens, progress=progress)
    full = base.all_linear_params()
    rows, curves = [], {}

    base_eval = ev.evaluate(model, tokenizer, test_set, **eval_kwargs)
    rows.append(_row("base", eval_loss=base_eval.eval_loss, exact_match=base_eval.exact_match,
                     balanced_accuracy=base_eval.balanced_accuracy, trainable_params=0, params_pct=0.0, sites=0,
                     val_loss=ev.mean_loss(model, tokenizer, val_set, batch_size=settings.eval_batch_size,
                                           max_length=settings.train.max_length) if val_set else float("nan")))
    write_csv(out / "base_predictions.csv", ev.predictions_frame(test_set, base_eval))
    log(f"base: eval loss {base_eval.eval_loss:.3f}" + _em_text(base_eval))
    if kind in ("boolean", "choice"):
        majority = ev.majority_baseline(train_set, test_set, kind)
        rows.append(_row("majority", exact_match=majority.exact_match, balanced_accuracy=majority.balanced_accuracy,
                         trainable_params=0, params_pct=0.0, sites=0))

    default_k = selector_k(settings.arms)
    for arm in tqdm(settings.arms, desc="arms", disable=not progress):
        plan = arm_plan(arm, base, model, default_k, seed=settings.train.seed)
        run = _train_arm(model, tokenizer, plan, arm, splits, settings, progress)
        result, _ = finish_run(run, plan, tokenizer, test_set, out / "arms" / arm.label.replace(":", "-"),
                               eval_kwargs=eval_kwargs, model_name=base.model.get("name"),
                               extra={"val_loss": run.extra["val_loss"],
                                      "lr_sweep": run.extra["sweep"] if settings.sweeps(arm) else None})
        rows.append(_row(arm.label, sites=len(plan.targets), r=plan.peft["r"], trainable_params=run.trainable_params,
                         params_pct=100 * run.trainable_params / full, lr=run.settings.lr, eval_loss=result.eval_loss,
                         val_loss=run.extra["val_loss"], exact_match=result.exact_match,
                         balanced_accuracy=result.balanced_accuracy, sec_per_step=run.sec_per_step,
                         peak_mem_mb=run.peak_mem_mb, train_loss_last=run.losses[-1]))
        curves[arm.label] = run.losses
        log(f"{arm.label}: {run.trainable_params:,} params, lr {run.settings.lr:g}, "
            f"eval loss {result.eval_loss:.3f}" + _em_text(result) + f", {run.sec_per_step:.2f} s/step")
        del run
        gc.collect()

    return Comparison(pd.DataFrame(rows, columns=TABLE_COLUMNS), curves, kind)


def _em_text(evaluation: ev.Evaluation) -> str:
    if evaluation.exact_match is None:
        return ""
    text = f", exact match {100 * evaluation.exact_match:.1f}%"
    if evaluation.balanced_accuracy is not None:
        text += f" (balanced {100 * evaluation.balanced_accuracy:.1f}%)"
    return text


def compare_inputs(arms: str, splits, lr_sweep: bool, sweep_arms: str | None, scores: str | None,
                   max_new_tokens: int) -> tuple[list[Arm], list[str] | None, Plan | None]:
    """Everything about a comparison that can be wrong without a model, checked before any loading:
    (arms, the arms to sweep, the given profile's plan or None)."""
    parsed = parse_arms(arms)
    if max_new_tokens < 1:
        raise PlacementError(f"--max-new-tokens {max_new_tokens} generates nothing: pass a positive number such as 32")
    if lr_sweep and not splits[1]:
        raise PlacementError("--lr-sweep needs a validation split: pass --validation N with N > 0")
    swept = [a.strip() for a in sweep_arms.split(",") if a.strip()] if sweep_arms else None
    unknown = [a for a in swept or [] if a not in {p.label for p in parsed}]
    if unknown:
        raise PlacementError(f"--sweep-arms names '{unknown[0]}', which is not in --arms: sweep arms of the comparison")
    return parsed, swept, (Plan.load(scores) if scores else None)


def run_comparison(model, tokenizer, source, data: str, splits, settings: CompareSettings, out: str | Path, *,
                   base: Plan | None, probe_settings, batches: int, progress: bool = False, log=print):
    """The compare study: probe on the training split (or use the given profile's plan), train and evaluate every
    arm, write the table and the curves. Returns (Comparison, the plan the arms were made from)."""
    from .profile import run_profile, write_profile

    check_arms(settings.arms, model)  # before the probe: an arm this model cannot give fails in seconds
    if base is not None:
        base.check(model)
    else:
        profile = run_profile(model, tokenizer, source, data, batches=batches, batch_size=settings.train.batch_size,
                              max_length=settings.train.max_length, settings=probe_settings, progress=progress,
                              examples=splits[0])
        write_profile(profile, Path(out) / "profile", title=f"{source.name} on {data}: page")
        base = profile.plan
    comparison = run_compare(model, tokenizer, base, splits, settings, out, progress=progress, log=log)
    write_comparison(comparison, out, title=f"{source.name} on {data}")
    return comparison, base


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
    write_text(out / "comparison.md", (f"# {title}\n\n" if title else "") + comparison.markdown() + "\n")
    write_json(out / "comparison.json", ({"kind": comparison.kind, "rows": comparison.table.to_dict("records"),
                                                  "curves": comparison.curves}))
    loss_curves(comparison.curves, comparison.table, out / "curves.png", title=title)
    return [out / n for n in ("comparison.csv", "comparison.md", "comparison.json", "curves.png")]
