"""Every way the tool picks sites, in one registry: the CLI's `--strategy` choices, the comparison arms, their
grammar and their help text all come from it.

A strategy picks from a probe's ranking (`dominant`, `top-k`, `budget`), by structure alone (`all-linear`,
`attn-qv`, `ffn`, `last-k`, `random-1`), or from the base weights without data (`kappa`, `snr`, see
`selectors.py`). An arm of a comparison is a strategy written in one grammar,
`NAME[-N|-P%][:rN|:rfN|:lenN][+VARIANT]` (top-4, kappa-8, dominant:r64), parsed in `parse_arm` and nowhere else.
"""
from __future__ import annotations

import heapq
import random
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import PlacementError
from ..families.lora import VARIANTS, lora_params
from ..model.sites import ROLES, find_sites, num_layers
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
        kind = REGISTRY.get(self.name)
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
        if REGISTRY[self.name].option == "k":
            return f"{REGISTRY[self.name].arm}-{self.k}"
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
    family: str = "lora"  # the adapter family the arm trains (families.FAMILIES, or a prompt family)
    modifier: str | None = "r"  # the size an arm may give after ':' (r: rank, rf: reduction factor, len: tokens)


REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    REGISTRY[kind.name] = kind
    return kind


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


def _by_rank(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda s: s["rank"])


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
register(Kind("kappa", "PEFT's KappaTune: lowest weight condition number first, no data",
              from_weights=selectors.kappa_targets, arm="kappa", count="optional", planned=False))
register(Kind("snr", "Spectrum's signal-to-noise ratio of the singular values, best of each role, no data",
              from_weights=selectors.snr_targets, arm="snr", count="optional", planned=False))
register(Kind("given", "sites chosen elsewhere", _given, planned=False))
register(Kind("ia3", "IA3 on every k, v and FFN down projection (PEFT IA3Config; -N: its N top sites by its own "
              "init-gradient score)",
              _by_role(("k", "v", "qkv", "down")), arm="ia3", count="optional", planned=False,
              family="ia3", modifier=None))
register(Kind("series-bn", "series bottleneck after every attention output and FFN down projection (ours; -N: its N "
              "top sites; :rfN reduction factor, 16)", _by_role(("o", "down")), arm="series-bn", count="optional", planned=False,
              family="series-bn",
              modifier="rf"))
register(Kind("parallel-bn", "parallel bottleneck beside every FFN up and down projection (ours; -N: its N top "
              "sites; :rfN reduction factor, 16)", _by_role(("up", "down")), arm="parallel-bn", count="optional", planned=False,
              family="parallel-bn",
              modifier="rf"))
register(Kind("prompt", "prompt tuning, PEFT (:lenN virtual tokens, 10)", arm="prompt", planned=False,
              family="prompt", modifier="len"))
register(Kind("prefix", "prefix tuning on every layer, PEFT (:lenN virtual tokens, 10)", arm="prefix",
              planned=False, family="prefix", modifier="len"))
register(Kind("llama-adapter", "LLaMA-Adapter's gated prompts on the top N layers (all without N), PEFT "
              "(:lenN prompt length, 10)", arm="llama-adapter", count="optional", planned=False,
              family="llama-adapter", modifier="len"))

STRATEGIES = tuple(name for name, kind in REGISTRY.items() if kind.planned)


def strategy_help() -> str:
    return "; ".join(f"{name}: {REGISTRY[name].help}" for name in STRATEGIES)


def select(sites: list[dict], strategy: Strategy, r: int) -> list[str]:
    """The target module names a strategy picks from ranked site rows (dicts with site, layer, role, d_in, d_out,
    score, rank), returned in model order (by layer, then role in `ROLES` order, whatever order the rows come in)
    so configs and adapters read naturally."""
    strategy.check()
    chosen = REGISTRY[strategy.name].pick(sites, strategy, r)
    if not chosen:
        raise PlacementError(f"strategy {strategy.label()} selects no site in this model: choose another strategy")
    picked = {s["site"] for s in chosen}
    return [s["site"] for s in sorted(sites, key=_model_order) if s["site"] in picked]


def _model_order(site: dict) -> tuple[int, int]:
    """Rows arrive sorted by rank; layer and role restore the order of the model (the sort is stable for ties)."""
    return int(site["layer"]), ROLES.index(site["role"]) if site["role"] in ROLES else len(ROLES)


# -- arms: the grammar NAME[-N|-P%][:rN|:rfN|:lenN][+VARIANT] --------------------------------------------------
@dataclass(frozen=True)
class Arm:
    label: str  # as the user wrote it
    strategy: str  # a registry key
    k: int | None = None
    r: int | None = None
    percent: float | None = None  # budget-P%: P% of all-linear LoRA's parameters at the arm's rank
    variant: str | None = None  # a LoRA variant of PEFT (+dora, +pissa, ...); None: the comparison's default
    size: int | None = None  # another family's size: a bottleneck's reduction factor (:rfN), virtual tokens (:lenN)


