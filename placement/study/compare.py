"""Train several placements on the same task and tabulate them: the claim under test is that one LoRA on the
dominant site matches LoRA on every linear layer at a small fraction of its trainable parameters.

Every arm is a plan. Every arm trains on the same examples in the same order, for the same steps, from the same
seed, under the trainer's one rule; with a learning-rate sweep each arm gets the rate with the lowest validation
loss from the same grid. Test examples are never seen by training or by the sweep.
"""
from __future__ import annotations

import copy
import gc
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as st
from tqdm.auto import tqdm

from ..errors import PlacementError
from ..outputs import write_csv, write_json, write_text
from ..families import lora
from ..families.prompts import DEFAULT_LENGTH, PROMPT_FAMILIES
from ..plan.plan import Plan, prompt_plan
from ..plan.strategies import (Arm, arm_family, arm_strategy, check_arms, parse_arms, ranked_family,  # noqa: F401
                               read_spectrum, selector_k)
from ..report.figures import loss_curves
from ..train import evaluate as ev
from ..train.run import finish_run
from ..train.trainer import TrainError, TrainSettings, data_fingerprint, fingerprint, plan_fingerprint, train
from . import stats

SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
TABLE_COLUMNS = ["arm", "family", "sites", "r", "trainable_params", "params_pct", "lr", "lr_at_edge", "seeds", "eval_loss",
                 "eval_loss_lo", "eval_loss_hi", "val_loss", "exact_match", "exact_match_lo", "exact_match_hi",
                 "balanced_accuracy", "p_exact_match", "p_eval_loss", "sec_per_step", "peak_mem_mb", "train_loss_last"]


def arm_plan(arm: Arm, base: Plan, model, default_k: int, seed: int = 0, spectrum: dict | None = None,
             family_ranking: dict[str, list[str]] | None = None) -> Plan:
    family = arm_family(arm)
    if family in PROMPT_FAMILIES:  # no linear sites to pick: the family reaches the embedding or whole blocks
        return prompt_plan(base, model, family, arm.size or DEFAULT_LENGTH, arm.k, label=arm.label)
    r = arm.r or base.peft["r"]
    full = sum(lora.lora_params(site, r) for site in base.sites)  # all-linear at the arm's rank: budgets' yardstick
    strategy = arm_strategy(arm, model, default_k, seed, all_linear_params=full, spectrum=spectrum, rows=base.sites,
                            family_ranking=family_ranking)
    plan = base.with_strategy(strategy, r=arm.r).with_variant(arm.variant).with_family(family, arm.size)
    plan.strategy["label"] = arm.label
    return plan


@dataclass
class CompareSettings:
    # Fields with a "help" are command-line options too (placement/cli_settings.py builds them; "{arms}" is the
    # arm grammar's help); resume arrives from the run's --resume.
    arms: list[Arm] = field(default_factory=lambda: parse_arms("dominant,all-linear,attn-qv,ffn,last-2,random-1,"
                                                               "top-4"), metadata={
        "help": "comma-separated: {arms}", "show": lambda arms: ",".join(arm.label for arm in arms)})
    train: TrainSettings = field(default_factory=TrainSettings)
    lr_sweep: bool = field(default=False, metadata={
        "help": "sweep 1e-4 .. 1e-2 per arm on seed 0 by validation loss (one step past an edge)"})
    sweep_arms: list[str] | None = field(default=None, metadata={  # labels; None sweeps every arm
        "help": "comma-separated arms to sweep (default: all)"})
    lrs: tuple[float, ...] = field(default=SWEEP_LRS, metadata={
        "help": "comma-separated rates for --lr-sweep instead of 1e-4 .. 1e-2", "option": "--lr-grid",
        "show": lambda lrs: None if tuple(lrs) == SWEEP_LRS else ",".join(map(str, lrs))})
    eval_batch_size: int = 16
    max_new_tokens: int = field(default=32, metadata={
        "help": "generation length for exact match", "range": (1, 2 ** 16)})
    seeds: int = field(default=1, metadata={  # each arm trained with seeds 0 .. seeds-1 (data order and lora_A)
        "help": "seeds per arm (data order and lora_A); intervals over seeds, else over test questions",
        "range": (1, 10 ** 4)})
    sweep_steps: int | None = field(default=None, metadata={  # None: the training's
        "help": "steps of each sweep run (default: --steps)", "range": (1, 10 ** 9)})
    resume: bool = False  # keep the arms an earlier run of the same settings finished

    def __post_init__(self) -> None:
        self.check()

    def val_loss(self, model, tokenizer, val_set: list) -> float:
        """Held-out loss on the validation split (NaN without one): what the sweep and the table judge by."""
        if not val_set:
            return float("nan")
        return ev.mean_loss(model, tokenizer, val_set, batch_size=self.eval_batch_size,
                            max_length=self.train.max_length)

    def sweeps(self, arm: Arm) -> bool:
        return self.lr_sweep and (self.sweep_arms is None or arm.label in self.sweep_arms)

    def check(self) -> None:
        if self.seeds < 1:
            raise PlacementError(f"--seeds {self.seeds} trains nothing: pass 1 or more")
        if self.sweep_steps is not None and self.sweep_steps < 1:
            raise PlacementError(f"--sweep-steps {self.sweep_steps} trains nothing: pass 1 or more")
        bad = [lr for lr in self.lrs if not (lr > 0 and math.isfinite(lr))]
        if bad:
            raise PlacementError(f"the learning-rate grid holds {bad[0]}: every rate must be positive")
        twice = sorted({lr for lr in self.lrs if list(self.lrs).count(lr) > 1})
        if twice:
            raise PlacementError(f"the learning-rate grid holds {twice[0]:g} twice: list each rate once")
        if not self.lr_sweep and (self.sweep_arms is not None or tuple(self.lrs) != SWEEP_LRS):
            given = "--sweep-arms" if self.sweep_arms is not None else "--lr-grid"
            raise PlacementError(f"{given} only shapes the learning-rate sweep: add --lr-sweep, or drop {given}")
        for arm in self.arms:
            length = arm.size or DEFAULT_LENGTH
            if arm_family(arm) in PROMPT_FAMILIES and length > self.train.max_length:
                raise PlacementError(f"arm '{arm.label}' adds {length} virtual tokens, longer than --max-length "
                                     f"{self.train.max_length}: pass a shorter :lenN")


