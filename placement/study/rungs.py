"""The fixed schedule of `recommend` and the worker that runs its trials.

The schedule (`schedule`) is a pure function of the finished trials, so any number of workers sharing the run's
trial store (`trials.py`) compute the same next stage; promotion is deterministic.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass

from ..plan.plan import Plan
from . import trials as tq

ETA = 3
RUNG1_SEEDS = (0, 1)


# -- the schedule: a pure function of the finished trials ------------------------------------------------------
def _key(stage, selector, budget, seed, steps, lr) -> dict:
    return dict(stage=stage, selector=selector, budget=budget, seed=seed, steps=steps, lr=lr)


def _value(results: dict, key: dict) -> float | None:
    found = results.get(tq.key_text(key))
    return None if found is None else found["value"]


def budget_rates(results: dict, entries: dict, settings) -> dict[str, float] | None:
    """Each budget's rate from the sweep on page's plan (None until every sweep trial is done)."""
    rates = {}
    for budget in {b for _, b in entries}:
        losses = {lr: _value(results, _key("rung0", "page", budget, 0, settings.trial_steps, lr))
                  for lr in settings.rates}
        if any(v is None for v in losses.values()):
            return None
        rates[budget] = min(sorted(losses), key=lambda lr: losses[lr])
    return rates


def promoted(results: dict, entries: dict, rates: dict, settings) -> dict[str, list[str]]:
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


def schedule(results: dict, entries: dict, settings) -> list[dict] | None:
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
    if settings.rungs < 2:
        return None
    rung1 = [_key("rung1", sel, b, seed, ETA * t, rates[b])
             for b, sels in promoted(results, entries, rates, settings).items() for sel in sels for seed in RUNG1_SEEDS]
    if any(tq.key_text(k) not in results for k in rung1):
        return rung1
    return None


def final_rung(settings) -> tuple[int, tuple[int, ...]]:
    """(steps, seeds) of the trials a decision reads: rung 1's, or rung 0's when the run stops there."""
    if settings.rungs < 2:
        return settings.trial_steps, (0,)
    return ETA * settings.trial_steps, RUNG1_SEEDS


def trial_count(entries: dict, settings) -> tuple[int, int]:
    """(trials, training steps) the schedule will run at most."""
    trials = steps = 0
    for budget in {b for _, b in entries}:
        n = sum(1 for _, b in entries if b == budget)
        top = math.ceil(n / ETA) + 1 if settings.rungs > 1 else 0  # + page, when it is not among them
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
    settings: object  # RecommendSettings

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


def trial_splits(splits: tuple, settings) -> tuple:
    """The training examples trials draw from: one seeded epoch of the longest trial, so every trial sees the same
    examples in the same order and none renders the whole training split; validation and test as they are."""
    train_set = list(splits[0])
    random.Random(settings.seed).shuffle(train_set)
    return (train_set[:ETA * settings.trial_steps * settings.batch_size],) + tuple(splits[1:])


def sites_key(plan: Plan) -> str:
    """What two selectors share when they choose the same sites at the same ranks."""
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
