"""The arm grammar, `NAME[-N|-P%][:rN|:rfN|:lenN][+VARIANT]` (top-4, budget-5%, dominant:r64, series-bn:rf16,
prefix:len10, all-linear+dora), parsed here and nowhere else. The names are the strategies' (`strategies.py`) and
every other registered family's; the sizes after ':' are those the families registered (`Family.size`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PlacementError
from ..families import FAMILIES, Family, get_family
from ..families.lora import VARIANTS
from ..model.sites import find_sites, num_layers
from .strategies import Kind, Strategy, allocate_strategy, kinds


@dataclass(frozen=True)
class Arm:
    label: str  # as the user wrote it
    strategy: str  # a registry key
    k: int | None = None
    r: int | None = None
    percent: float | None = None  # budget-P%: P% of all-linear LoRA's parameters at the arm's rank
    variant: str | None = None  # a LoRA variant of PEFT (+dora, +pissa, ...); None: the comparison's default
    size: int | None = None  # another family's size: a bottleneck's reduction factor (:rfN), virtual tokens (:lenN)


_FORM = re.compile(r"^(?P<base>[a-z][a-z0-9-]*?)(?:-(?P<n>\d+(?:\.\d+)?)(?P<percent>%)?)?"
                   r"(?P<mods>(?::[a-z]+\d+)*)(?:\+(?P<variant>[a-z]+))?$")


def _arms() -> dict[str, Kind]:
    return {kind.arm: kind for kind in kinds().values() if kind.arm}


def _sizes() -> dict:
    """modifier -> the Size that families registered under it (r: LoRA's rank, rf: a bottleneck's, len: tokens)."""
    return {f.size.key: f.size for f in FAMILIES.values() if f.size}


def arm_help() -> str:
    forms = []
    for kind in _arms().values():
        forms.append({"required": f"{kind.arm}-N", "optional": f"{kind.arm}[-N]",
                      "percent": f"{kind.arm}-P%"}.get(kind.count, kind.arm))
    sizes = ", ".join(f"':{key}N' {size.says}" for key, size in _sizes().items())
    return ", ".join(forms) + f"; {sizes}, and '+VARIANT' a LoRA variant, e.g. dominant+dora"


def parse_arm(label: str) -> Arm:
    """One arm of the grammar, checked whole: an unknown name, a count or share it does not take, a modifier of
    another family or a variant is one clear line, before anything is computed."""
    match = _FORM.match(label)
    whole = match and (match["base"] + (f"-{match['n']}" if match["n"] and not match["percent"] else ""))
    arms = _arms()
    if match and whole in arms and arms[whole].count == "none":  # names that end in a number, like random-1
        kind, n = arms[whole], None
    elif match and match["base"] in arms:
        kind, n = arms[match["base"]], float(match["n"]) if match["n"] else None
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
    size, sizes = None, _sizes()
    for key, value in re.findall(r":([a-z]+)(\d+)", mods):
        if key not in sizes:
            raise PlacementError(f"arm '{label}': unknown modifier :{key}; arms take "
                                 + ", ".join(f":{k}N ({v.says})" for k, v in sizes.items()))
        if key != kind.modifier:
            takes = f"takes :{kind.modifier}N, {sizes[kind.modifier].says}" if kind.modifier else "takes no size"
            raise PlacementError(f"arm '{label}': :{key} is {sizes[key].says}; {kind.arm} {takes}")
        if size is not None:
            raise PlacementError(f"arm '{label}' gives its {sizes[key].name} twice: keep one :{key}N")
        size = int(value)
        if size < 1:
            raise PlacementError(f"arm '{label}' has {sizes[key].name} 0, which leaves nothing to train: give a "
                                 f"positive one, {sizes[key].says.split(', ')[1]}")
    return size


def parse_arms(spec: str) -> list[Arm]:
    labels = [a.strip() for a in spec.split(",") if a.strip()]
    if not labels:
        raise PlacementError(f"--arms '{spec}' names no arm: pass a comma-separated list of {arm_help()}")
    if len(set(labels)) < len(labels):
        raise PlacementError(f"--arms '{spec}' names an arm twice: list each arm once")
    return [parse_arm(label) for label in labels]


def check_arms(arms: list[Arm], model) -> None:
    """Refuse an arm this model cannot give (more sites or layers than it has, a family it cannot adapt) before
    anything is computed."""
    sites = len(find_sites(model))
    layers = num_layers(model)
    for arm in arms:
        family = arm_family(arm)
        limit, what = (layers, "layers") if arm.strategy == "last-k" else (sites, "candidate sites")
        if family != "lora":
            limit, what = _check_family(arm, model, get_family(family))
        if arm.k is not None and arm.k > limit:
            raise PlacementError(f"arm '{arm.label}' asks for {arm.k} {what}, but this model has {limit}: "
                                 f"pass N of at most {limit}")


def _check_family(arm: Arm, model, family: Family) -> tuple[int, str]:
    """What an arm's family cannot do on this model, found before any training (a model type it does not take, a
    bottleneck of width 0); returns how many sites it has here, and what they are."""
    if family.supports is not None:
        try:
            family.supports(model.config.model_type)
        except PlacementError as err:
            raise PlacementError(f"arm '{arm.label}': {err}") from err
    found = family.find_sites(model)
    if family.size is not None:
        for site in found:
            try:
                family.params(site.to_dict(), arm.size)
            except PlacementError as err:  # a width of 0
                raise PlacementError(f"arm '{arm.label}': {err}") from err
    return len(found), ("layers" if family.virtual else f"{family.name} sites")


def selector_k(arms: list[Arm]) -> int:
    """kappa and snr without a count take as many sites as the first top-N arm (4 when there is none)."""
    return next((a.k for a in arms if a.strategy == "top-k"), 4)


def arm_family(arm: Arm) -> str:
    """The adapter family an arm trains (LoRA unless its kind says otherwise)."""
    return kinds()[arm.strategy].family


def ranked_family(arm: Arm) -> str | None:
    """The module family whose own ranking an arm takes its top N sites from (series-bn-4, ia3-1), or None."""
    family = arm_family(arm)
    return family if family != "lora" and arm.k is not None and get_family(family).ranked else None


def arm_strategy(arm: Arm, model, default_k: int, seed: int = 0, all_linear_params: int | None = None,
                 spectrum: dict | None = None, rows: list[dict] | None = None,
                 family_ranking: dict[str, list[str]] | None = None) -> Strategy:
    """The strategy an arm stands for; data-free selectors pick their sites from the model's weights here, and a
    budget or allocate arm's share becomes a parameter count of `all_linear_params` (all-linear LoRA at the arm's
    rank); allocate spends it by the profile's gradient `spectrum` over the site `rows`. Another family's top-N arm
    takes the first N of its sites in `family_ranking` (family -> sites, best first, by its init-gradient score)."""
    kind = kinds()[arm.strategy]
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
