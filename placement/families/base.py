"""The shape every adapter family has, and the registry the rest of the tool looks families up in.

As PEFT registers its methods (a config class and a model class under a name), a family registers here: where its
candidate sites are in any decoder, how a plan applies it, and how many parameters it trains at a site. Its
init-gradient score is computed by the probe from what the family provides (for LoRA, PEFT's draw of A).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import PlacementError


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    find_sites: Callable  # (model) -> list[Site]
    params: Callable  # (site row with d_in and d_out, size: LoRA's rank, a bottleneck's reduction factor) -> params
    config: Callable  # (a plan's adapter arguments) -> the config object that applies it (PEFT's, or ours)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"adapter family {family.name} is registered twice")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise PlacementError(f"unknown adapter family '{name}': choose one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
