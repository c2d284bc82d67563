"""The single-site learning rate of each role, chosen by a short sweep so that every site is trained at a rate that
suits its kind: a value projection and an FFN down projection need not learn best at one rate.

For every role among the sites `validate` trains, the role's top site (by the ranking) is trained for a few steps at
each rate of a grid on the training split less a slice held out for the sweep, and scored by its loss on that slice.
The validation split, which measures the gain, is never seen by the choice.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import pandas as pd
from tqdm.auto import tqdm

from ..errors import PlacementError
from ..plan.plan import Plan
from ..plan.strategies import Strategy
from ..train import evaluate as ev
from ..train.trainer import TrainError, TrainSettings, train

ROLE_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_SHARE = 0.1  # of the training split, held out to score the sweep (as the validation split: 10%, 8 to 64)
SWEEP_MIN, SWEEP_MAX = 8, 64  # a tiny split still scores on several questions; a large one costs no more


@dataclass
class RoleRates:
    """The sweep's outcome: a row per (role, rate) with the sweep loss, and each role's best rate."""
    history: pd.DataFrame  # role, site, lr, sweep_loss
    best: dict[str, float]
    at_edge: dict[str, bool]

    def table(self) -> pd.DataFrame:
        """A row per role: its swept site, best rate, whether the best sits on the grid's edge."""
        rows = self.history.loc[self.history.groupby("role", sort=False)["sweep_loss"].idxmin()]
        return rows.assign(lr_at_edge=[self.at_edge[r] for r in rows["role"]]).reset_index(drop=True)

    def note(self) -> str:
        """One line per role for validation.md."""
        lines = [f"- {row.role}: {row.lr:g} (swept on {row.site}, sweep loss {row.sweep_loss:.3f})"
                 + (" - at the grid's edge: the best rate may lie beyond it" if row.lr_at_edge else "")
                 for row in self.table().itertuples()]
        return "Learning rate per role, from the sweep on the held-out slice of the training split:\n\n" + \
            "\n".join(lines) + "\n"


def parse_grid(text) -> tuple[float, ...]:
    """`--role-lr-grid 1e-3,3e-3,1e-2`: the rates the role sweep tries, each positive and finite."""
    if isinstance(text, (tuple, list)):
        return tuple(text)
    try:
        rates = tuple(float(r) for r in str(text).split(",") if r.strip())
    except ValueError:
        raise PlacementError(f"--role-lr-grid '{text}' is not a comma-separated list of numbers: "
                             "pass e.g. 1e-3,3e-3,1e-2") from None
    if not rates:
        raise PlacementError("--role-lr-grid is empty: pass comma-separated rates such as 1e-3,3e-3,1e-2")
    bad = [r for r in rates if not (r > 0 and math.isfinite(r))]
    if bad:
        raise PlacementError(f"--role-lr-grid holds {bad[0]:g}, which is not a learning rate: pass positive rates "
                             "such as 1e-3,3e-3,1e-2")
    return tuple(sorted(set(rates)))


def show_grid(rates) -> str:
    return ",".join(f"{r:g}" for r in rates)


def sweep_split(train_set: list, share: float = SWEEP_SHARE) -> tuple[list, list]:
    """(the sweep's training examples, the slice held out to score it): the slice is the training split's tail, so
    it is disjoint from the validation split by construction and fixed by the split's seed."""
    held = min(SWEEP_MAX, max(SWEEP_MIN, int(round(share * len(train_set)))))
    if held >= len(train_set):
        raise PlacementError(f"the role sweep holds out {held} of {len(train_set)} training examples and leaves "
                             "none to train on: pass more data, or --no-role-sweep")
    return train_set[:-held], train_set[-held:]


def role_tops(table: pd.DataFrame, chosen: list[str]) -> dict[str, str]:
    """The top site (best rank) of each role among the chosen sites, roles in ranking order."""
    rows = table[table["site"].isin(chosen)].sort_values("rank")
    return dict(rows.groupby("role", sort=False)["site"].first())


def sweep_steps(steps: int, given: int | None) -> int:
    """The sweep's steps: as given, else a third of the training's (at least one)."""
    return given if given is not None else max(1, round(steps / 3))


def sweep_site(model, tokenizer, plan: Plan, slices: tuple[list, list], grid, train_settings: TrainSettings,
               eval_kwargs: dict) -> list[float]:
    """The held-out slice's loss after training `plan` at each rate of `grid` (same seed and data order)."""
    fit, held = slices
    losses, failure = [], None
    for lr in grid:
        try:
            run = train(copy.deepcopy(model), tokenizer, plan, fit, replace(train_settings, lr=lr, save_every=0))
        except TrainError as err:  # a rate too high for the site diverges: it loses the sweep, it does not end it
            losses.append(float("inf"))
            failure = err
            continue
        losses.append(ev.mean_loss(run.model, tokenizer, held, **eval_kwargs))
        del run
    if failure is not None and not any(math.isfinite(v) for v in losses):
        raise failure  # no rate trains: the cause is not the rate
    return losses


def choose_role_rates(model, tokenizer, base: Plan, table: pd.DataFrame, chosen: list[str], train_set: list,
                      grid, steps: int, train_settings: TrainSettings, eval_kwargs: dict,
                      progress: bool = False) -> RoleRates:
    """Sweep `grid` on the top site of each role among `chosen` for `steps` steps; the best rate per role is the
    one with the lowest loss on the held-out slice of the training split."""
    slices = sweep_split(train_set)
    settings = replace(train_settings, steps=steps)
    rows, best, at_edge = [], {}, {}
    tops = role_tops(table, chosen)
    for role, site in tqdm(tops.items(), desc="role sweep", unit="role", disable=not progress):
        plan = base.with_strategy(Strategy("given", targets=[site], source=site))
        losses = sweep_site(model, tokenizer, plan, slices, grid, settings, eval_kwargs)
        rows += [{"role": role, "site": site, "lr": lr, "sweep_loss": v} for lr, v in zip(grid, losses)]
        best[role] = min((v, lr) for lr, v in zip(grid, losses))[1]
        at_edge[role] = len(grid) > 1 and best[role] in (grid[0], grid[-1])
    return RoleRates(pd.DataFrame(rows, columns=["role", "site", "lr", "sweep_loss"]), best, at_edge)
