"""Recommend the plan to follow at a budget: every selector's plan at every budget, trained briefly and judged by
validation loss, the best third trained longer with two seeds, the best of those recommended.

The schedule (`schedule`) is a pure function of the finished trials, so any number of workers sharing the run's
trial store (`trials.py`) compute the same next stage. Stages:

1. `sweep`: page's plan at each rate of a short grid per budget (seed 0, trial steps); the rate with the lowest
   validation loss is the budget's rate. These runs are rung 0's page trials at their rates.
2. `rung0`: every selector's plan (and each entrant) at the budget's rate, seed 0, trial steps.
3. `rung1`: the best third per budget (eta = 3, by validation loss; ties to fewer parameters, then name), and page's
   plan as the reference, for three times the steps with seeds 0 and 1.

Trials train on the training split; validation loss is measured on the validation split, disjoint from the test
questions `compare` uses under the same --seed: the choice never sees compare's test set.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import PlacementError
from ..outputs import write_json
from ..plan.budget import Pick, budget_label, budget_params, get_selector
from ..plan.plan import Plan
from ..plan.strategies import Strategy
from . import trials as tq

DEFAULT_SELECTORS = ("page", "lookahead", "lora_drop", "snr", "kappa", "params", "down", "ffn")
ETA = 3
SETTINGS = "recommend.json"
PLANS = "plans"


@dataclass
class RecommendSettings:
    budgets: list[float] = field(default_factory=lambda: [1.0, 2.5, 5.0])  # percent of all-linear at rank r
    max_params: int | None = None  # one budget of this many parameters instead
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    trial_steps: int = 20
    rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # the sweep on page's plan
    r: int = 8
    alpha: float = 16
    fast: bool = False
    batches: int = 8  # calibration batches for the probe and the lookahead run
    batch_size: int = 8
    max_length: int = 256
    eval_batch_size: int = 16
    seed: int = 0  # the data split (as compare's) and the probe
    test: int | None = None
    validation: int | None = None
    lookahead_steps: int = 16
    lookahead_lr: float = 3e-3

    def check(self) -> None:
        if self.trial_steps < 1:
            raise PlacementError(f"--trial-steps {self.trial_steps} trains nothing: pass at least 1")
        for name in self.selectors:
            get_selector(name)
        if "page_opt" in self.selectors and self.fast:
            raise PlacementError("selector page_opt needs the exact probe's gradient spectrum: drop --fast or the "
                                 "selector")
        if self.max_params is not None and self.max_params < 1:
            raise PlacementError(f"--max-params {self.max_params} is not a budget: pass a positive count")
        if not self.rates or any(not (lr > 0 and math.isfinite(lr)) for lr in self.rates):
            raise PlacementError("the rate grid must hold positive learning rates")

    def probe_settings(self):
        from ..probe.settings import ProbeSettings

        return ProbeSettings(r=self.r, alpha=self.alpha, seed=self.seed, mode="fast" if self.fast else "exact",
                             spectrum_k=64 if "page_opt" in self.selectors else 0)


# -- budgets and entries ---------------------------------------------------------------------------------------
def site_rows(model) -> list[dict]:
    from ..model.sites import find_sites

    return [s.to_row() | {"site": s.name} for s in find_sites(model)]


def budgets_of(rows: list[dict], settings: RecommendSettings) -> dict[str, int]:
    """Budget label -> parameter count (each checked against the smallest adapter)."""
    if settings.max_params is not None:
        smallest = min(settings.r * (row["d_in"] + row["d_out"]) for row in rows)
        if settings.max_params < smallest:
            raise PlacementError(f"--max-params {settings.max_params} is below the smallest rank-{settings.r} "
                                 f"adapter here ({smallest} parameters): raise it")
        return {str(settings.max_params): settings.max_params}
    return {budget_label(p): budget_params(p, rows, settings.r) for p in settings.budgets}


def entry_name(selector: str, budget: str) -> str:
    return f"{selector}@{budget}".replace("%", "pct")


# -- the schedule: a pure function of the finished trials ------------------------------------------------------
def _key(stage, selector, budget, seed, steps, lr) -> dict:
    return dict(stage=stage, selector=selector, budget=budget, seed=seed, steps=steps, lr=lr)


def _value(results: dict, key: dict) -> float | None:
    found = results.get(tq.key_text(key))
    return None if found is None else found["value"]


def budget_rates(results: dict, entries: dict, settings: RecommendSettings) -> dict[str, float] | None:
    """Each budget's rate from the sweep on page's plan (None until every sweep trial is done)."""
    rates = {}
    for budget in {b for _, b in entries}:
        losses = {lr: _value(results, _key("rung0", "page", budget, 0, settings.trial_steps, lr))
                  for lr in settings.rates}
        if any(v is None for v in losses.values()):
            return None
        rates[budget] = min(sorted(losses), key=lambda lr: losses[lr])
    return rates


def promoted(results: dict, entries: dict, rates: dict, settings: RecommendSettings) -> dict[str, list[str]]:
    """The best third at each budget by rung-0 validation loss, and page's plan as the reference."""
    out = {}
    for budget, rate in rates.items():
        rows = [(_value(results, _key("rung0", sel, budget, 0, settings.trial_steps, rate)), entries[sel, budget], sel)
                for sel, b in entries if b == budget]
        ranked = [sel for _, _, sel in sorted(rows, key=lambda row: (row[0], row[1], row[2]))
                  if not sel.startswith("random")]  # a random draw is a control, never recommended
        keep = ranked[:math.ceil(len(ranked) / ETA)]
        out[budget] = keep + ([] if "page" in keep else ["page"])
    return out


