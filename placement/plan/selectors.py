"""Data-free site selectors from the ecosystem, as comparison arms beside the gradient-based ranking.

Both look only at the base weights, never at data:

- KappaTune (PEFT's `peft.find_kappa_target_modules`): prefer the sites whose weight has the lowest condition
  number sigma_max / sigma_min.
- Spectrum (Hartford et al. 2024, github.com/cognitivecomputations/spectrum, `spectrum.py`): prefer the sites whose
  singular values stand furthest above a Marchenko-Pastur noise bound, taking the top of each role.

Every selector returns exact `Site.name`s in model order (layer, then role as ordered in `ROLES`). The per-site
figures they take the top of are registered scores (`probe.weights`).
"""
from __future__ import annotations

import itertools
import math

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import PlacementError
from ..model.sites import ROLES, Site
from ..probe.weights import kappa_scores, site_modules, snr_scores  # noqa: F401  (the selectors' scores)


def kappa_targets(model: nn.Module, sites: list[Site], k: int) -> list[str]:
    """The k sites PEFT's `peft.find_kappa_target_modules` would pick (weight condition numbers, no data).

    PEFT scores every `nn.Linear` by kappa = S[0] / (S[-1] + 1e-8) from `torch.linalg.svdvals` of the float32
    weight, skips any matrix with a side over 16384 (its default `max_dim_size_to_analyze`), and ranks lowest kappa
    first. Its one-liner only takes a fraction `top_p`, so it is asked for all modules (`top_p=1.0`), which comes back
    as the full ranking, and the first k are kept.

    It is run on stand-ins rather than on the model: one `nn.Linear` per candidate site, named exactly as the site
    and sharing its weight (a GPT-2 `Conv1D` weight is transposed into the `nn.Linear` layout, which leaves the
    singular values alone). Restricted to the candidates, the ranking is the one PEFT gives on the model itself, but
    no SVD is spent on `lm_head`, routers or fused expert tensors, and `Conv1D` sites, which PEFT does not scan, are
    ranked too.
    """
    _check_k(sites, k)
    from peft.helpers import find_kappa_target_modules

    result = find_kappa_target_modules(_linear_stand_ins(model, sites), top_p=1.0, show_progress=False)
    known = {s.name for s in sites}
    ranked = [name for name in result["target_modules"] if name in known]
    if k > len(ranked):
        raise PlacementError(
            f"PEFT's kappa selector skips matrices with a side over 16384, so it ranks only {len(ranked)} of the "
            f"{len(sites)} sites: ask for k <= {len(ranked)}"
        )
    return _in_model_order(sites, ranked[:k])


def snr_targets(model: nn.Module, sites: list[Site], k: int) -> list[str]:
    """Top sites by SNR per role (Spectrum picks the top fraction of each role), cut to k: best of each role first,
    then second best of each role, ...

    Spectrum keeps the top `int(n * percent / 100)` modules of every module type; taking one site per role per
    round reproduces that when k is a multiple of the number of roles. Within a round, roles are taken in order of
    their site's SNR, so a partial last round keeps the strongest; a role with fewer sites drops out of later rounds.
    """
    _check_k(sites, k)
    scores = snr_scores(model, sites)
    position = {s.name: i for i, s in enumerate(sites)}

    def strongest_first(name: str) -> tuple[float, int]:
        value = scores[name]
        return (-value if not math.isnan(value) else math.inf, position[name])

    picked = role_rounds([s.name for s in sites], {s.name: s.role for s in sites}, strongest_first)
    return _in_model_order(sites, picked[:k])


def role_rounds(names: list[str], role_of: dict[str, str], key) -> list[str]:
    """Spectrum's order: round k holds every role's k-th site by `key`, and each round is in `key` order too; a role
    with fewer sites drops out of later rounds. `key` must order every name (ties broken, e.g. by position)."""
    by_role: dict[str, list[str]] = {}
    for name in sorted(names, key=key):
        by_role.setdefault(role_of[name], []).append(name)
    rounds = itertools.zip_longest(*by_role.values())
    return [name for round_ in rounds for name in sorted((n for n in round_ if n is not None), key=key)]


def _linear_stand_ins(model: nn.Module, sites: list[Site]) -> nn.Module:
    """A module tree holding one bias-free `nn.Linear` per site at the site's own dotted name, sharing its weight."""
    modules = site_modules(model, sites)
    root = nn.Module()
    for site in sites:
        module = modules[site.name]
        weight = module.weight
        if isinstance(module, Conv1D):
            weight = nn.Parameter(weight.detach().t(), requires_grad=False)
        linear = nn.Linear(site.d_in, site.d_out, bias=False, device="meta")
        linear.weight = weight
        *path, leaf = site.name.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, linear)
    return root


def _check_k(sites: list[Site], k: int) -> None:
    if not sites:
        raise PlacementError("no sites given: pass the list from find_sites(model)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(sites):
        raise PlacementError(
            f"k must be an integer from 1 to {len(sites)} (the number of sites), got {k!r}: pick k in that range"
        )


def _role_index(role: str) -> int:
    return ROLES.index(role) if role in ROLES else len(ROLES)


def _in_model_order(sites: list[Site], names: list[str]) -> list[str]:
    order = {s.name: (s.layer, _role_index(s.role), i) for i, s in enumerate(sites)}
    return sorted(names, key=order.__getitem__)
