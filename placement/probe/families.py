"""Init-gradient scores of the adapter families that start as the identity (IA3's l = 1, a bottleneck's U = 0): with
every candidate at its initial value the forward is the base model's, so one forward and backward over the
calibration batches gives each site exactly the first gradient it would receive alone (DESIGN.md section 10).

Hooks on each site read its input x, its output y and the gradient at one of them; per batch the family's
`Candidate` forms its parameter's first gradient in float32 (as autograd does) and the hook adds its squared norm in
float64. The score is the mean over batches, as PAGE is.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_sum, rank_and_world
from ..errors import PlacementError
from ..families import Candidate, ScoreOptions, family_names, get_family
from ..model.loss import token_loss
from ..model.sites import Site, modules_by_name
from .engine import gradients_reach_inputs


def __getattr__(name):  # the shared-pass families, as registered when asked (a family may register late)
    if name == "IDENTITY_FAMILIES":
        return family_names("shared")
    raise AttributeError(name)


@dataclass
class FamilySite:
    family: str
    site: Site
    module: nn.Module
    candidate: Candidate
    energy: float = 0.0

    @property
    def params(self) -> int:
        return self.candidate.params


def _candidates(model, families: list[str], options: ScoreOptions) -> list[FamilySite]:
    out = []
    for name in families:
        family = get_family(name)
        if family.candidate is None:
            raise PlacementError(f"adapter family '{name}' is not scored in the shared pass: choose from "
                                 f"{', '.join(family_names('shared'))}")
        sites = family.find_sites(model)
        modules = modules_by_name(model, sites)
        out += [FamilySite(name, site, modules[site.name], family.candidate(site, modules[site.name], options))
                for site in sites]
    return out


def _hook(candidate: FamilySite):
    """Forward hook on the candidate's site: keeps x and y, and scores the batch when the gradient it needs
    arrives (at the output, or at the input for a family that scales it)."""
    def forward(module, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x, y = inputs[0].detach(), output.detach()

        def add(grad):
            g = candidate.candidate.gradient(x, y, grad.detach())
            candidate.energy += float(g.double().pow(2).sum())

        if candidate.candidate.reads == "input":
            if inputs[0].requires_grad:
                inputs[0].register_hook(add)
        else:
            output.register_hook(add)
    return forward


class FamilyScoring:
    """The identity families' hooks on a model, for the duration of a `with`: they ride along whatever forward and
    backward passes run inside it, the LoRA probe's own included, so every identity family shares its pass.
    `frame(batches)` turns the summed energies into scores (summed over ranks under a launcher)."""

    def __init__(self, model: nn.Module, families: list[str], *, width_factor: int = 16, width: int | None = None,
                 activation: str = "relu", scale: float = 1.0, seed: int = 0):
        self.model = model
        options = ScoreOptions(width_factor=width_factor, width=width, activation=activation, scale=scale, seed=seed)
        self.candidates = _candidates(model, families, options)
        self.handles: list = []

    def __enter__(self) -> "FamilyScoring":
        self.handles = [c.module.register_forward_hook(_hook(c))
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
