"""Recommend the plan to follow at a budget: every selector's plan at every budget, trained briefly and judged by
validation loss, the best third trained longer with two seeds, the best of those recommended.

The schedule (`schedule`) is a pure function of the finished trials, so any number of workers sharing the run's
trial store (`trials.py`) compute the same next stage. Stages:

1. the sweep: page's plan at each rate of a short grid per budget (seed 0, trial steps); the rate with the lowest
   validation loss is the budget's rate. These runs are rung 0's page trials at their rates (stage `rung0`).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PlacementError
from ..outputs import write_json
from ..plan.budget import Pick, budget_label, budget_params, get_selector, selectors
from ..plan.plan import Plan
from ..plan.strategies import Strategy
from . import trials as tq
from .rungs import Workbench, run_trials, trial_count, trial_splits

DEFAULT_SELECTORS = ("page", "lookahead", "lora_drop", "snr", "kappa", "params", "down", "ffn")
SETTINGS = "recommend.json"
PLANS = "plans"


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PlacementError(f"--rates {text} is not a list of numbers: write e.g. 1e-3,3e-3,1e-2") from None


@dataclass
class RecommendSettings:
    """What a recommendation runs. Fields with a "help" are recommend's own options; the others take the value of
    the option of the same name that another settings group declares (--budget, --max-params, --r, --alpha,
    --fast, --lookahead-steps, --lookahead-lr, --batches, --batch-size, --max-length, --seed, --test,
    --validation), so each option is declared once."""

    selectors: tuple[str, ...] = field(default=DEFAULT_SELECTORS, metadata={
        "help": "comma-separated selectors, each a registered score or a role rule, of: " + ", ".join(selectors()),
        "parse": _names, "show": ",".join})
    trial_steps: int = field(default=20, metadata={
        "help": "steps of a rung-0 trial (rung 1: three times as many, two seeds)", "range": (1, 10 ** 6)})
    rates: tuple[float, ...] = field(default=(1e-3, 3e-3, 1e-2), metadata={
        "help": "comma-separated learning rates of the sweep on page's plan that picks each budget's rate",
        "parse": _rates, "show": lambda v: ",".join(f"{x:g}" for x in v)})
    rungs: int = field(default=2, metadata={
        "help": "rungs of trials: 2 promotes the best third of rung 0 to three times the steps on two seeds; 1 stops "
                "after rung 0 (one seed, so no spread: a quick answer)", "range": (1, 2)})
    budget: tuple[float, ...] = (1.0, 2.5, 5.0)  # percents of all-linear at rank r
    max_params: int | None = None  # one budget of this many parameters instead
    r: int = 8
    alpha: float = 16
    mode: str = "exact"  # the probe's; --fast: no page_opt
    batches: int = 8  # calibration batches for the probe and the lookahead run
    batch_size: int = 8
    max_length: int = 256
    eval_batch_size: int = 16
    seed: int = 0  # the data split (as compare's) and the probe
    n_test: int | None = None
    n_validation: int | None = None
    lookahead_steps: int = 16
    lookahead_lr: float = 3e-3

    def __post_init__(self) -> None:
        self.selectors, self.rates, self.budget = tuple(self.selectors), tuple(self.rates), tuple(self.budget)
        if self.trial_steps < 1:
            raise PlacementError(f"--trial-steps {self.trial_steps} trains nothing: pass at least 1")
        for name in self.selectors:
            get_selector(name)
        if "page_opt" in self.selectors and self.fast:
            raise PlacementError("selector page_opt needs the exact probe's gradient spectrum: drop --fast or the "
                                 "selector")
        if self.max_params is not None and self.max_params < 1:
            raise PlacementError(f"--max-params {self.max_params} is not a budget: pass a positive count")
        if not self.budget and self.max_params is None:
            raise PlacementError("no budget to recommend at: pass --budget, e.g. 1%,2.5%,5%, or --max-params")
        if not self.rates or any(not (lr > 0 and math.isfinite(lr)) for lr in self.rates):
            raise PlacementError("the rate grid must hold positive learning rates")
        self.probe_settings()  # the probe's own checks (rank, alpha, the lookahead run)

    @property
    def fast(self) -> bool:
        return self.mode == "fast"

    def probe_settings(self):
        from ..probe.settings import ProbeSettings

        return ProbeSettings(r=self.r, alpha=self.alpha, seed=self.seed, mode=self.mode,
                             spectrum_k=64 if "page_opt" in self.selectors else 0,
                             lookahead_steps=self.lookahead_steps, lookahead_lr=self.lookahead_lr)


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
    return {budget_label(p): budget_params(p, rows, settings.r) for p in settings.budget}


def entry_name(selector: str, budget: str) -> str:
    return f"{selector}@{budget}".replace("%", "pct")


def read_run_settings(folder: str | Path) -> dict:
    path = Path(folder) / SETTINGS
    if not path.is_file():
        raise PlacementError(f"{folder} holds no recommend study ({SETTINGS} missing): start one with "
                             "placement recommend --out")
    return json.loads(path.read_text(encoding="utf-8"))


def load_plans(folder: str | Path, record: dict) -> dict:
    return {(e["selector"], e["budget"]): Plan.load(Path(folder) / PLANS / e["file"]) for e in record["entries"]}


def settings_from(record: dict) -> RecommendSettings:
    return RecommendSettings(**record["settings"])


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
    return asdict(settings)


# -- the run -------------------------------------------------------------------------------------------------------
def dry_entries(model, settings: RecommendSettings, entrants=(), log=print) -> dict:
    """(selector, budget) -> 0 for every entry the run will train, found without probing: role selectors that
    cannot fit rank 1 and entrants over a budget are left out, as the run leaves them."""
    from ..plan.budget import pick
    from .candidates import entrant_plans

    rows = site_rows(model)
    budgets = budgets_of(rows, settings)
    entries = {}
    for budget, max_params in budgets.items():
        for name in dict.fromkeys(("page",) + tuple(settings.selectors)):
            selector = get_selector(name)
            if selector.rule != "role" or not pick(selector, rows, None, max_params, settings.r).skipped:
                entries[name, budget] = 0
    return entries | {key: 0 for key in entrant_plans(list(entrants), model, budgets, log)}


def all_linear(model, settings: RecommendSettings) -> Plan:
    from ..model.sites import find_sites, fingerprint

    sites = find_sites(model)
    rows = [row | {"score": 0.0, "share": 0.0, "rank": i + 1} for i, row in enumerate(site_rows(model))]
    block = {"name": "", "num_sites": len(sites), "fingerprint": fingerprint(sites)}
    return Plan.build(model=block, probe={"r": settings.r}, sites=rows, strategy=Strategy("all-linear"),
                      peft=settings.probe_settings().lora_kwargs())


def estimate(model, tokenizer, splits, entries: dict, settings: RecommendSettings) -> dict:
    """The trial count, training steps, and time at all-linear's measured step time (smaller plans are faster)."""
    from ..train.trainer import TrainSettings, train

    trials, steps = trial_count(entries, settings)
    full = all_linear(model, settings)
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
    """(splits, budgets, the profile, every entry's plan): everything the trials need, before any is run."""
    from ..data import load_splits
    from .candidates import entrant_plans, scores_and_base, selector_plans

    splits = load_splits(data, None, settings.n_test, settings.n_validation, settings.seed)
    if not splits[1]:
        raise PlacementError(f"{data} leaves no validation example to judge trials by: add data or pass --validation")
    budgets = budgets_of(site_rows(model), settings)
    profile, scores, spectrum = scores_and_base(model, tokenizer, source, data, splits[0], settings, progress, log)
    plans = selector_plans(profile.plan, budgets, scores, spectrum, settings, log)
    plans |= entrant_plans(list(entrants), model, budgets, log)
    return splits, budgets, profile, plans


