"""Init-gradient scores of the adapter families that start as the identity (IA3's l = 1, a bottleneck's U = 0): with
every candidate at its initial value the forward is the base model's, so one forward and backward over the
calibration batches gives each site exactly the first gradient it would receive alone (DESIGN.md section 10).

Hooks on each site read its input x, its output y and the gradients at both; per batch each family forms its
parameter's first gradient in float32 (as autograd does) and adds its squared norm in float64. The score is the mean over batches, as PAGE is.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_sum, rank_and_world
from ..errors import PlacementError
from ..families import bottleneck as bn
from ..families import ia3
from ..model.loss import token_loss
from ..model.sites import Site, modules_by_name
from .engine import gradients_reach_inputs

IDENTITY_FAMILIES = ("ia3", "series-bn", "parallel-bn")


@dataclass
class FamilySite:
    family: str
    site: Site
    module: nn.Module
    params: int
    down: tuple | None = None  # a bottleneck's (D, bias) for this site
    energy: float = 0.0


def _candidates(model, families: list[str], width_factor: int, activation: str, seed: int,
                width: int | None = None) -> list[FamilySite]:
    out = []
    for family in families:
        if family == "ia3":
            sites = ia3.ia3_sites(model)
        elif family in ("series-bn", "parallel-bn"):
            sites = bn.bottleneck_sites(model, family.split("-")[0])
        else:
            raise PlacementError(f"unknown adapter family '{family}': choose from lora, {', '.join(IDENTITY_FAMILIES)}")
        modules = modules_by_name(model, sites)
        for site in sites:
            row = site.to_dict() | {"site": site.name}
            if family == "ia3":
                out.append(FamilySite(family, site, modules[site.name], ia3.ia3_params(row)))
                continue
            placement = family.split("-")[0]
            d_read = bn._width_of(site, placement)
            size = width or max(d_read // width_factor, 1)
            down = bn.draw_down(d_read, size, bn.site_seed(seed, site.name))
            out.append(FamilySite(family, site, modules[site.name], bn.bottleneck_params(row, size, placement),
                                  tuple(t.to(next(modules[site.name].parameters()).device) for t in down)))
    return out


def _hook(candidate: FamilySite, activation: str, scale: float):
    """Forward hook on the candidate's site: keeps x and y, and scores the batch when the gradient it needs
    arrives (at the output; for IA3 on an FFN input, at the input)."""
    def forward(module, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x, y = inputs[0].detach(), output.detach()
        scales_input = candidate.family == "ia3" and ia3.feedforward(candidate.site)

        def at_output(grad):
            d = grad.detach()
            if candidate.family == "ia3":
                g = ia3.ia3_gradient(x, y, d, None, input_scaling=False)
            else:
                g = bn.bottleneck_gradient(y if candidate.family == "series-bn" else x, d, *candidate.down,
                                           activation, scale)
            candidate.energy += float(g.double().pow(2).sum())

        def at_input(grad):
            candidate.energy += float(ia3.ia3_gradient(x, y, None, grad.detach(), input_scaling=True).double()
                                      .pow(2).sum())

        if scales_input:
            if inputs[0].requires_grad:
                inputs[0].register_hook(at_input)
        else:
            output.register_hook(at_output)
    return forward


class FamilyScoring:
    """The identity families' hooks on a model, for the duration of a `with`: they ride along whatever forward and
    backward passes run inside it, the LoRA probe's own included, so every identity family shares its pass.
    `frame(batches)` turns the summed energies into scores (summed over ranks under a launcher)."""

    def __init__(self, model: nn.Module, families: list[str], *, width_factor: int = 16, width: int | None = None,
                 activation: str = "relu", scale: float = 1.0, seed: int = 0):
        self.model, self.activation, self.scale = model, activation, scale
        self.candidates = _candidates(model, families, width_factor, activation, seed, width)
        self.handles: list = []

    def __enter__(self) -> "FamilyScoring":
        self.handles = [c.module.register_forward_hook(_hook(c, self.activation, self.scale))
                        for c in self.candidates]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def frame(self, batches: int) -> pd.DataFrame:
        energy = all_sum(torch.tensor([c.energy for c in self.candidates], dtype=torch.float64))
        return pd.DataFrame([dict(family=c.family, site=c.site.name, layer=c.site.layer, role=c.site.role,
                                  d_in=c.site.d_in, d_out=c.site.d_out, params=c.params, page=float(e) / batches)
                             for c, e in zip(self.candidates, energy.tolist())])


def family_scores(model: nn.Module, batches: list, families: list[str], *, width_factor: int = 16,
                  width: int | None = None, activation: str = "relu", scale: float = 1.0, seed: int = 0,
                  progress: bool = False) -> pd.DataFrame:
    """One row per (family, site): its init-gradient score (mean over batches of the first gradient's squared
    norm), the site's layer, role and widths, and the parameters the family trains there; a pass of its own."""
    if not batches:
        raise PlacementError("no calibration batches: pass --batches 1 or more")
    scoring = FamilyScoring(model, families, width_factor=width_factor, width=width, activation=activation,
                            scale=scale, seed=seed)
    device = next(model.parameters()).device
    rank, world = rank_and_world()
    with gradients_reach_inputs(model), scoring:  # each rank its share of the batches; frame() sums over ranks
        for batch in tqdm(batches[rank::world], desc="probing families", unit="batch", disable=not progress):
            loss = token_loss(model, batch.to(device))
            if not torch.isfinite(loss):
                raise PlacementError("the calibration loss is not finite: check the data and --dtype")
            loss.backward()
    return scoring.frame(len(batches))
