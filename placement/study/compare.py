"""Train several placements on the same task and tabulate them: the claim under test is that one LoRA on the
dominant site matches LoRA on every linear layer at a small fraction of its trainable parameters.

Every arm is a plan. Every arm trains on the same examples in the same order, for the same steps, from the same
seed, under the trainer's one rule; with a learning-rate sweep each arm gets the rate with the lowest validation
loss from the same grid. Test examples are never seen by training or by the sweep. The arms are read in `arms.py`,
the table is made and written in `tables.py`, its statistics come from `stats.py`.
"""
from __future__ import annotations

import copy
import gc
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..errors import PlacementError
from ..outputs import write_csv
from ..families import get_family
from ..plan.plan import Plan
from ..plan.strategies import Arm, arm_family, check_arms, parse_arms, ranked_family, read_spectrum, selector_k
from ..probe.settings import ProbeSettings
from ..train import evaluate as ev
from ..train.checkpoints import run_ledger
from ..train.run import finish_run
from ..train.trainer import TrainError, TrainSettings, data_fingerprint, fingerprint, plan_fingerprint, train
from .arms import (PlanArm, arm_folder, arm_kind, arm_plan, arm_plans, code_record, family_rankings,  # noqa: F401
                   read_arms, read_family_ranking, with_default_variant)
from .tables import (STEP_COLUMNS, STEP_VALUES, TABLE_COLUMNS, ArmRun, Comparison, arm_row,  # noqa: F401
                     demo_summary, em_text, formatted_table, notes, row, statistics, step_rows, variant_note,
                     write_comparison)

SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


@dataclass
class CompareSettings:
    # Fields with a "help" are command-line options too (placement/cli_settings.py builds them; "{arms}" is the
    # arm grammar's help); resume arrives from the run's --resume.
    arms: list[Arm] = field(default_factory=lambda: parse_arms("dominant,all-linear,attn-qv,ffn,last-2,random-1,"
                                                               "top-4"), metadata={
        "help": "comma-separated: {arms}", "show": lambda arms: ",".join(arm.label for arm in arms)})
    train: TrainSettings = field(default_factory=TrainSettings)
    plan_arms: tuple[str, ...] = field(default=(), metadata={  # LABEL=PATH, read into `arms` by compare_inputs
        "help": "a plan file trained as one more arm, named LABEL: LABEL=PATH (repeatable); a plan written by "
                "recommend is trained at the rate it was judged at unless the arm is swept",
        "option": "--plan-arm", "many": True})
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
    eval_at: tuple[int, ...] | None = field(default=None, metadata={
        "help": "comma-separated steps before --steps at which each run is also evaluated on the test split: a "
                "learning curve from one run per arm and seed (steps.csv, steps.png); with --schedule constant "
                "the adapter at step N is the one an N-step run ends with", "parse": lambda text: parse_steps(text),
        "show": lambda steps: None if not steps else ",".join(map(str, steps))})
    reference: str | None = field(default=None, metadata={
        "help": "the arm every other arm is tested against, listed first (default: the first of --arms); an arm "
                "label or a --plan-arm LABEL"})
    resume: bool = False  # keep the arms an earlier run of the same settings finished

    def __post_init__(self) -> None:
        self.check()

    def val_loss(self, model, tokenizer, val_set: list) -> float:
        """Held-out loss on the validation split (NaN without one): what the sweep and the table judge by."""
        if not val_set:
            return float("nan")
        return ev.mean_loss(model, tokenizer, val_set, batch_size=self.eval_batch_size,
                            max_length=self.train.max_length)

    def ordered_arms(self) -> list[Arm]:
        """The arms in training and table order: the reference first, the others as given."""
        first = [arm for arm in self.arms if arm.label == self.reference]
        return first + [arm for arm in self.arms if arm.label != self.reference]

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
        late = [s for s in self.eval_at or () if s >= self.train.steps]
        if late:
            raise PlacementError(f"--eval-at {late[0]} is not before the last step: the run is evaluated at --steps "
                                 f"{self.train.steps} anyway; pass earlier steps")
        labels = [arm.label for arm in self.arms]
        if self.reference is not None and self.reference not in labels:
            raise PlacementError(f"--reference {self.reference} is not an arm of this comparison: name one of "
                                 f"{', '.join(labels)}")
        for arm in self.arms:
            family = get_family(arm_family(arm))
            length = arm.size or (family.size.default if family.size else 0)
            if family.virtual and length > self.train.max_length:
                raise PlacementError(f"arm '{arm.label}' adds {length} virtual tokens, longer than --max-length "
                                     f"{self.train.max_length}: pass a shorter :lenN")


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


