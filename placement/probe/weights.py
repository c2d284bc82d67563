"""Scores of the weights alone, no data: KappaTune's condition number, Spectrum's signal-to-noise ratio and the
adapter's size. They order sites (the data-free selectors of `plan.selectors` take their top), and they are the
baselines a data score has to beat."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PlacementError
from ..model.sites import Site, modules_by_name
from .registry import Score, register_score


def kappa_scores(model: nn.Module, sites: list[Site]) -> dict[str, float]:
    """Each site's weight condition number as PEFT's kappa selector computes it, S[0] / (S[-1] + 1e-8) from the
    float32 singular values (lower is preferred). Dict keys follow the order of `sites`."""
    modules = site_modules(model, sites)
    out = {}
    for site in sites:
        s = torch.linalg.svdvals(modules[site.name].weight.detach().float())
        out[site.name] = float(s[0] / (s[-1] + 1e-8))
    return out


def snr_scores(model: nn.Module, sites: list[Site]) -> dict[str, float]:
    """Spectrum's per-module signal-to-noise ratio from the weight's singular values (Marchenko-Pastur bound).

    As in `ModelModifier.calculate_snr_for_layer` of Spectrum's `spectrum.py`, for an n x m weight W in float32:

        S      = svdvals(W), descending
        sigma  = (q75(S) - q25(S)) / 1.349        IQR of the singular values, as a normal-scale estimate
        eps    = sigma * (1 + sqrt(beta))         beta = min(n, m) / max(n, m)
        signal = sum of S > eps
        noise  = sum of S <= eps                  1.0 when no singular value is at or below eps
        snr    = signal / noise / S[0]            inf when noise is 0

    A `Conv1D` weight is the transpose of the `nn.Linear` one and has the same singular values and the same beta.
    An all-zero weight scores 0 (Spectrum would give inf), since it carries no signal.
    Dict keys follow the order of `sites`.
    """
    modules = site_modules(model, sites)
    return {s.name: _spectrum_snr(modules[s.name].weight) for s in sites}


def _spectrum_snr(weight: torch.Tensor) -> float:
    w = weight.detach().float()
    if w.shape[0] < w.shape[1]:
        w = w.t()  # same singular values; LAPACK is about twice as fast on the tall orientation
    s = torch.linalg.svdvals(w)
    top = s[0]
    if top == 0:
        return 0.0
    n, m = w.shape
    beta = min(n, m) / max(n, m)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    eps = sigma * (1 + math.sqrt(beta))
    is_signal = s > eps
    signal = s[is_signal].sum()
    noise = s[~is_signal].sum() if (~is_signal).any() else s.new_tensor(1.0)
    if noise == 0:
        return math.inf
    return (signal / noise / top).item()


def site_modules(model: nn.Module, sites: list[Site]) -> dict[str, nn.Module]:
    """The modules of `sites`, refusing an empty list or a site the model does not have."""
    if not sites:
        raise PlacementError("no sites given: pass the list from find_sites(model)")
    modules = modules_by_name(model, sites)
    missing = [s.name for s in sites if s.name not in modules]
    if missing:
        raise PlacementError(
            f"site {missing[0]} is not a module of {type(model).__name__}: pass sites from find_sites on this model"
        )
    return modules


register_score(Score("kappa", "the weight's condition number S[0] / S[-1] (PEFT's KappaTune): lowest first",
                     "weights", lambda ctx: kappa_scores(ctx.model, ctx.sites), higher_is_better=False,
                     energy=False))
register_score(Score("snr", "Spectrum's signal-to-noise ratio of the weight's singular values: highest first",
                     "weights", lambda ctx: snr_scores(ctx.model, ctx.sites), energy=False))
register_score(Score("params", "d_in + d_out, the adapter's size per rank: largest sites first", "weights",
                     lambda ctx: {s.name: s.d_in + s.d_out for s in ctx.sites}, energy=False))
