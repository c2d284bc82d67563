"""The shape every adapter family has, and the registry the rest of the tool looks families up in.

As PEFT registers its methods (`register_peft_method(name=, config_cls=, model_cls=)`, each method in its own
package), a family registers here, from its own module, everything about itself: where its candidate sites are in
any decoder, how many parameters it trains at a site, the config that applies a plan, its init-gradient score, the
size an arm may give it (`series-bn:rf16`), whether its adapter is PEFT's or ours (then how it is attached, saved and
loaded), and which export formats can say it. The CLI's help, the comparison arms (`ia3-4`, `prefix:len10`), the
probe and the exports read these fields; no other module names a family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import PlacementError


@dataclass(frozen=True)
class Size:
    """The size an arm gives a family after ':' (`:r8`, `:rf16`, `:len10`)."""

    key: str  # the modifier: r, rf, len
    name: str  # rank, reduction factor, length
    says: str  # what it is, with an example: "a bottleneck reduction factor, e.g. series-bn:rf16"
    default: int | None = None  # when an arm gives none
    arg: str | None = None  # the key a plan's `family_args` holds it under (LoRA's rank is `peft.r`)


@dataclass(frozen=True)
class Candidate:
    """One site of a family that starts as the identity, as its init-gradient score reads it: with every candidate
    at its initial value the forward is the base model's, so hooks on the site see the first gradient it would get
    alone. `gradient(x, y, grad)` is the parameter's first gradient for one batch from the site's input x, output y
    and the gradient at its output (`reads == "output"`) or input (`"input"`)."""

    params: int
    gradient: Callable
    reads: str = "output"


@dataclass(frozen=True)
class Part:
    """One site of a virtual-token family, scored from PEFT's own model: `grad(peft_model)` is the part of the first
    gradient that belongs to the site (after a backward)."""

    site: str
    layer: int
    role: str
    params: int
    grad: Callable


@dataclass(frozen=True)
class Own:
    """An adapter of ours (PEFT lacks the method): how it goes on a model, how its tensors are read and restored (a
    checkpoint), and its files (`schema` in adapter_config.json names the family that reads them back)."""

    config_type: type
    schema: str
    attach: Callable  # (model, config, seed) -> the model, adapted in place
    holds: Callable  # (model) -> whether this family's adapter is on it
    tensors: Callable  # (model) -> {name: tensor}
    load_tensors: Callable  # (model, state) -> None
    save: Callable  # (model, folder) -> None
    load: Callable  # (model, folder) -> the model with the saved adapter


@dataclass(frozen=True)
class Family:
    name: str
    help: str  # one line: what it trains and where (PEFT's class or ours); the CLI and the arm help show it
    find_sites: Callable  # (model) -> list[Site]: its candidate sites (for virtual tokens: the modules they reach)
    params: Callable  # (site row with d_in and d_out, size) -> trainable parameters there
    config: Callable  # (kwargs) -> the config object that applies it (PEFT's config class, or ours)
    kwargs: Callable  # (plan, model or None) -> the kwargs of `config` for a plan of this family
    score: str = ""  # the init-gradient score's name, for the help
    roles: tuple[str, ...] | None = None  # the site roles it adapts among LoRA's sites (None: all, or none for
    #                                       a virtual-token family); an arm without -N takes every one of them
    size: Size | None = None  # what an arm's ':' modifier sets; None: it takes none
    count: str = "optional"  # whether an arm takes -N: "optional" or "none"
    ranked: bool = True  # -N takes the N best sites by the family's own score (False: the last N sites)
    candidate: Callable | None = None  # (site, module, ScoreOptions) -> Candidate: scored in one shared pass
    parts: Callable | None = None  # (peft_model, model, length) -> list[Part]: scored in a pass of its own
    virtual: bool = False  # virtual tokens: its plan reaches modules (embedding, blocks) rather than linear sites
    supports: Callable | None = None  # (model_type) -> None, or a PlacementError for a model it cannot adapt
    own: Own | None = None  # an adapter of ours; None: PEFT's (get_peft_model, save_pretrained)
    mergeable: bool = False  # folds into the base weights (--merge)
    checkpointing: bool = True  # trains under gradient checkpointing (PEFT's prefix tuning refuses it)
    formats: tuple[str, ...] = ("plan",)  # export formats that can say a plan of this family

    def help_line(self) -> str:
        size = f"; :{self.size.key}N {self.size.name}" + (f" ({self.size.default})" if self.size.default else "") \
            if self.size else ""
        return f"{self.name}: {self.help}" + (f"; score: {self.score}" if self.score else "") + size


@dataclass(frozen=True)
class ScoreOptions:
    """What a shared-pass score may need beyond the site: a bottleneck's width (or reduction factor), activation,
    scale and the seed of its random draws."""

    width_factor: int = 16
    width: int | None = None
    activation: str = "relu"
    scale: float = 1.0
    seed: int = 0


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the registry (`placement.register_family`); its name must be new."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a placement.families.Family, not {type(family).__name__}")
    if family.name in FAMILIES:
        raise ValueError(f"adapter family {family.name} is registered twice")
    if family.count not in ("optional", "none"):
        raise ValueError(f"adapter family {family.name}: count must be 'optional' or 'none', not {family.count!r}")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Drop a family (a test's own, once it is done)."""
    FAMILIES.pop(name, None)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise PlacementError(f"unknown adapter family '{name}': choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_names(kind: str | None = None) -> tuple[str, ...]:
    """The registered names in registration order; `kind` picks those scored in a shared pass (`shared`), in a pass
    of their own (`virtual`), or with an adapter of ours (`own`)."""
    test = {None: lambda f: True, "shared": lambda f: f.candidate is not None, "virtual": lambda f: f.virtual,
            "own": lambda f: f.own is not None}[kind]
    return tuple(name for name, family in FAMILIES.items() if test(family))


def families_help() -> str:
    """One line per family: the help of `--families` and of the family arms."""
    return "; ".join(family.help_line() for family in FAMILIES.values())