def schedule(results: dict, entries: dict, settings: RecommendSettings) -> list[dict] | None:
    """The keys the schedule needs now, given the finished results; None when it is done. `entries` maps
    (selector, budget) to the plan's trainable parameters."""
    t = settings.trial_steps
    budgets = sorted({b for _, b in entries})
    sweep = [_key("rung0", "page", b, 0, t, lr) for b in budgets for lr in settings.rates]
    rates = budget_rates(results, entries, settings)
    if rates is None:
        return sweep
    rung0 = [_key("rung0", sel, b, 0, t, rates[b]) for sel, b in entries]
    if any(tq.key_text(k) not in results for k in rung0):
        return rung0
    rung1 = [_key("rung1", sel, b, seed, ETA * t, rates[b])
             for b, sels in promoted(results, entries, rates, settings).items() for sel in sels for seed in (0, 1)]
    if any(tq.key_text(k) not in results for k in rung1):
        return rung1
    return None


def trial_count(entries: dict, settings: RecommendSettings) -> tuple[int, int]:
    """(trials, training steps) the schedule will run at most."""
    trials = steps = 0
    for budget in {b for _, b in entries}:
        n = sum(1 for _, b in entries if b == budget)
        top = math.ceil(n / ETA) + 1  # + page, when it is not among them
        trials += len(settings.rates) - 1 + n + 2 * top
        steps += settings.trial_steps * (len(settings.rates) - 1 + n) + 2 * top * ETA * settings.trial_steps
    return trials, steps