@dataclass
class Comparison:
    table: pd.DataFrame
    curves: dict[str, list[float]]
    kind: str | None

    def markdown(self) -> str:
        return formatted_table(self.table).to_markdown(index=False)


def formatted_table(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table as people read it: percentages, thousands separators, few decimals, each quality
    figure with its 95% interval, and the p-values against the first arm marked "n.s." at or above 0.05. The CLI,
    the markdown file and the HTML report all show this form."""
    def value(v, fmt):
        return "" if v is None or pd.isna(v) else fmt(v)

    def with_interval(row, name, fmt):
        shown = value(row[name], fmt)
        lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
        return shown + (f" [{fmt(lo)}, {fmt(hi)}]" if shown and pd.notna(lo) and pd.notna(hi) else "")

    def p_value(v):  # a bootstrap of 2000 resamples cannot tell p below 0.001 apart from 0
        return value(v, lambda p: ("<0.001" if p < 0.001 else f"{p:.3g}") + (" n.s." if p >= 0.05 else ""))

    percent, loss = (lambda v: f"{100 * v:.1f}%"), (lambda v: f"{v:.3f}")
    rows = []
    for _, row in table.iterrows():
        rows.append({
            "arm": row["arm"], "family": value(row.get("family"), str),
            "sites": value(row["sites"], lambda v: f"{int(v)}"),
            "r": value(row["r"], lambda v: f"{int(v)}"),
            "trainable params": value(row["trainable_params"], lambda v: f"{int(v):,}"),
            "of all-linear": value(row["params_pct"], lambda v: f"{v:.2f}%"),
            "lr": value(row["lr"], lambda v: f"{v:g}") + (" (edge)" if row.get("lr_at_edge") in (True,) else ""),
            "seeds": value(row.get("seeds"), lambda v: f"{int(v)}"),
            "held-out loss [95%]": with_interval(row, "eval_loss", loss),
            "p loss": p_value(row.get("p_eval_loss")),
            "exact match [95%]": with_interval(row, "exact_match", percent),
            "p exact": p_value(row.get("p_exact_match")),
            "balanced acc.": value(row["balanced_accuracy"], percent),
            "val loss": value(row["val_loss"], loss), "s/step": value(row["sec_per_step"], lambda v: f"{v:.2f}"),
            "peak MiB": value(row["peak_mem_mb"], lambda v: f"{v:.0f}"),
        })
    shown = pd.DataFrame(rows)
    if set(shown["family"]) <= {"", "lora"}:  # a comparison of LoRA placements alone needs no family column
        shown = shown.drop(columns="family")
    # columns with nothing to show (no answers, no balanced accuracy, one arm without tests) are left out
    return shown[[c for c in shown.columns if c == "arm" or (shown[c] != "").any()]]


def _row(label: str, **values) -> dict:
    return {c: values.get(c, float("nan")) for c in TABLE_COLUMNS} | {"arm": label}


def choose_lr(model, tokenizer, plan: Plan, splits, settings: CompareSettings, progress: bool = False):
    """The sweep: every rate of the grid on seed 0 for `sweep_steps`, judged by validation loss; when the best sits
    at an edge of the grid, one more rate a grid step past it. Returns (rate, history, best was at an edge)."""
    train_set, val_set, _ = splits
    grid = sorted(settings.lrs)
    steps = settings.sweep_steps or settings.train.steps

    def val_at(lr: float) -> float:
        try:
            run = train(copy.deepcopy(model), tokenizer, plan, train_set,
                        replace(settings.train, lr=lr, steps=steps, seed=0, save_every=0), progress=progress)
        except TrainError:  # a rate that diverges is simply a bad rate
            return math.inf
        loss = settings.val_loss(run.model, tokenizer, val_set)
        del run
        gc.collect()
        return loss

    history = {lr: val_at(lr) for lr in grid}
    best = min(history, key=history.get)
    at_edge = len(grid) > 1 and best in (grid[0], grid[-1])
    if at_edge:
        past = best / (grid[1] / grid[0]) if best == grid[0] else best * (grid[-1] / grid[-2])
        history[past] = val_at(past)
        best = min(history, key=history.get)
    return best, [{"lr": lr, "val_loss": v} for lr, v in sorted(history.items())], at_edge


@dataclass
class ArmRun:
    """One arm trained with one seed, as its folder records it."""

    metrics: dict
    predictions: pd.DataFrame
    losses: list[float]


def _arm_key(plan: Plan, settings: CompareSettings, arm: Arm, seed: int, splits) -> str:
    """What an arm's result depends on; an earlier run with the same key is kept by --resume."""
    train_set, _, test_set = splits
    return fingerprint({"plan": plan_fingerprint(plan), "train": asdict(replace(settings.train, seed=seed)),
                        "sweep": [sorted(settings.lrs), settings.sweep_steps] if settings.sweeps(arm) else None,
                        "train_data": data_fingerprint(train_set), "test_data": data_fingerprint(test_set),
                        "max_new_tokens": settings.max_new_tokens})


def _finished(folder: Path, key: str) -> ArmRun | None:
    """An arm's earlier result in `folder`, when its key matches and its files are whole."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        if metrics.get("compare_key") != key:
            return None
        return ArmRun(metrics, pd.read_csv(folder / "predictions.csv"), list(pd.read_csv(folder / "loss.csv")["loss"]))
    except (OSError, ValueError, KeyError):
        return None


def _train_seed(model, tokenizer, plan, seed, lr, splits, settings, folder, eval_kwargs, model_name, extra,
                progress) -> ArmRun:
    train_set, val_set, test_set = splits
    run = train(copy.deepcopy(model), tokenizer, plan, train_set,
                replace(settings.train, lr=lr, seed=seed, save_every=0), progress=progress)
    val_loss = settings.val_loss(run.model, tokenizer, val_set)
    result, metrics = finish_run(run, plan, tokenizer, test_set, folder, eval_kwargs=eval_kwargs,
                                 model_name=model_name, extra=extra | {"val_loss": val_loss, "seed": seed})
    arm_run = ArmRun(metrics, ev.predictions_frame(test_set, result), list(run.losses))
    del run
    gc.collect()
    return arm_run


def train_arm(model, tokenizer, plan: Plan, arm: Arm, splits, settings: CompareSettings, folder: Path,
              eval_kwargs: dict, model_name: str | None, progress: bool = False, log=print) -> list[ArmRun]:
    """One arm with every seed: the rate from the sweep (or --lr), each seed trained, evaluated and written to its
    folder (OUT/arms/ARM, or OUT/arms/ARM/seed-K with several seeds); finished seeds are kept with --resume."""
    folders = [folder] if settings.seeds == 1 else [folder / f"seed-{k}" for k in range(settings.seeds)]
    keys = [_arm_key(plan, settings, arm, seed, splits) for seed in range(settings.seeds)]
    done = [_finished(f, k) if settings.resume else None for f, k in zip(folders, keys)]
    kept = next((d for d in done if d is not None), None)
    if kept is not None:
        lr, history, at_edge = kept.metrics["lr"], kept.metrics.get("lr_sweep"), kept.metrics.get("lr_at_edge")
    elif settings.sweeps(arm):
        lr, history, at_edge = choose_lr(model, tokenizer, plan, splits, settings, progress)
    else:
        lr, history, at_edge = settings.train.lr, None, None
    runs = []
    for seed, (sub, key, previous) in enumerate(zip(folders, keys, done)):
        if previous is not None:
            log(f"{arm.label}, seed {seed}: kept from the earlier run")
            runs.append(previous)
            continue
        extra = {"compare_key": key, "lr_sweep": history, "lr_at_edge": at_edge}
        runs.append(_train_seed(model, tokenizer, plan, seed, lr, splits, settings, sub, eval_kwargs,
                                model_name, extra, progress))
    return runs


def run_compare(model, tokenizer, base: Plan, splits, settings: CompareSettings, out: str | Path,
                progress: bool = False, log=print, spectrum: dict | None = None,
                family_ranking: dict[str, list[str]] | None = None) -> Comparison:
    """Evaluate the base model, a majority answer where it applies, and every arm; write each arm's adapter, metrics
    and predictions under `out/arms/`. `report.write_comparison` writes the table and the curves."""
    out = Path(out)
    train_set, val_set, test_set = splits
    kind = ev.task_kind(test_set)
    eval_kwargs = dict(kind=kind, batch_size=settings.eval_batch_size, max_length=settings.train.max_length,
                       max_new_tokens=settings.max_new_tokens, progress=progress)
    full = base.all_linear_params()
    rows, curves = [], {}

    settings.check()
    base_eval = ev.evaluate(model, tokenizer, test_set, **eval_kwargs)
    base_ci = _intervals([ev.predictions_frame(test_set, base_eval)], [base_eval.eval_loss], [base_eval.exact_match])
    rows.append(_row("base", eval_loss=base_eval.eval_loss, exact_match=base_eval.exact_match, **base_ci,
                     balanced_accuracy=base_eval.balanced_accuracy, trainable_params=0, params_pct=0.0, sites=0,
                     val_loss=settings.val_loss(model, tokenizer, val_set)))
    write_csv(out / "base_predictions.csv", ev.predictions_frame(test_set, base_eval))
    log(f"base: eval loss {base_eval.eval_loss:.3f}" + _em_text(base_eval))
    if kind in ("boolean", "choice"):
        majority = ev.majority_baseline(train_set, test_set, kind)
        rows.append(_row("majority", exact_match=majority.exact_match, balanced_accuracy=majority.balanced_accuracy,
                         trainable_params=0, params_pct=0.0, sites=0))

    default_k = selector_k(settings.arms)
    first: list[ArmRun] | None = None
    for arm in tqdm(settings.arms, desc="arms", disable=not progress):
        plan = arm_plan(arm, base, model, default_k, seed=settings.train.seed, spectrum=spectrum,
                        family_ranking=family_ranking)
        runs = train_arm(model, tokenizer, plan, arm, splits, settings, out / "arms" / arm.label.replace(":", "-"),
                         eval_kwargs, base.model.get("name"), progress, log)
        row = _arm_row(arm, plan, runs, full, first, settings.train.seed)
        first = first or runs
        rows.append(row)
        curves[arm.label] = runs[0].losses
        log(f"{arm.label}: {row['trainable_params']:,} params, lr {row['lr']:g}, eval loss {row['eval_loss']:.3f}"
            + ("" if pd.isna(row["exact_match"]) else f", exact match {100 * row['exact_match']:.1f}%")
            + f", {row['sec_per_step']:.2f} s/step")

    return Comparison(pd.DataFrame(rows, columns=TABLE_COLUMNS), curves, kind)


def _intervals(predictions: list[pd.DataFrame], losses: list[float], ems: list) -> dict:
    """95% intervals of held-out loss and exact match: over seeds (t) with several, else over test questions
    (Wilson for exact match, a bootstrap of the per-question loss). A t interval over a few spread-out seeds can
    reach past what the measure can take (below 0% exact match), so it is clipped to the measure's range."""
    out = {}
    if len(losses) > 1:
        for name, values, top in (("eval_loss", losses, np.inf), ("exact_match", ems, 1.0)):
            values = np.array([v for v in values if v is not None and pd.notna(v)], dtype=float)
            if len(values) > 1:
                half = st.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
                out[f"{name}_lo"], out[f"{name}_hi"] = max(values.mean() - half, 0.0), min(values.mean() + half, top)
        return out
    frame = predictions[0]
    if "correct" in frame and frame["correct"].notna().any():
        right = frame["correct"].astype(bool)
        out["exact_match_lo"], out["exact_match_hi"] = stats.wilson(int(right.sum()), len(right))
    if "loss" in frame and frame["loss"].notna().any():
        boot = stats.paired_bootstrap(frame["loss"], np.zeros(len(frame)))
        shift = losses[0] - boot["mean"]  # the interval of the per-question mean, centred on the token-weighted loss
        out["eval_loss_lo"], out["eval_loss_hi"] = boot["lo"] + shift, boot["hi"] + shift
    return out


def _per_question(runs: list[ArmRun], column: str) -> np.ndarray | None:
    """A per-question column averaged over seeds (None when the task does not score it)."""
    frames = [r.predictions[column] for r in runs if column in r.predictions and r.predictions[column].notna().any()]
    if not frames:
        return None
    return np.mean([f.astype(float).to_numpy() for f in frames], axis=0)


def paired_tests(runs: list[ArmRun], first: list[ArmRun], seed: int = 0) -> dict:
    """p-values against the first arm on the same test questions: McNemar's exact test on correctness with one
    seed, a paired bootstrap of seed-averaged correctness with several; a paired bootstrap of per-question loss."""
    out = {}
    mine, theirs = _per_question(runs, "correct"), _per_question(first, "correct")
    if mine is not None and theirs is not None:
        if len(runs) == 1 and len(first) == 1:
            out["p_exact_match"] = stats.mcnemar(int(((mine > 0.5) & (theirs < 0.5)).sum()),
                                                 int(((mine < 0.5) & (theirs > 0.5)).sum()))
        else:
            out["p_exact_match"] = stats.paired_bootstrap(mine, theirs, seed=seed)["p"]
    mine, theirs = _per_question(runs, "loss"), _per_question(first, "loss")
    if mine is not None and theirs is not None:
        out["p_eval_loss"] = stats.paired_bootstrap(mine, theirs, seed=seed)["p"]
    return out


def _arm_row(arm: Arm, plan: Plan, runs: list[ArmRun], full: int, first: list[ArmRun] | None, seed: int) -> dict:
    """An arm's row: means over seeds, intervals, the tests against the first arm, costs of seed 0."""
    metrics = [r.metrics for r in runs]

    def mean(key: str) -> float:
        values = [m.get(key) for m in metrics]
        return float(np.mean(values)) if all(v is not None for v in values) else float("nan")

    params = metrics[0]["trainable_params"]
    row = _row(arm.label, family=plan.family, sites=len(plan.targets),
               r=plan.peft["r"] if plan.family == "lora" else None,
               trainable_params=params,
               params_pct=100 * params / full, lr=metrics[0]["lr"], lr_at_edge=metrics[0].get("lr_at_edge"),
               seeds=len(runs), eval_loss=mean("eval_loss"), val_loss=mean("val_loss"), exact_match=mean("exact_match"),
               balanced_accuracy=mean("balanced_accuracy"), sec_per_step=metrics[0]["sec_per_step"],
               peak_mem_mb=metrics[0]["peak_mem_mb"], train_loss_last=mean("train_loss_last"))
    row |= _intervals([r.predictions for r in runs], [m["eval_loss"] for m in metrics],
                      [m.get("exact_match") for m in metrics])
    if first is not None:
        row |= paired_tests(runs, first, seed)
    return row


def _em_text(evaluation: ev.Evaluation) -> str:
    if evaluation.exact_match is None:
        return ""
    text = f", exact match {100 * evaluation.exact_match:.1f}%"
    if evaluation.balanced_accuracy is not None:
        text += f" (balanced {100 * evaluation.balanced_accuracy:.1f}%)"
    return text


def with_default_variant(arms: list[Arm], variant: str | None) -> list[Arm]:
    """`--variant` for the arms that name none, written into their labels (dominant -> dominant+dora)."""
    if variant is None:
        return arms
    lora.check_variant(variant)
    lora_arms = [a for a in arms if arm_family(a) == "lora"]
    if variant == "lora":
        return [replace(a, variant=a.variant or "lora") if a in lora_arms else a for a in arms]
    return [replace(a, variant=variant, label=f"{a.label}+{variant}") if a in lora_arms and not a.variant else a
            for a in arms]


def variant_note(labels) -> str:
    """What comparison.md says when an arm's LoRA starts elsewhere than the init the probe scored."""
    found = sorted({label.rsplit("+", 1)[1] for label in labels if "+" in label} & lora.INIT_DIFFERS)
    if not found:
        return ""
    return (f"The site ranking behind these arms assumes PEFT's default LoRA init (B = 0, A random); "
            f"{', '.join(found)} start elsewhere (DoRA also trains a magnitude from the first step), so for those "
            "arms the ranking came from the default init, not from their own.\n\n")


def parse_rates(text: str | None) -> tuple[float, ...]:
    """`--lr-grid 3e-2,1e-1,3e-1`: the rates the sweep tries (the default grid without one). Prompt and prefix
    tuning, for one, train best at rates far above LoRA's."""
    if not text:
        return SWEEP_LRS
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise PlacementError(f"--lr-grid '{text}' is not a comma-separated list of numbers: "
                             "pass e.g. 1e-3,3e-3,1e-2") from None
    if not rates:
        raise PlacementError("--lr-grid is empty: pass comma-separated rates such as 1e-3,3e-3,1e-2")
    return rates


def compare_inputs(arms: str, splits, lr_sweep: bool, sweep_arms: str | None, scores: str | None,
                   max_new_tokens: int, variant: str | None = None) -> tuple[list[Arm], list[str] | None, Plan | None]:
    """Everything about a comparison that can be wrong without a model, checked before any loading:
    (arms, the arms to sweep, the given profile's plan or None)."""
    parsed = with_default_variant(parse_arms(arms), variant)
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
                   base: Plan | None, probe_settings, batches: int, progress: bool = False, log=print,
                   scores_folder: str | Path | None = None):
    """The compare study: probe on the training split (or use the given profile's plan), train and evaluate every
    arm, write the table and the curves. Returns (Comparison, the plan the arms were made from)."""
    from .profile import SPECTRUM_K, run_profile, write_profile

    settings.check()
    check_arms(settings.arms, model)  # before the probe: an arm this model cannot give fails in seconds
    ranked = tuple(sorted({f for f in map(ranked_family, settings.arms) if f}))  # top-N arms of other families
    spectrum = family_ranking = None
    if base is not None:
        base.check(model)
        folder = Path(scores_folder) if scores_folder else None
        folder = folder.parent if folder is not None and folder.is_file() else folder
        spectrum = read_spectrum(folder) if folder else None
        family_ranking = read_family_ranking(folder) if folder else None
    else:
        if any(arm.strategy == "allocate" for arm in settings.arms) and not probe_settings.spectrum_k:
            probe_settings = replace(probe_settings, spectrum_k=SPECTRUM_K)  # allocate arms read the spectrum
        profile = run_profile(model, tokenizer, source, data, batches=batches, batch_size=settings.train.batch_size,
                              max_length=settings.train.max_length, settings=probe_settings, progress=progress,
                              examples=splits[0], families=("lora",) + ranked)
        write_profile(profile, Path(out) / "profile", title=f"{source.name} on {data}: page")
        base = profile.plan
        if profile.result.spectrum is not None:
            spectrum = dict(zip(profile.result.scores["site"], profile.result.spectrum))
        if profile.families is not None:
            family_ranking = family_rankings(profile.families)
    comparison = run_compare(model, tokenizer, base, splits, settings, out, progress=progress, log=log,
                             spectrum=spectrum, family_ranking=family_ranking)
    write_comparison(comparison, out, title=f"{source.name} on {data}")
    return comparison, base


def family_rankings(frame: pd.DataFrame) -> dict[str, list[str]]:
    """family -> its sites, best first by the family's own init-gradient score (family_scores.csv's rows)."""
    return {family: list(rows.sort_values("page", ascending=False, kind="stable")["site"])
            for family, rows in frame.groupby("family", sort=False)}


def read_family_ranking(folder: Path) -> dict[str, list[str]] | None:
    """A profile folder's family rankings (family_scores.csv), or None when it scored LoRA alone."""
    path = Path(folder) / "family_scores.csv"
    return family_rankings(pd.read_csv(path)) if path.is_file() else None


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
    write_text(out / "comparison.md", (f"# {title}\n\n" if title else "") + variant_note(comparison.table["arm"])
               + comparison.markdown() + "\n")
    write_json(out / "comparison.json", ({"kind": comparison.kind, "rows": comparison.table.to_dict("records"),
                                                  "curves": comparison.curves}))
    loss_curves(comparison.curves, comparison.table, out / "curves.png", title=title)
    return [out / n for n in ("comparison.csv", "comparison.md", "comparison.json", "curves.png")]
