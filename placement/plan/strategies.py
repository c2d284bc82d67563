"""Every way the tool picks sites, in one registry: the CLI's `--strategy` choices, the comparison arms, their
grammar and their help text all come from it.

A strategy picks from a probe's ranking (`dominant`, `top-k`, `budget`), by structure alone (`all-linear`,
`attn-qv`, `ffn`, `last-k`, `random-1`), or from the base weights without data (`kappa`, `snr`, see
`selectors.py`). An arm of a comparison is a strategy, or another registered family (`kinds()` derives its arm from
the family registry), written in one grammar parsed in `arms.py`.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import PlacementError
from ..families import FAMILIES, Family
from ..families.lora import lora_params
from ..model.sites import ROLES
from . import selectors

ATTN_QV = {"q", "v", "qkv"}
FFN = {"gate", "up", "down", "gate_up"}


@dataclass
class Strategy:
    """A choice of sites as a plan records it (`name` is a registry key, or `given` for sites chosen elsewhere)."""

    name: str = "dominant"
    k: int | None = None  # top-k and last-k
    max_params: int | None = None  # budget
    seed: int = 0  # random-1
    targets: list[str] | None = None  # given: sites chosen elsewhere, e.g. by a data-free selector
    source: str | None = None  # given: what chose them, used as the label
    ranks: dict[str, int] | None = None  # allocate: the rank each chosen site gets

    def check(self) -> None:
        if self.name == "given":
            if not self.targets:
                raise PlacementError("strategy given needs a non-empty list of target sites")
            return
        kind = kinds().get(self.name)
        if kind is None or not (kind.planned or kind.arm):  # compare-only kinds (ia3) are checked as arms
            raise PlacementError(f"unknown strategy {self.name}: choose one of {', '.join(STRATEGIES)}")
        if kind.option == "k" and (self.k is None or self.k < 1):
            raise PlacementError(f"strategy {self.name} needs --k, a positive number")
        if kind.option == "max_params" and (self.max_params is None or self.max_params < 1):
            raise PlacementError(f"strategy {self.name} needs --max-params, a positive number of trainable parameters")
        if self.k is not None and kind.option != "k":
            raise PlacementError(f"--k means nothing to strategy {self.name}: drop it, or use top-k or last-k")
        if self.max_params is not None and kind.option != "max_params":
            raise PlacementError(f"--max-params means nothing to strategy {self.name}: drop it, or use budget")

    def label(self) -> str:
        if self.name == "given":
            return self.source or "given"
        if kinds()[self.name].option == "k":
            return f"{kinds()[self.name].arm}-{self.k}"
        return self.name


@dataclass(frozen=True)
class Kind:
    """One registered strategy. `pick(rows, strategy, r)` takes ranked site rows; a data-free `from_weights(model,
    sites, k)` looks at the model instead. `option` is the CLI option it reads (k, max_params); `arm` its name in
    the arm grammar, `count` whether an arm takes -N (required, optional or not at all)."""

    name: str
    help: str
    pick: Callable | None = None
    from_weights: Callable | None = None
    option: str | None = None
    arm: str | None = None
    count: str = "none"
    planned: bool = True  # offered by `placement plan --strategy`
    family: str = "lora"  # the adapter family the arm trains (a name in families.FAMILIES)
    modifier: str | None = "r"  # the size an arm may give after ':' (r: rank, rf: reduction factor, len: tokens)
    # a plan a run folder already holds: (folder, budget label) -> its plan file; the plan is taken as it is
    from_folder: Callable | None = None


REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    REGISTRY[kind.name] = kind
    return kind


def family_kind(family: Family) -> Kind:
    """The arm of another family than LoRA, as the family registered itself: every site of its roles (or the
    modules it reaches), -N its N best (or last) sites, its size after ':'."""
    return Kind(family.name, family.help_line().split(": ", 1)[1], _by_role(set(family.roles)) if family.roles
                else None, arm=family.name, count=family.count, planned=False, family=family.name,
                modifier=family.size.key if family.size else None)


def kinds() -> dict[str, Kind]:
    """Every strategy and every other family's arm kind; families are read at each call, so a family registered
    after this module was imported has its arms too."""
    return REGISTRY | {name: family_kind(f) for name, f in FAMILIES.items() if name != "lora" and name not in REGISTRY}


def _budget(rows: list[dict], strategy: Strategy, r: int) -> list[dict]:
    """Greedy by score per trainable parameter, skipping sites that no longer fit."""
    cost = lambda s: lora_params(s, r)  # noqa: E731
    order = sorted(rows, key=lambda s: s["score"] / cost(s), reverse=True)
    chosen, spent = [], 0
    for s in order:
        if spent + cost(s) <= strategy.max_params:
            chosen.append(s)
            spent += cost(s)
    if not chosen:
        smallest = min(cost(s) for s in rows)
        raise PlacementError(f"--max-params {strategy.max_params} fits no site: the smallest LoRA here has "
                             f"{smallest} parameters")
    return chosen


def _allocated(rows: list[dict], strategy: Strategy, r: int) -> list[dict]:
    if not strategy.ranks:
        raise PlacementError("strategy allocate needs the profile's gradient spectrum (spectrum.safetensors): "
                             "profile with the exact probe and --spectrum-k of 1 or more")
    return [s for s in rows if s["site"] in strategy.ranks]


def allocate_ranks(spectrum: dict[str, np.ndarray], rows: list[dict], max_params: int,
                   max_rank: int = 64) -> dict[str, int]:
    """A rank per site (sites left out get none) maximising the captured gradient energy
    sum_s sum_{i<=r_s} sigma_{s,i}^2 under sum_s r_s (d_in + d_out) <= max_params: greedy by marginal energy per
    parameter, which also fills what budget is left with whatever still fits. A site's marginal gains fall with
    its rank (the spectrum is descending), so the greedy order is the fractional optimum's."""
    cost = {row["site"]: int(row["d_in"]) + int(row["d_out"]) for row in rows}
    heap = [(-float(values[0]) / cost[site], site) for site, values in spectrum.items()
            if site in cost and len(values) and values[0] > 0]
    heapq.heapify(heap)
    ranks: dict[str, int] = {}
    spent = 0
    while heap:
        _, site = heapq.heappop(heap)
        if spent + cost[site] > max_params:
            continue  # every further rank of this site costs the same, so none fits
        ranks[site] = ranks.get(site, 0) + 1
        spent += cost[site]
        values, taken = spectrum[site], ranks[site]
        if taken < min(max_rank, len(values)) and values[taken] > 0:
            heapq.heappush(heap, (-float(values[taken]) / cost[site], site))
    if not ranks:
        raise PlacementError(f"--max-params {max_params} fits no site: the smallest rank-1 LoRA here has "
                             f"{min(cost.values())} parameters")
    return ranks