# -- running trials ----------------------------------------------------------------------------------------------
@dataclass
class Workbench:
    """What a worker needs to run any trial of a run: the model, the splits, the plans."""

    model: object
    tokenizer: object
    splits: tuple
    plans: dict  # (selector, budget) -> Plan
    settings: RecommendSettings

    def run(self, key: dict) -> dict:
        from ..train import evaluate as ev
        from ..train.trainer import TrainError, TrainSettings, train

        plan = self.plans[key["selector"], key["budget"]]
        s = self.settings
        train_settings = TrainSettings(steps=key["steps"], lr=key["lr"], batch_size=s.batch_size,
                                       max_length=s.max_length, seed=key["seed"])
        began = time.perf_counter()
        try:
            run = train(copy.deepcopy(self.model), self.tokenizer, plan, self.splits[0], train_settings)
            val = ev.mean_loss(run.model, self.tokenizer, self.splits[1], batch_size=s.eval_batch_size,
                               max_length=s.max_length)
            last = run.losses[-1]
            del run
        except TrainError:  # a rate that diverges for this plan is a bad trial, not a failed study
            val, last = math.inf, math.nan
        return {"val_loss": val, "params": plan.trainable_params, "train_loss": last, "sites": sites_key(plan),
                "seconds": round(time.perf_counter() - began, 3)}

    def entries(self) -> dict:
        return {key: plan.trainable_params for key, plan in self.plans.items()}


def trial_splits(splits: tuple, settings: RecommendSettings) -> tuple:
    """The training examples trials draw from: one seeded epoch of the longest trial, so every trial sees the same
    examples in the same order and none renders the whole training split; validation and test as they are."""
    import random

    train_set = list(splits[0])
    random.Random(settings.seed).shuffle(train_set)
    return (train_set[:ETA * settings.trial_steps * settings.batch_size],) + tuple(splits[1:])


def sites_key(plan: Plan) -> str:
    """What two selectors share when they choose the same sites at the same ranks."""
    import hashlib

    ranks = {t: plan.peft.get("rank_pattern", {}).get(t, plan.peft["r"]) for t in plan.targets}
    return hashlib.sha256(json.dumps(ranks, sort_keys=True).encode()).hexdigest()[:12]


def run_trials(bench: Workbench, queue: tq.TrialQueue, progress: bool = False, log=print) -> dict:
    """Work on the run's trials until the schedule is done (with a bar and an ETA)."""
    from tqdm.auto import tqdm

    entries = bench.entries()
    total = trial_count(entries, bench.settings)[0]
    bar = tqdm(total=total, desc="trials", disable=not progress, initial=len(queue.results()))
    results = tq.work(queue, lambda done: schedule(done, entries, bench.settings), bench.run,
                      on_done=lambda key: bar.update(1))
    bar.close()
    return results


def read_run_settings(folder: str | Path) -> dict:
    path = Path(folder) / SETTINGS
    if not path.is_file():
        raise PlacementError(f"{folder} holds no recommend study ({SETTINGS} missing): start one with "
                             "placement recommend --out")
    return json.loads(path.read_text(encoding="utf-8"))


def load_plans(folder: str | Path, record: dict) -> dict:
    return {(e["selector"], e["budget"]): Plan.load(Path(folder) / PLANS / e["file"]) for e in record["entries"]}


def settings_from(record: dict) -> RecommendSettings:
    values = dict(record["settings"])
    values["selectors"] = tuple(values["selectors"])
    values["rates"] = tuple(values["rates"])
    return RecommendSettings(**values)


def plan_for(base: Plan, chosen: Pick, label: str) -> Plan:
    """The plan of a selector's pick: its sites at their rank (uniform, or allocate's ranks)."""
    rank = chosen.uniform_rank
    if rank is not None:
        plan = base.with_strategy(Strategy("given", targets=chosen.targets, source=label), r=rank)
    else:
        plan = base.with_strategy(Strategy("allocate", max_params=chosen.max_params, ranks=chosen.ranks))
    plan.strategy["label"] = label
    return plan


def to_record(settings: RecommendSettings) -> dict:
    return asdict(replace(settings, selectors=list(settings.selectors), rates=list(settings.rates)))


