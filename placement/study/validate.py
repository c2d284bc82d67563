"""Does the score predict what training achieves? Train one single-site LoRA at sites spread over the ranking, under
one rule for all, and correlate every score with the realised gain in validation loss.

The gain of a site is the validation loss of the untrained model minus the validation loss after training a LoRA
there alone (same rank, steps, data order and seed for every site; the validation split is held out from training),
at the learning rate a short sweep chose for the site's role on a slice of the training split (role_rates.py), so
that no role is judged at a rate that suits another. Beside it, the first step's drop with B alone trained from the
same init, plain SGD and AdamW, no warm-up or clipping, against its first-order prediction: lr * ||grad_B||^2 for
SGD (what PAGE measures) and lr * ||grad_B||_1 for AdamW, whose first step moves every parameter by about
lr * sign(grad).
"""
from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import data as data_mod
from ..errors import PlacementError
from ..model.loss import token_loss
from ..model.sites import find_sites
from ..outputs import read_table, write_csv, write_text
from ..plan.plan import Plan
from ..plan.strategies import Strategy
from ..probe.registry import SCORES, ScoreContext, compute_scores, ranking_names, score_names
from ..report.figures import validation_plot
from ..train import evaluate as ev
from ..train.trainer import TrainSettings, apply_plan, train
from . import role_rates as rr
from . import stats

# Scores a site can be ranked by, from the registry: the energies (page first), the scores of the weights alone
# (sign set so that larger is preferred), and two trivial baselines that any useful score must beat.
BASELINES = ("params", "depth")
TOP_PAGE = 4  # the page ranking's head is always trained: it is the tool's answer


def energy_scores() -> list[str]:
    """The energies, page first: the probe's, act_norm, and any registered beside them."""
    return ranking_names()


def weight_scores() -> list[str]:
    """The order-only scores of the weights alone (kappa, snr), the baselines left out."""
    return [n for n in score_names("weights") if n not in BASELINES and n not in ranking_names()]


@dataclass
class ValidateSettings:
    # Fields with a "help" are command-line options too (placement/cli_settings.py builds them).
    sites: int | None = field(default=24, metadata={  # None: every site
        "help": "sites to train, spread over the ranking, or 'all'", "parse": lambda text: parse_sites(text),
        "show": lambda n: "all" if n is None else str(n), "range": (1, 10 ** 6)})
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=60))
    step_lr: float = field(default=1e-4, metadata={
        "help": "learning rate of the first-step drops (SGD and AdamW on B alone)", "range": (0, 10)})
    role_sweep: bool = field(default=True, metadata={
        "help": "train every site at the single rate --lr instead of its role's rate from the sweep",
        "option": "--no-role-sweep", "flag": False})
    role_lr_grid: tuple[float, ...] = field(default=rr.ROLE_LRS, metadata={
        "help": "comma-separated rates the role sweep tries on the top site of each role", "parse": rr.parse_grid,
        "show": rr.show_grid})
    role_sweep_steps: int | None = field(default=None, metadata={  # None: a third of the training's
        "help": "steps of each role-sweep run (default: a third of --steps)", "range": (1, 10 ** 9)})
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        self.check()  # the training settings checked themselves when they were made

    def check(self) -> None:
        if self.sites is not None and self.sites < 1:
            raise PlacementError(f"--sites {self.sites} trains nothing: pass a positive number or 'all'")
        if not (self.step_lr > 0 and math.isfinite(self.step_lr)):
            raise PlacementError(f"--step-lr {self.step_lr} is not a learning rate: pass a positive number")
        self.role_lr_grid = rr.parse_grid(self.role_lr_grid)
        if self.role_sweep_steps is not None and self.role_sweep_steps < 1:
            raise PlacementError(f"--role-sweep-steps {self.role_sweep_steps} trains nothing: pass 1 or more")