def _arm_key(plan: Plan, settings: CompareSettings, arm: Arm, seed: int, splits) -> str:
    """What an arm's result depends on; an earlier run with the same key is kept by --resume."""
    train_set, _, test_set = splits
    return fingerprint({"plan": plan_fingerprint(plan), "train": replace(settings.train, seed=seed).record(),
                        "sweep": [sorted(settings.lrs), settings.sweep_steps] if settings.sweeps(arm) else None,
                        "train_data": data_fingerprint(train_set), "test_data": data_fingerprint(test_set),
                        "max_new_tokens": settings.max_new_tokens}
                       | ({"plan_file": arm.digest} if isinstance(arm, PlanArm) else {})
                       | ({"arm_lr": own} if (own := _own_rate(arm)) is not None else {})
                       | ({"eval_at": sorted(settings.eval_at)} if settings.eval_at else {}))


def _own_rate(arm: Arm) -> float | None:
    """The rate an arm brings with it (a plan arm given one), which replaces --lr when the arm is not swept."""
    return getattr(arm, "lr", None)


def _finished(folder: Path, key: str) -> ArmRun | None:
    """An arm's earlier result in `folder`, when its key matches and its files are whole."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        if metrics.get("compare_key") != key:
            return None
        return ArmRun(metrics, pd.read_csv(folder / "predictions.csv"), list(pd.read_csv(folder / "loss.csv")["loss"]),
                      _read_milestones(folder, metrics.get("eval_at") or ()))
    except (OSError, ValueError, KeyError):
        return None


def _read_milestones(folder: Path, steps) -> dict[int, ArmRun]:
    """The evaluations an earlier run made before its last step (steps.csv and predictions-step-N.csv)."""
    if not steps:
        return {}
    table = pd.read_csv(folder / "steps.csv").set_index("step")
    return {int(s): ArmRun(table.loc[int(s)].to_dict(), pd.read_csv(folder / f"predictions-step-{s}.csv"), [])
            for s in steps}


def _check_same_kind(arm: Arm, folders: list[Path]) -> None:
    """--resume keeps arms by label: refuse a label whose earlier arm was another kind (a plan file where a
    strategy was, IA3 where LoRA was), which would otherwise mix two arms' seeds under one name."""
    for folder in folders:
        try:
            earlier = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        kind = earlier.get("arm_kind") if isinstance(earlier, dict) else None
        if kind and kind != arm_kind(arm):
            raise PlacementError(f"arm '{arm.label}' was a {kind} arm in the earlier run and is a {arm_kind(arm)} "
                                 "arm now: give it another label, or run without --resume")


def _train_seed(model, tokenizer, plan, seed, lr, splits, settings, folder, eval_kwargs, model_name, extra,
                progress) -> ArmRun:
    train_set, val_set, test_set = splits
    milestones: dict[int, ArmRun] = {}

    def milestone(step: int, trained) -> None:  # the test split (and validation) part-way through the run
        result = ev.evaluate(trained, tokenizer, test_set, **(eval_kwargs | {"progress": False}))
        milestones[step] = ArmRun(_evaluation_values(result, settings.val_loss(trained, tokenizer, val_set)),
                                  ev.predictions_frame(test_set, result), [])

    run = train(copy.deepcopy(model), tokenizer, plan, train_set,
                replace(settings.train, lr=lr, seed=seed, save_every=0), progress=progress,
                evaluate_at=set(settings.eval_at or ()), on_evaluate=milestone)
    val_loss = settings.val_loss(run.model, tokenizer, val_set)
    result, metrics = finish_run(run, plan, tokenizer, test_set, folder, eval_kwargs=eval_kwargs, model_name=model_name,
                                 extra=extra | {"val_loss": val_loss, "seed": seed, "eval_at": sorted(milestones)})
    arm_run = ArmRun(metrics, ev.predictions_frame(test_set, result), list(run.losses), milestones)
    if milestones:
        _write_milestones(folder, arm_run, settings.train.steps)
    del run
    gc.collect()
    return arm_run