# -- the run -------------------------------------------------------------------------------------------------------
def estimate(model, tokenizer, splits, entries: dict, settings: RecommendSettings, base_plan: Plan) -> dict:
    """The trial count, training steps, and time at all-linear's measured step time (smaller plans are faster)."""
    from ..train.trainer import TrainSettings, train

    trials, steps = trial_count(entries, settings)
    full = base_plan.with_strategy(Strategy("all-linear"))
    run = train(copy.deepcopy(model), tokenizer, full, splits[0],
                TrainSettings(steps=3, lr=1e-4, batch_size=settings.batch_size, max_length=settings.max_length))
    per_step = run.sec_per_step
    del run
    gc.collect()
    return {"trials": trials, "steps": steps, "sec_per_step": per_step, "minutes": steps * per_step / 60}


def cost_line(cost: dict) -> str:
    return (f"cost       {cost['trials']} trials, {cost['steps']:,} training steps: about {cost['minutes']:.1f} min "
            f"at {cost['sec_per_step']:.3f} s per all-linear step (and the probe first)")


def prepare(model, tokenizer, source, data: str, settings: RecommendSettings, *, entrants=(), log=print,
            progress: bool = False):
    """(splits, budgets, the base plan, every entry's plan): everything the trials need, before any is run."""
    from ..data import load_splits
    from .candidates import entrant_plans, scores_and_base, selector_plans

    splits = load_splits(data, None, settings.test, settings.validation, settings.seed)
    if not splits[1]:
        raise PlacementError(f"{data} leaves no validation example to judge trials by: add data or pass --validation")
    budgets = budgets_of(site_rows(model), settings)
    base, scores, spectrum = scores_and_base(model, tokenizer, source, data, splits[0], settings, progress)
    plans = selector_plans(base, budgets, scores, spectrum, settings, log) | entrant_plans(list(entrants), model,
                                                                                            budgets, log)
    return splits, budgets, base, plans


def save_run(folder: Path, source_name: str, data: str, settings: RecommendSettings, plans: dict, storage: str):
    entries = []
    for (selector, budget), plan in plans.items():
        name = entry_name(selector, budget) + ".json"
        plan.save(folder / PLANS / name)
        entries.append({"selector": selector, "budget": budget, "file": name})
    write_json(folder / SETTINGS, {"model": source_name, "data": data, "settings": to_record(settings),
                                   "storage": storage, "entries": entries})


def open_queue(folder: Path, storage: str | None, create: bool) -> tq.TrialQueue:
    return tq.TrialQueue(storage or tq.default_storage(folder), create=create)


def run_recommend(model, tokenizer, source, data: str, settings: RecommendSettings, out: str | Path, *,
                  storage: str | None = None, entrants=(), progress: bool = False, log=print) -> dict:
    """The whole recommendation in `out` (already claimed as a run folder): probe, plans, trials, outputs."""
    from .recommend_report import write_outputs

    settings.check()
    folder = Path(out)
    splits, budgets, base, plans = prepare(model, tokenizer, source, data, settings, entrants=entrants, log=log,
                                           progress=progress)
    bench = Workbench(model, tokenizer, trial_splits(splits, settings), plans, settings)
    log(cost_line(estimate(model, tokenizer, bench.splits, bench.entries(), settings, base)))
    save_run(folder, source.name, data, settings, plans, storage or tq.default_storage(folder))
    results = run_trials(bench, open_queue(folder, storage, create=True), progress, log)
    full = sum(settings.r * (row["d_in"] + row["d_out"]) for row in base.sites)
    return write_outputs(folder, results, plans, full, settings)


def join_recommend(folder: str | Path, *, storage: str | None = None, device: str = "cpu", progress: bool = False,
                   log=print) -> dict:
    """Work on the trials of a running recommendation in `folder` (another process or machine started it)."""
    from ..data import load_splits
    from ..model.load import load

    record = read_run_settings(folder)
    queue = open_queue(Path(folder), storage or record["storage"], create=False)
    settings = settings_from(record)
    model, tokenizer, _ = load(record["model"], device=device)
    splits = load_splits(record["data"], None, settings.test, settings.validation, settings.seed)
    bench = Workbench(model, tokenizer, trial_splits(splits, settings), load_plans(folder, record), settings)
    return run_trials(bench, queue, progress, log)