@dataclass
class Validation:
    sites: pd.DataFrame  # one row per trained site: scores, first-step drops, final validation loss, gain
    correlations: pd.DataFrame  # one row per score
    base_val_loss: float
    rates: rr.RoleRates | None = None  # the role sweep; None: every site at one rate

    def verdict(self) -> str:
        """One sentence: which score ranks sites best here, with its interval, and what following page costs."""
        ranked = self.correlations.dropna(subset=["spearman"]).sort_values("spearman", ascending=False)
        if ranked.empty:
            return "No score could be correlated with the gain (too few sites trained, or constant gains)."
        best = ranked.iloc[0]
        rows = self.sites
        top_gain = rows.loc[rows["gain"].idxmax()]
        page_top = rows.loc[rows["page"].idxmax()]
        return (f"On this model and task, {best.score} ranks sites best by realised gain (Spearman "
                f"{best.spearman:.2f}, 95% interval {best.spearman_lo:.2f} to {best.spearman_hi:.2f}, over "
                f"{int(best.sites)} trained sites); following page trains {page_top.site} (gain {page_top.gain:.3f}) "
                f"where the best of the trained sites is {top_gain.site} (gain {top_gain.gain:.3f}), "
                f"a regret of {top_gain.gain - page_top.gain:.3f} in validation loss.")


def site_scores(ranked: pd.DataFrame, model) -> pd.DataFrame:
    """Every score per site: the profile's columns, the selectors' per-site figures, and the two baselines."""
    frame = ranked.copy()
    sites = [s for s in find_sites(model) if s.name in set(frame["site"])]
    missing = [n for n in score_names("weights") if n not in frame.columns]  # the weights alone: no data needed
    frame = frame.merge(compute_scores(ScoreContext(model, sites), missing), on="site", how="left")
    for name in missing:
        if not SCORES[name].higher_is_better:  # e.g. PEFT prefers a low condition number
            frame[name] = -frame[name]
    frame["depth"] = frame["layer"].astype(float)
    return frame