def _evaluation_values(result, val_loss: float) -> dict:
    return {"eval_loss": result.eval_loss, "exact_match": result.exact_match, "val_loss": val_loss}


def _write_milestones(folder: Path, arm_run: ArmRun, steps: int) -> None:
    """steps.csv (every evaluated step, the last included) and each earlier step's predictions, beside the run."""
    ledger = run_ledger(folder)
    for step, at in arm_run.milestones.items():
        write_csv(folder / f"predictions-step-{step}.csv", at.predictions, ledger=ledger)
    rows = [{"step": s, **{k: at.metrics.get(k) for k in STEP_VALUES}} for s, at in sorted(arm_run.milestones.items())]
    rows.append({"step": steps, **{k: arm_run.metrics.get(k) for k in STEP_VALUES}})
    write_csv(folder / "steps.csv", pd.DataFrame(rows), ledger=ledger)


def _kept(arm: Arm, seed: int, previous: ArmRun, log) -> ArmRun:
    """An earlier seed kept by --resume, saying so, and saying when it ran with other code than this run."""
    now = code_record()
    then = {k: previous.metrics.get(k) for k in now}
    code = "" if then == now else (f" (it ran with placement {then['placement_version'] or 'unrecorded'}, commit "
                                   f"{then['git_commit'] or 'unrecorded'}; this run is {now['placement_version']}, "
                                   f"commit {now['git_commit']})")
    log(f"{arm.label}, seed {seed}: kept from the earlier run{code}")
    return previous


def train_arm(model, tokenizer, plans: list[Plan], arm: Arm, splits, settings: CompareSettings, folder: Path,
              eval_kwargs: dict, model_name: str | None, progress: bool = False, log=print) -> list[ArmRun]:
    """One arm with every seed (`plans[k]` for seed k): the rate from the sweep (on seed 0's plan) or --lr, each
    seed trained, evaluated and written to its folder (OUT/arms/ARM, or OUT/arms/ARM/seed-K with several seeds);
    finished seeds are kept with --resume."""
    folders = [folder] if settings.seeds == 1 else [folder / f"seed-{k}" for k in range(settings.seeds)]
    keys = [_arm_key(plan, settings, arm, seed, splits) for seed, plan in enumerate(plans)]
    done = [_finished(f, k) if settings.resume else None for f, k in zip(folders, keys)]
    kept = next((d for d in done if d is not None), None)
    if kept is not None:
        lr, history, at_edge = kept.metrics["lr"], kept.metrics.get("lr_sweep"), kept.metrics.get("lr_at_edge")
    elif settings.sweeps(arm):
        lr, history, at_edge = choose_lr(model, tokenizer, plans[0], splits, settings, progress)
    else:
        lr, history, at_edge = _own_rate(arm) or settings.train.lr, None, None
    runs = []
    for seed, (plan, sub, key, previous) in enumerate(zip(plans, folders, keys, done)):
        if previous is not None:
            runs.append(_kept(arm, seed, previous, log))
            continue
        extra = {"compare_key": key, "lr_sweep": history, "lr_at_edge": at_edge, "arm_kind": arm_kind(arm)}
        runs.append(_train_seed(model, tokenizer, plan, seed, lr, splits, settings, sub, eval_kwargs,
                                model_name, extra | code_record(), progress))
    return runs


def _floor_rows(model, tokenizer, splits, settings: CompareSettings, eval_kwargs: dict, kind, out: Path,
                log) -> list[dict]:
    """The rows every comparison starts with: the base model, and the majority answer where it applies."""
    train_set, val_set, test_set = splits
    base_eval = ev.evaluate(model, tokenizer, test_set, **eval_kwargs)
    frame = ev.predictions_frame(test_set, base_eval)
    ci = statistics([ArmRun({"eval_loss": base_eval.eval_loss, "exact_match": base_eval.exact_match}, frame, [])],
                    None)
    rows = [row("base", eval_loss=base_eval.eval_loss, exact_match=base_eval.exact_match, **ci,
                balanced_accuracy=base_eval.balanced_accuracy, trainable_params=0, params_pct=0.0, sites=0,
                val_loss=settings.val_loss(model, tokenizer, val_set))]
    write_csv(out / "base_predictions.csv", frame)
    log(f"base: eval loss {base_eval.eval_loss:.3f}" + em_text(base_eval))
    if kind in ("boolean", "choice"):
        majority = ev.majority_baseline(train_set, test_set, kind)
        rows.append(row("majority", exact_match=majority.exact_match, balanced_accuracy=majority.balanced_accuracy,
                        trainable_params=0, params_pct=0.0, sites=0))
    return rows


