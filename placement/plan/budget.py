"""Selectors at equal parameters: a budget, and the one rule that turns a score into a plan at it.

A budget is a percent of all-linear LoRA's trainable parameters at the same rank (or a number of parameters). A
selector is a score and a rule:

- every energy of the score registry (non-negative, additive over sites: page, grad_energy, fisher, lookahead,
  lora_drop, act_norm, ...): greedily by score per trainable parameter at rank r;
- every order-only score of the weights (kappa, params): in the score's own direction (kappa lowest first);
- `snr` in Spectrum's own order, as the `snr` arm takes it: the best site of each role, then the second best of
  each, and so on, strongest first within a round (a plan of one role's cheapest sites is not Spectrum's pick);
- either way a site that does not fit is skipped, and ties go to model order;
- `page_opt` takes `allocate`'s per-site ranks (captured gradient energy under the budget);
- role selectors (`down`, `ffn`): every site of the role at the largest uniform rank that fits, skipped where rank 1
  does not.

The score selectors are read from the registry at each lookup, so a score registered later is a selector too.
A recommendation folder's plan at a budget (`recommended_path`) is what `plan --strategy recommended` reads.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PlacementError
from ..families.lora import lora_params
from ..model.sites import ROLES
from ..probe.registry import SCORES
from .selectors import role_rounds
from .strategies import FFN, allocate_ranks

RECOMMENDATION = "recommendation.md"
DECISION = "recommendation.json"
# a score whose selector takes allocate's per-site ranks from the probe's gradient spectrum instead of one rank
ALLOCATED = {"page_opt"}
# order-only scores taken best of each role first, round by round, as their source picks them (Spectrum)
PER_ROLE = {"snr"}


@dataclass(frozen=True)
class Selector:
    name: str
    help: str
    rule: str  # energy, order, per-role, allocate, role
    score: str | None = None  # the score it reads (None for role rules)
    ascending: bool = False  # order rule: lowest first (kappa)
    roles: frozenset = frozenset()


@dataclass
class Pick:
    """What a selector chose at a budget: targets in model order and each one's rank (None: skipped, and why)."""

    selector: str
    max_params: int
    ranks: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def targets(self) -> list[str]:
        return list(self.ranks)

    def params(self, rows: list[dict]) -> int:
        by_site = {row["site"]: row for row in rows}
        return sum(lora_params(by_site[t], r) for t, r in self.ranks.items())

    @property
    def uniform_rank(self) -> int | None:
        values = set(self.ranks.values())
        return values.pop() if len(values) == 1 else None


ROLE_SELECTORS: dict[str, Selector] = {}


def register_selector(selector: Selector) -> Selector:
    """Add a selector that reads no score (a role rule); score selectors come from the score registry."""
    ROLE_SELECTORS[selector.name] = selector
    return selector


def score_selector(name: str) -> Selector | None:
    """The selector of a registered score: an energy goes greedy per parameter (page_opt: allocate), an order-only
    score of the weights in its own direction; other scores (standard errors, coherence) select nothing."""
    score = SCORES.get(name)
    if score is None:
        return None
    if score.energy:
        rule = "allocate" if name in ALLOCATED else "energy"
        return Selector(name, f"greedy by {name} per trainable parameter: {score.help}", rule, name)
    if score.needs == "weights":
        rule = "per-role" if name in PER_ROLE else "order"
        return Selector(name, score.help, rule, name, ascending=not score.higher_is_better)
    return None


def selectors() -> dict[str, Selector]:
    """Every selector: one per selectable registered score, then the role rules."""
    found = {name: score_selector(name) for name in SCORES}
    return {name: s for name, s in found.items() if s is not None} | ROLE_SELECTORS


register_selector(Selector("down", "every FFN down projection at the largest uniform rank that fits", "role",
                           roles=frozenset({"down"})))
register_selector(Selector("ffn", "every FFN projection at the largest uniform rank that fits", "role",
                           roles=frozenset(FFN)))


def get_selector(name: str) -> Selector:
    known = selectors()
    if name not in known:
        raise PlacementError(f"unknown selector {name}: choose from {', '.join(known)}")
    return known[name]


# -- budgets ----------------------------------------------------------------------------------------------------
def all_linear_params(rows: list[dict], r: int) -> int:
    return sum(lora_params(row, r) for row in rows)