def read_spectrum(folder) -> dict[str, np.ndarray] | None:
    """A profile folder's spectrum.safetensors (site -> mean sigma_i^2, descending), or None when it has none."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(folder) / "spectrum.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            sites = handle.metadata()["sites"].split(",")
            values = handle.get_tensor("sigma2")
    except Exception as err:  # an empty or cut file surfaces as the reader's own error type
        raise PlacementError(f"{path} is empty or damaged ({type(err).__name__}): rerun placement profile") from err
    if len(sites) != len(values):
        raise PlacementError(f"{path} is damaged ({len(sites)} sites, {len(values)} spectra): rerun placement profile")
    return dict(zip(sites, values))


def allocate_strategy(max_params: int, spectrum: dict | None, rows: list[dict]) -> Strategy:
    if spectrum is None:
        raise PlacementError("strategy allocate needs the profile's gradient spectrum (spectrum.safetensors): "
                             "profile with the exact probe and --spectrum-k of 1 or more")
    return Strategy("allocate", max_params=max_params, ranks=allocate_ranks(spectrum, rows, max_params))


def _last_layers(rows: list[dict], strategy: Strategy, r: int) -> list[dict]:
    layers = sorted({s["layer"] for s in rows})[-strategy.k:]
    return [s for s in rows if s["layer"] in layers]


def _given(rows: list[dict], strategy: Strategy, r: int) -> list[dict]:
    known = {s["site"] for s in rows}
    unknown = [t for t in strategy.targets if t not in known]
    if unknown:
        raise PlacementError(f"site {unknown[0]} is not a candidate site of this model: pick from placement sites")
    return [s for s in rows if s["site"] in set(strategy.targets)]


def _by_role(roles: set[str]) -> Callable:
    return lambda rows, strategy, r: [s for s in rows if s["role"] in roles]


def _random_one(rows: list[dict], strategy: Strategy, r: int) -> list[dict]:
    return [random.Random(strategy.seed).choice(sorted(rows, key=lambda s: s["site"]))]


def _random_fill(rows: list[dict], strategy: Strategy, r: int) -> list[dict]:
    """Sites in a random order (drawn from `strategy.seed`), each taken while it still fits --max-params."""
    order = sorted(rows, key=lambda s: s["site"])
    random.Random(strategy.seed).shuffle(order)
    chosen, spent = [], 0
    for s in order:
        if spent + lora_params(s, r) <= strategy.max_params:
            chosen.append(s)
            spent += lora_params(s, r)
    if not chosen:
        raise PlacementError(f"--max-params {strategy.max_params} fits no site: the smallest LoRA here has "
                             f"{min(lora_params(s, r) for s in rows)} parameters")
    return chosen


def _by_rank(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda s: s["rank"])


def _recommended(folder, budget: str):
    from .budget import recommended_path  # budget.py builds on this module

    return recommended_path(folder, budget)


register(Kind("dominant", "the top site of the ranking", lambda rows, st, r: _by_rank(rows)[:1], arm="dominant"))
register(Kind("top-k", "the N top sites of the ranking", lambda rows, st, r: _by_rank(rows)[: st.k], option="k",
              arm="top", count="required"))
register(Kind("budget", "greedy by score per trainable parameter within --max-params", _budget,
              option="max_params", arm="budget", count="percent"))
register(Kind("allocate", "sites and a rank each (1-64) capturing the most gradient energy within --max-params",
              _allocated, option="max_params", arm="allocate", count="percent"))
register(Kind("all-linear", "every candidate site (LoRA's full coverage)", lambda rows, st, r: rows,
              arm="all-linear"))
register(Kind("attn-qv", "the query and value projections", _by_role(ATTN_QV), arm="attn-qv"))
register(Kind("ffn", "every feed-forward projection", _by_role(FFN), arm="ffn"))
register(Kind("last-k", "every site of the last N layers", _last_layers, option="k", arm="last", count="required"))
register(Kind("random-1", "one site drawn without looking at scores (the control)", _random_one, arm="random-1"))
register(Kind("random", "sites drawn at random filling a share of all-linear's parameters (a control)", _random_fill,
              option="max_params", arm="random", count="percent", planned=False))
register(Kind("kappa", "PEFT's KappaTune: lowest weight condition number first, no data",
              from_weights=selectors.kappa_targets, arm="kappa", count="optional", planned=False))
register(Kind("snr", "Spectrum's signal-to-noise ratio of the singular values, best of each role, no data",
              from_weights=selectors.snr_targets, arm="snr", count="optional", planned=False))
register(Kind("given", "sites chosen elsewhere", _given, planned=False))
register(Kind("recommended", "the plan a recommend run (its folder as the source) chose at --budget",
              option="budget", from_folder=_recommended))
STRATEGIES = tuple(name for name, kind in REGISTRY.items() if kind.planned and kind.from_folder is None)
FROM_FOLDER = tuple(name for name, kind in REGISTRY.items() if kind.from_folder is not None)  # plan's other choices


def strategy_help() -> str:
    return "; ".join(f"{name}: {REGISTRY[name].help}" for name in STRATEGIES + FROM_FOLDER)


def select(sites: list[dict], strategy: Strategy, r: int) -> list[str]:
    """The target module names a strategy picks from ranked site rows (dicts with site, layer, role, d_in, d_out,
    score, rank), returned in model order (by layer, then role in `ROLES` order, whatever order the rows come in)
    so configs and adapters read naturally."""
    strategy.check()
    kind = kinds()[strategy.name]
    if kind.pick is None:
        raise PlacementError(f"strategy {strategy.label()} picks no LoRA sites: its plan reaches whole modules")
    chosen = kind.pick(sites, strategy, r)
    if not chosen:
        raise PlacementError(f"strategy {strategy.label()} selects no site in this model: choose another strategy")
    picked = {s["site"] for s in chosen}
    return [s["site"] for s in sorted(sites, key=_model_order) if s["site"] in picked]


def _model_order(site: dict) -> tuple[int, int]:
    """Rows arrive sorted by rank; layer and role restore the order of the model (the sort is stable for ties)."""
    return int(site["layer"]), ROLES.index(site["role"]) if site["role"] in ROLES else len(ROLES)


# The arm grammar is in arms.py; its names are importable from here too, as the strategies' callers import them.
from .arms import (Arm, arm_family, arm_help, arm_strategy, check_arms, parse_arm, parse_arms,  # noqa: E402,F401
                   ranked_family, selector_k)