_ARMS = {kind.arm: kind for kind in REGISTRY.values() if kind.arm}
_FORM = re.compile(r"^(?P<base>[a-z][a-z0-9-]*?)(?:-(?P<n>\d+(?:\.\d+)?)(?P<percent>%)?)?"
                   r"(?P<mods>(?::[a-z]+\d+)*)(?:\+(?P<variant>[a-z]+))?$")
_MODIFIERS = {"r": "a LoRA rank, e.g. dominant:r64", "rf": "a bottleneck reduction factor, e.g. series-bn:rf16",
              "len": "a number of virtual tokens, e.g. prefix:len10"}
_SIZE_NAMES = {"r": "rank", "rf": "reduction factor", "len": "length"}


def arm_help() -> str:
    forms = []
    for kind in _ARMS.values():
        forms.append({"required": f"{kind.arm}-N", "optional": f"{kind.arm}[-N]",
                      "percent": f"{kind.arm}-P%"}.get(kind.count, kind.arm))
    return (", ".join(forms) + "; ':rN' gives a LoRA arm its own rank, e.g. dominant:r64, ':rfN' a bottleneck its "
            "reduction factor, e.g. series-bn:rf16, ':lenN' a prompt family its virtual tokens, e.g. prefix:len10, "
            "and '+VARIANT' a LoRA variant, e.g. dominant+dora")


def parse_arm(label: str) -> Arm:
    """One arm of the grammar, checked whole: an unknown name, a count or share it does not take, a modifier of
    another family or a variant is one clear line, before anything is computed."""
    match = _FORM.match(label)
    whole = match and (match["base"] + (f"-{match['n']}" if match["n"] and not match["percent"] else ""))
    if match and whole in _ARMS and _ARMS[whole].count == "none":  # names that end in a number, like random-1
        kind, n = _ARMS[whole], None
    elif match and match["base"] in _ARMS:
        kind, n = _ARMS[match["base"]], float(match["n"]) if match["n"] else None
    else:
        raise PlacementError(f"unknown arm '{label}': choose from {arm_help()}")
    _check_count(label, kind, n, bool(match["percent"]))
    variant = match["variant"]
    if variant and variant not in VARIANTS:
        raise PlacementError(f"arm '{label}': unknown LoRA variant +{variant}; choose one of "
                             f"{', '.join('+' + v for v in VARIANTS)}")
    size = _size_modifier(label, kind, match["mods"])
    if kind.family != "lora" and variant:
        raise PlacementError(f"arm '{label}': {kind.arm} is not a LoRA; it takes no +VARIANT")
    r, size = (size, None) if kind.modifier == "r" else (None, size)
    if kind.count == "percent":
        return Arm(label, kind.name, None, r, n, variant)
    return Arm(label, kind.name, None if n is None else int(n), r, variant=variant, size=size)


def _check_count(label: str, kind: Kind, n: float | None, percent: bool) -> None:
    if kind.count == "percent":
        if not percent or n is None:
            raise PlacementError(f"arm '{label}' needs a share of all-linear's parameters: write {kind.arm}-P%, "
                                 f"e.g. {kind.arm}-5%")
        if not 0 < n <= 100:
            raise PlacementError(f"arm '{label}': the share must be above 0% and at most 100%")
        return
    if percent:
        raise PlacementError(f"arm '{label}': {kind.arm} takes no percentage; give a count or none")
    if n is not None and not float(n).is_integer():
        raise PlacementError(f"arm '{label}': N must be a whole number")
    if kind.count == "required" and n is None:
        raise PlacementError(f"arm '{label}' needs a count: write {kind.arm}-N, e.g. {kind.arm}-4")
    if kind.count == "none" and n is not None:
        raise PlacementError(f"arm '{label}': {kind.arm} takes no count")
    if n is not None and n < 1:
        raise PlacementError(f"arm '{label}' selects nothing: N must be at least 1")


def _size_modifier(label: str, kind: Kind, mods: str) -> int | None:
    """The arm's :rN, :rfN or :lenN, whichever its family takes, checked positive."""
    size = None
    for key, value in re.findall(r":([a-z]+)(\d+)", mods):
        if key not in _MODIFIERS:
            raise PlacementError(f"arm '{label}': unknown modifier :{key}; arms take "
                                 + ", ".join(f":{k}N ({v})" for k, v in _MODIFIERS.items()))
        if key != kind.modifier:
            takes = f"takes :{kind.modifier}N, {_MODIFIERS[kind.modifier]}" if kind.modifier else "takes no size"
            raise PlacementError(f"arm '{label}': :{key} is {_MODIFIERS[key]}; {kind.arm} {takes}")
        size = int(value)
        if size < 1:
            raise PlacementError(f"arm '{label}' has {_SIZE_NAMES[key]} 0, which leaves nothing to train: give a "
                                 f"positive one, {_MODIFIERS[key].split(', ')[1]}")
    return size