def parse_budgets(text: str) -> list[float]:
    """'1%,2.5%,5%' -> [1.0, 2.5, 5.0] (percent of all-linear)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part.rstrip("%"))
        except ValueError:
            raise PlacementError(f"budget '{part}' is not a percent: write e.g. 1%,2.5%,5%") from None
        if not (0 < value <= 100 and math.isfinite(value)):
            raise PlacementError(f"budget {part} is outside (0%, 100%]: pass percents of all-linear LoRA up to 100%")
        out.append(value)
    if not out:
        raise PlacementError("--budget names no budget: pass e.g. 1%,2.5%,5%")
    return out


def budget_params(percent: float, rows: list[dict], r: int) -> int:
    """The parameter count of a percent budget, checked to fit at least the smallest rank-r adapter."""
    full = all_linear_params(rows, r)
    n = int(full * percent / 100)
    smallest = min(lora_params(row, r) for row in rows)
    if n < smallest:
        raise PlacementError(f"budget {percent:g}% ({n} parameters) is below the smallest rank-{r} adapter here "
                             f"({smallest} parameters, {100 * smallest / full:.3g}% of all-linear): raise it")
    return n


def budget_label(percent: float) -> str:
    return f"{percent:g}%"


# -- the rules -------------------------------------------------------------------------------------------------
def _model_order(rows: list[dict]) -> list[dict]:
    role = lambda row: ROLES.index(row["role"]) if row["role"] in ROLES else len(ROLES)  # noqa: E731
    return sorted(rows, key=lambda row: (int(row["layer"]), role(row)))


def _greedy(order: list[dict], max_params: int, r: int) -> dict[str, int]:
    chosen, spent = {}, 0
    for row in order:
        cost = lora_params(row, r)
        if spent + cost <= max_params:
            chosen[row["site"]] = r
            spent += cost
    return chosen


def _in_model_order(rows: list[dict], ranks: dict[str, int]) -> dict[str, int]:
    return {row["site"]: ranks[row["site"]] for row in _model_order(rows) if row["site"] in ranks}


def _score_of(scores: dict[str, float], site: str, missing: float = -math.inf) -> float:
    """A site's score; a missing or NaN score sorts last either way (an infinite snr is a real, top value)."""
    value = scores.get(site, float("nan"))
    return missing if math.isnan(value) else value


def energy_pick(rows, scores, max_params, r) -> dict[str, int]:
    """Greedy by score per parameter; Python's sort is stable, so ties keep model order."""
    order = sorted(_model_order(rows), key=lambda row: -_score_of(scores, row["site"]) / lora_params(row, r))
    return _greedy(order, max_params, r)


def order_pick(rows, scores, max_params, r, ascending: bool) -> dict[str, int]:
    if ascending:
        order = sorted(_model_order(rows), key=lambda row: _score_of(scores, row["site"], math.inf))
    else:
        order = sorted(_model_order(rows), key=lambda row: -_score_of(scores, row["site"]))
    return _greedy(order, max_params, r)


def per_role_pick(rows, scores, max_params, r) -> dict[str, int]:
    """Spectrum's order (`selectors.role_rounds`, as `snr_targets` takes it): round k holds every role's k-th best
    site, strongest first within the round, ties in model order; greedy in that order, a site that does not fit
    skipped."""
    ordered = _model_order(rows)
    position = {row["site"]: i for i, row in enumerate(ordered)}
    by_site = {row["site"]: row for row in ordered}
    names = role_rounds(list(by_site), {row["site"]: row["role"] for row in ordered},
                        lambda name: (-_score_of(scores, name), position[name]))
    return _greedy([by_site[name] for name in names], max_params, r)


def role_pick(rows, roles, max_params) -> tuple[dict[str, int], str | None]:
    chosen = [row for row in _model_order(rows) if row["role"] in roles]
    if not chosen:
        return {}, "the model has no site of this role"
    per_rank = sum(lora_params(row, 1) for row in chosen)
    rank = max_params // per_rank
    if rank < 1:
        return {}, f"rank 1 on its {len(chosen)} sites takes {per_rank} parameters, over the budget"
    return {row["site"]: int(rank) for row in chosen}, None


def pick(selector: Selector | str, rows: list[dict], scores: dict[str, float] | None, max_params: int, r: int,
         spectrum: dict | None = None) -> Pick:
    """A selector's sites (and ranks) at a budget of `max_params` over the site rows of a plan."""
    selector = get_selector(selector) if isinstance(selector, str) else selector
    skipped = None
    if selector.rule == "role":
        ranks, skipped = role_pick(rows, selector.roles, max_params)
    elif selector.rule == "allocate":
        if spectrum is None:
            raise PlacementError("selector page_opt needs the gradient spectrum of the exact probe: drop --fast")
        ranks = allocate_ranks(spectrum, rows, max_params, max_rank=max(64, r))
    elif selector.rule == "order":
        ranks = order_pick(rows, scores or {}, max_params, r, selector.ascending)
    elif selector.rule == "per-role":
        ranks = per_role_pick(rows, scores or {}, max_params, r)
    else:
        ranks = energy_pick(rows, scores or {}, max_params, r)
    if not ranks and skipped is None:
        skipped = "no site fits the budget"
    return Pick(selector.name, max_params, _in_model_order(rows, ranks), skipped)


# -- a recommendation folder -----------------------------------------------------------------------------------
def plan_file(budget: str) -> str:
    return f"plan-{budget}.json"


def recommended_path(folder: str | Path, budget: str) -> Path:
    """The recommended plan file of a recommendation folder at `budget` (e.g. 2.5% or 2.5)."""
    folder = Path(folder)
    if not (folder / DECISION).is_file():
        raise PlacementError(f"{folder} holds no recommendation: run placement recommend --out {folder} first")
    path = next((folder / plan_file(b) for b in (budget, f"{budget}%") if (folder / plan_file(b)).is_file()), None)
    if path is None:
        known = list(json.loads((folder / DECISION).read_text(encoding="utf-8")))
        raise PlacementError(f"{folder} has no recommendation at budget {budget}: choose one of {', '.join(known)}")
    return path