def choose_sites(scores: pd.DataFrame, n: int | None, seed: int = 0) -> list[str]:
    """Sites spread over the ranking, deterministic from `seed`: the top sites by page, the top site of every other
    score, one site of every role, then sites at evenly spaced ranks over the rest. None: every site."""
    by_rank = scores.sort_values("rank")
    if n is None:
        return list(by_rank["site"])
    if n > len(by_rank):
        raise PlacementError(f"--sites {n} is more than the {len(by_rank)} candidate sites: pass at most "
                             f"{len(by_rank)}, or 'all'")
    chosen = list(by_rank["site"][:TOP_PAGE])
    for column in energy_scores()[1:] + weight_scores():
        if column in scores and scores[column].notna().any():
            chosen.append(scores.loc[scores[column].idxmax(), "site"])
    rng = np.random.default_rng(seed)
    for role, group in by_rank.groupby("role", sort=False):
        if not set(group["site"]) & set(chosen):
            chosen.append(group["site"].iloc[len(group) // 2])
    chosen = list(dict.fromkeys(chosen))[:n]
    rest = [s for s in by_rank["site"] if s not in set(chosen)]
    room = n - len(chosen)
    if room > 0 and rest:
        offset = rng.uniform(0, len(rest) / room)  # the grid's phase is the only random choice
        picks = sorted({min(len(rest) - 1, int(offset + i * len(rest) / room)) for i in range(room)})
        chosen += [rest[i] for i in picks]
    order = {s: i for i, s in enumerate(by_rank["site"])}
    return sorted(chosen, key=order.__getitem__)


def _one_site(base: Plan, site: str) -> Plan:
    return base.with_strategy(Strategy("given", targets=[site], source=site))


def first_step(model, plan: Plan, batch, val_set: list, tokenizer, lr: float, optimizer: str, seed: int,
               eval_kwargs: dict) -> dict:
    """One step on B alone from PEFT's init, on `batch`: the loss drop on that batch and on the validation split,
    and the first-order prediction of the drop on the batch."""
    peft_model = apply_plan(copy.deepcopy(model), plan, seed).eval()
    params = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_B" in name)
    step = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
            else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    before = token_loss(peft_model, batch)
    before.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    predicted = lr * float(grads.pow(2).sum() if optimizer == "sgd" else grads.abs().sum())
    step.step()
    with torch.no_grad():
        after = float(token_loss(peft_model, batch))
    val_after = ev.mean_loss(peft_model, tokenizer, val_set, **eval_kwargs)
    drop = float(before.detach()) - after
    return {f"{optimizer}_drop": drop, f"{optimizer}_predicted": predicted,
            f"{optimizer}_ratio": drop / predicted if predicted > 0 else float("nan"),
            f"{optimizer}_val_after": val_after}


def correlate(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per score: Spearman and Kendall with the gain and their bootstrap intervals, hit@1/3/5 and the regret."""
    out = []
    for column in energy_scores() + weight_scores() + list(BASELINES):
        if column not in rows or rows[column].isna().all():
            continue
        score, gain = rows[column].to_numpy(float), rows["gain"].to_numpy(float)
        out.append({"score": column, **stats.rank_correlations(score, gain, seed=seed),
                    **{f"hit@{k}": stats.hit_at_k(score, gain, k) for k in (1, 3, 5)},
                    "regret": stats.regret(score, gain)})
    return pd.DataFrame(out)


def site_rates(model, tokenizer, table: pd.DataFrame, chosen: list[str], base: Plan, train_set: list,
               settings: ValidateSettings, eval_kwargs: dict, progress: bool = False):
    """(the role sweep or None, the rate of every chosen site): its role's best rate, or --lr for all."""
    if not settings.role_sweep:
        return None, {site: settings.train.lr for site in chosen}
    steps = rr.sweep_steps(settings.train.steps, settings.role_sweep_steps)
    rates = rr.choose_role_rates(model, tokenizer, base, table, chosen, train_set, settings.role_lr_grid, steps,
                                 settings.train, eval_kwargs, progress)
    roles = table.set_index("site")["role"]
    return rates, {site: rates.best[roles[site]] for site in chosen}


def train_site(model, tokenizer, plan: Plan, row: dict, splits, first_batch, lr: float, settings: ValidateSettings,
               eval_kwargs: dict, base_val: float) -> dict:
    """One site: the first-step drops, then training at `lr` and the gain on the validation split."""
    began = time.perf_counter()
    train_set, val_set = splits
    for optimizer in ("sgd", "adamw"):
        row |= first_step(model, plan, first_batch, val_set, tokenizer, settings.step_lr, optimizer,
                          settings.train.seed, eval_kwargs)
    run = train(copy.deepcopy(model), tokenizer, plan, train_set, replace(settings.train, lr=lr, save_every=0))
    row["lr"] = lr
    row["val_loss"] = ev.mean_loss(run.model, tokenizer, val_set, **eval_kwargs)
    row["gain"] = base_val - row["val_loss"]
    row["seconds"] = time.perf_counter() - began
    del run
    gc.collect()
    return row


def run_validate(model, tokenizer, ranked: pd.DataFrame, base: Plan, splits, settings: ValidateSettings,
                 progress: bool = False) -> Validation:
    """Train one LoRA at each chosen site, at its role's rate, and relate every score to the gain. `ranked` is the
    profile's scores.csv (one row per site); `splits` is (train, validation)."""
    settings.check()
    train_set, val_set = splits
    if not val_set:
        raise PlacementError("validate needs a validation split: pass --validation N with N > 0 or more data")
    table = site_scores(ranked, model)
    chosen = choose_sites(table, settings.sites, settings.train.seed)
    eval_kwargs = dict(batch_size=settings.eval_batch_size, max_length=settings.train.max_length)
    rates, lrs = site_rates(model, tokenizer, table, chosen, base, train_set, settings, eval_kwargs, progress)
    base_val = ev.mean_loss(model, tokenizer, val_set, **eval_kwargs)
    first_batch = data_mod.training_batches(tokenizer, train_set, steps=1, batch_size=settings.train.batch_size,
                                            max_length=settings.train.max_length, seed=settings.train.seed)[0]
    rows = []
    for site in tqdm(chosen, desc="sites", unit="site", disable=not progress):
        row = table.loc[table["site"] == site].iloc[0].to_dict()
        if rates is not None:
            row["lr_at_edge"] = rates.at_edge[row["role"]]
        rows.append(train_site(model, tokenizer, _one_site(base, site), row, splits, first_batch, lrs[site],
                               settings, eval_kwargs, base_val))
    sites = pd.DataFrame(rows)
    return Validation(sites, correlate(sites, settings.train.seed), base_val, rates)


def site_columns() -> list[str]:
    return ["site", "layer", "role", "params", "rank", *energy_scores(), *weight_scores(), "depth", "sgd_drop",
            "sgd_predicted", "sgd_ratio", "sgd_val_after", "adamw_drop", "adamw_predicted", "adamw_ratio",
            "adamw_val_after", "lr", "lr_at_edge", "val_loss", "gain", "seconds"]


def write_validation(result: Validation, out: str | Path, title: str = "") -> None:
    """validation.csv (a row per trained site, with its rate), role_rates.csv (the role sweep, when there is one),
    validation.md (the verdict, the rate of each role and the score table), validation.png."""
    out = Path(out)
    columns = [c for c in site_columns() if c in result.sites.columns]
    write_csv(out / "validation.csv", result.sites[columns])
    write_csv(out / "validation_scores.csv", result.correlations)
    rates = "Every site trained at one rate (no role sweep).\n"
    if result.rates is not None:
        write_csv(out / "role_rates.csv", result.rates.history)
        rates = result.rates.note()
    text = (f"# {title}\n\n" if title else "") + result.verdict() + "\n\n" + \
        f"Untrained validation loss: {result.base_val_loss:.3f}.\n\n" + rates + "\n" + \
        result.correlations.to_markdown(index=False, floatfmt=".3f") + "\n"
    write_text(out / "validation.md", text)
    validation_plot(result.sites, result.correlations, out / "validation.png", title=title)


def parse_sites(text: str) -> int | None:
    """--sites N or 'all' (every site: a GPU's job)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise PlacementError(f"--sites {text} is not a number of sites: pass a positive integer or 'all'") from None


def read_scores(folder: str | Path) -> tuple[Plan, pd.DataFrame]:
    """A profile's plan and scores.csv (for --scores), checked before any model loads."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    path = folder / "scores.csv"
    if not path.is_file():
        raise PlacementError(f"{folder} has no scores.csv: pass the --out folder of placement profile")
    ranked = read_table(path, "rerun placement profile", {"site", "layer", "role", "d_in", "d_out", "rank", "page"},
                        numeric={"layer", "d_in", "d_out", "rank", "page"})
    plan = Plan.load(folder / "plan.json")
    unknown = sorted(set(ranked["site"]) - {row.get("site") for row in plan.sites if isinstance(row, dict)})
    if unknown:
        raise PlacementError(f"{path} names {unknown[0]}, which is no site of its plan's model: rerun placement profile")
    return plan, ranked


def validate_study(model, tokenizer, source, data: str, splits, settings: ValidateSettings, out: str | Path, *,
                   given: tuple[Plan, pd.DataFrame] | None, probe_settings, batches: int,
                   progress: bool = False) -> Validation:
    """The validate study: probe on the training split (or use a given profile), train the chosen sites, write
    validation.csv/.md/.png."""
    from .profile import run_profile, write_profile

    if given is not None:
        base, ranked = given
        base.check(model)
    else:
        profile = run_profile(model, tokenizer, source, data, batches=batches, batch_size=settings.train.batch_size,
                              max_length=settings.train.max_length, settings=probe_settings, progress=progress,
                              examples=splits[0])
        write_profile(profile, Path(out) / "profile", title=f"{source.name} on {data}: page")
        base, ranked = profile.plan, profile.ranked
    result = run_validate(model, tokenizer, ranked, base, splits, settings, progress=progress)
    write_validation(result, out, title=f"{source.name} on {data}")
    return result


def summary(result: Validation, out) -> tuple[dict, list[str]]:
    """What `placement validate` prints, and its JSON form."""
    table = result.correlations[["score", "spearman", "spearman_lo", "spearman_hi", "kendall", "hit@1", "hit@3",
                                 "regret"]]
    return ({"verdict": result.verdict(), "base_val_loss": result.base_val_loss, "scores": table.to_dict("records"),
             "sites": len(result.sites), "out": str(out),
             "role_rates": None if result.rates is None else result.rates.best},
            [result.verdict(), table.to_markdown(index=False, floatfmt=".3f"),
             f"wrote {out}/validation.csv, validation.md, validation.png"])