def save_run(folder: Path, source_name: str, data: str, settings: RecommendSettings, plans: dict, storage: str):
    entries = []
    for (selector, budget), plan in plans.items():
        name = entry_name(selector, budget) + ".json"
        plan.save(folder / PLANS / name)
        entries.append({"selector": selector, "budget": budget, "file": name})
    write_json(folder / SETTINGS, {"model": source_name, "data": data, "settings": to_record(settings),
                                   "storage": storage, "entries": entries})


def open_queue(folder: Path, storage: str | None, create: bool, resume: bool = False, log=print) -> tq.TrialQueue:
    ledger = None
    if create and storage is None:  # the run's own file: replaced with the run, kept by --resume
        from ..ledger import open_ledger

        ledger = open_ledger(tq.default_storage(folder))
        if ledger is not None and not resume:  # an overwritten run's trials are not this run's: its store goes first
            ledger.remove(tq.default_storage(folder))
    queue = tq.TrialQueue(storage or tq.default_storage(folder), create=create)
    if resume:
        done, stale = len(queue.results()), queue.reset_running()
        log(f"resume     {done} trials kept" + (f", {stale} a stopped worker left running run again" if stale
                                                  else ""))
    if ledger is not None:
        ledger.add(tq.default_storage(folder))
    return queue