def parse_arms(spec: str) -> list[Arm]:
    labels = [a.strip() for a in spec.split(",") if a.strip()]
    if not labels:
        raise PlacementError(f"--arms '{spec}' names no arm: pass a comma-separated list of {arm_help()}")
    if len(set(labels)) < len(labels):
        raise PlacementError(f"--arms '{spec}' names an arm twice: list each arm once")
    return [parse_arm(label) for label in labels]


def check_arms(arms: list[Arm], model) -> None:
    """Refuse an arm this model cannot give (more sites or layers than it has) before anything is computed."""
    sites = len(find_sites(model))
    layers = num_layers(model)
    for arm in arms:
        _check_family(arm, model)
        if arm.k is None:
            continue
        limit, what = (layers, "layers") if arm.strategy in ("last-k", "llama-adapter") else (sites, "candidate sites")
        if arm.k > limit:
            raise PlacementError(f"arm '{arm.label}' asks for {arm.k} {what}, but this model has {limit}: "
                                 f"pass N of at most {limit}")


def _check_family(arm: Arm, model) -> None:
    """What an arm's family cannot do on this model, found before any training: a model type PEFT's LLaMA-Adapter
    does not take, a bottleneck of width 0."""
    from ..families import get_family
    from ..families.prompts import LLAMA_ADAPTER_TYPES

    family = arm_family(arm)
    if family == "llama-adapter" and model.config.model_type not in LLAMA_ADAPTER_TYPES:
        raise PlacementError(f"arm '{arm.label}': PEFT's LLaMA-Adapter does not support {model.config.model_type} "
                             f"models (it takes {', '.join(LLAMA_ADAPTER_TYPES)}): drop the arm")
    if REGISTRY[arm.strategy].modifier == "rf":
        for site in get_family(family).find_sites(model):
            try:
                get_family(family).params({"d_in": site.d_in, "d_out": site.d_out}, arm.size)
            except PlacementError as err:  # a width of 0
                raise PlacementError(f"arm '{arm.label}': {err}") from err


def selector_k(arms: list[Arm]) -> int:
    """kappa and snr without a count take as many sites as the first top-N arm (4 when there is none)."""
    return next((a.k for a in arms if a.strategy == "top-k"), 4)


def arm_family(arm: Arm) -> str:
    """The adapter family an arm trains (LoRA unless its kind says otherwise)."""
    return REGISTRY[arm.strategy].family


def ranked_family(arm: Arm) -> str | None:
    """The module family whose own ranking an arm takes its top N sites from (series-bn-4, ia3-1), or None."""
    family = arm_family(arm)
    return family if family != "lora" and arm.k is not None and REGISTRY[arm.strategy].modifier != "len" else None


def arm_strategy(arm: Arm, model, default_k: int, seed: int = 0, all_linear_params: int | None = None,
                 spectrum: dict | None = None, rows: list[dict] | None = None,
                 family_ranking: dict[str, list[str]] | None = None) -> Strategy:
    """The strategy an arm stands for; data-free selectors pick their sites from the model's weights here, and a
    budget or allocate arm's share becomes a parameter count of `all_linear_params` (all-linear LoRA at the arm's
    rank); allocate spends it by the profile's gradient `spectrum` over the site `rows`. Another family's top-N arm
    takes the first N of its sites in `family_ranking` (family -> sites, best first, by its init-gradient score)."""
    kind = REGISTRY[arm.strategy]
    family = ranked_family(arm)
    if family is not None:
        ranking = (family_ranking or {}).get(family)
        if not ranking:
            raise PlacementError(f"arm '{arm.label}' ranks the sites by {family}'s score: profile with "
                                 f"--families lora,{family} (or let compare probe)")
        return Strategy("given", targets=ranking[:arm.k], source=arm.label)
    if arm.percent is not None:
        budget = int(arm.percent / 100 * all_linear_params)
        if arm.strategy == "allocate":
            return allocate_strategy(budget, spectrum, rows)
        return Strategy(arm.strategy, max_params=budget, seed=seed)
    if kind.from_weights is not None:
        targets = kind.from_weights(model, find_sites(model), arm.k or default_k)
        return Strategy("given", targets=targets, source=arm.label)
    return Strategy(arm.strategy, k=arm.k, seed=seed)