def run_compare(model, tokenizer, base: Plan, splits, settings: CompareSettings, out: str | Path,
                progress: bool = False, log=print, spectrum: dict | None = None,
                family_ranking: dict[str, list[str]] | None = None) -> Comparison:
    """Evaluate the base model, a majority answer where it applies, and every arm; write each arm's adapter, metrics
    and predictions under `out/arms/`. `report.write_comparison` writes the table and the curves."""
    out = Path(out)
    kind = ev.task_kind(splits[2])
    eval_kwargs = dict(kind=kind, batch_size=settings.eval_batch_size, max_length=settings.train.max_length,
                       max_new_tokens=settings.max_new_tokens, progress=progress)
    full = base.all_linear_params()
    settings.check()
    for arm in settings.arms if settings.resume else ():  # before anything is trained or written
        folder = out / "arms" / arm_folder(arm)
        _check_same_kind(arm, [folder] + [folder / f"seed-{k}" for k in range(settings.seeds)])
    rows, curves, steps = _floor_rows(model, tokenizer, splits, settings, eval_kwargs, kind, out, log), {}, []
    default_k, data_key = selector_k(settings.arms), data_fingerprint(splits[0])
    first: list[ArmRun] | None = None  # the reference's runs, which every later arm is tested against
    for arm in tqdm(settings.ordered_arms(), desc="arms", disable=not progress):
        plans = arm_plans(arm, base, model, default_k, settings.seeds, settings.train.seed, data_key,
                          spectrum=spectrum, family_ranking=family_ranking)
        runs = train_arm(model, tokenizer, plans, arm, splits, settings, out / "arms" / arm_folder(arm),
                         eval_kwargs, base.model.get("name"), progress, log)
        arm_values = arm_row(arm.label, arm.strategy, plans, runs, full, first, settings.train.seed)
        first = first or runs
        rows.append(arm_values)
        steps += step_rows(arm.label, runs, settings.train.seed)
        curves[arm.label] = runs[0].losses
        log(f"{arm.label}: {arm_values['trainable_params']:,.0f} params, lr {arm_values['lr']:g}, eval loss "
            f"{arm_values['eval_loss']:.3f}" + ("" if pd.isna(arm_values["exact_match"]) else
                                                f", exact match {100 * arm_values['exact_match']:.1f}%")
            + f", {arm_values['sec_per_step']:.2f} s/step")
    return Comparison(pd.DataFrame(rows, columns=TABLE_COLUMNS), curves, kind,
                      pd.DataFrame(steps, columns=STEP_COLUMNS) if steps else None)


def parse_steps(text: str) -> tuple[int, ...] | None:
    """`--eval-at 40,160`: the earlier steps each run is also evaluated at, in order, each once."""
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise PlacementError(f"--eval-at '{text}' is not a comma-separated list of steps: pass e.g. 40,160") from None
    if any(s < 1 for s in steps):
        raise PlacementError(f"--eval-at '{text}' holds a step below 1: pass steps from 1 to below --steps")
    return tuple(steps) or None


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
                   max_new_tokens: int, variant: str | None = None,
                   plan_arms=()) -> tuple[list[Arm], list[str] | None, Plan | None]:
    """Everything about a comparison that can be wrong without a model, checked before any loading:
    (arms, the arms to sweep, the given profile's plan or None). `plan_arms` are `--plan-arm LABEL=PATH` texts."""
    parsed = read_arms(arms, variant, plan_arms)
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
                   base: Plan | None, probe_settings=None, batches: int = 8, progress: bool = False, log=print,
                   scores_folder: str | Path | None = None):
    """The compare study: probe on the training split (`batches` batches, `probe_settings` or the defaults) or use
    the given profile's plan `base` (its spectrum and family rankings read from `scores_folder`), train and evaluate
    every arm, write the table and the curves. Returns (Comparison, the plan the arms were made from)."""
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
        probe_settings = probe_settings or ProbeSettings()
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