def run_recommend(model, tokenizer, source, data: str, settings: RecommendSettings, out: str | Path, *,
                  storage: str | None = None, entrants=(), resume: bool = False, progress: bool = False,
                  profile_out: str | Path | None = None, log=print) -> dict:
    """The whole recommendation in `out` (already claimed as a run folder): probe, plans, trials, outputs. With
    `resume` the finished trials of the run's store are kept (start it again while no other worker runs); with
    `profile_out` the probe's profile is written there too, for a comparison to start from instead of probing again."""
    from .profile import write_profile
    from .recommend_report import write_outputs

    folder = Path(out)
    splits, budgets, profile, plans = prepare(model, tokenizer, source, data, settings, entrants=entrants, log=log,
                                              progress=progress)
    if profile_out is not None:
        write_profile(profile, profile_out, title=f"{source.name} on {data}: page")
    bench = Workbench(model, tokenizer, trial_splits(splits, settings), plans, settings)
    log(cost_line(estimate(model, tokenizer, bench.splits, bench.entries(), settings)))
    save_run(folder, source.name, data, settings, plans, storage or tq.default_storage(folder))
    results = run_trials(bench, open_queue(folder, storage, True, resume, log), progress, log)
    full = sum(settings.r * (row["d_in"] + row["d_out"]) for row in profile.plan.sites)
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
    splits = load_splits(record["data"], None, settings.n_test, settings.n_validation, settings.seed)
    bench = Workbench(model, tokenizer, trial_splits(splits, settings), load_plans(folder, record), settings)
    return run_trials(bench, queue, progress, log)


def dry_run(model, tokenizer, data: str, settings: RecommendSettings, entrants=(), log=print) -> dict:
    """The cost line of a run, without probing or writing anything."""
    from ..data import load_splits

    splits = load_splits(data, None, settings.n_test, settings.n_validation, settings.seed)
    cost = estimate(model, tokenizer, trial_splits(splits, settings), dry_entries(model, settings, entrants, log),
                    settings)
    log(cost_line(cost))
    return cost


def recommend(model: str, data: str, budgets="1%,2.5%,5%", out: str | Path = "recommend", *, storage=None,
              entrants=(), overwrite: bool = False, progress: bool = True, **settings) -> dict:
    """`placement recommend` in Python: the recommended plan per budget, written to `out` (see the README)."""
    from ..model.load import load
    from ..outputs import run_folder
    from ..plan.budget import parse_budgets

    chosen = RecommendSettings(budget=parse_budgets(budgets) if isinstance(budgets, str) else budgets, **settings)
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = load(model)
        return run_recommend(lm, tokenizer, source, data, chosen, out, storage=storage, entrants=entrants,
                             progress=progress)
