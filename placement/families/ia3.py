"""IA3, through PEFT's `IA3Config`: a learned vector l scales a site's output (attention k and v: y = l * (W x)) or
its input (the FFN's down projection: y = W (l * x)); l starts at 1, so the model starts unchanged.

Its sites are the k, v (or fused qkv) and down projections of every block; its init-gradient score is the energy of
l's first gradient at l = 1 (DESIGN.md section 10):
    output scaling  grad l = sum_t d_t * y_t        (d the gradient at the output, y = W x the output itself)
    input scaling   grad l = sum_t x_t * (W^T d_t)  (W^T d_t is the gradient at the input)
summed over every token of the batch, as PEFT's l.grad is. A site trains d_out (output) or d_in (input) parameters.
"""
from __future__ import annotations

import torch

from ..model.sites import Site, find_sites
from .base import Candidate, Family, register

OUTPUT_ROLES = ("k", "v", "qkv")
INPUT_ROLES = ("down",)


def ia3_sites(model) -> list[Site]:
    return [s for s in find_sites(model) if s.role in OUTPUT_ROLES + INPUT_ROLES]


def feedforward(site) -> bool:
    """Whether IA3 scales this site's input (PEFT's `feedforward_modules`) rather than its output."""
    role = site["role"] if isinstance(site, dict) else site.role
    return role in INPUT_ROLES


def ia3_params(site: dict, size: int | None = None) -> int:
    return int(site["d_in"] if feedforward(site) else site["d_out"])


def ia3_kwargs(rows: list[dict]) -> dict:
    """IA3Config arguments for site rows: exact names, the FFN inputs among them as `feedforward_modules`."""
    return {"target_modules": [row["site"] for row in rows],
            "feedforward_modules": [row["site"] for row in rows if feedforward(row)]}


def plan_kwargs(plan, model=None) -> dict:
    by_name = {row["site"]: row for row in plan.sites}
    if model is not None and not set(plan.targets) <= set(by_name):
        by_name |= {s.name: s.to_row() for s in ia3_sites(model)}
    return ia3_kwargs([by_name[t] for t in plan.targets])


def ia3_config(kwargs: dict):
    from peft import IA3Config

    return IA3Config(**kwargs)


def ia3_gradient(x: torch.Tensor, y: torch.Tensor, d_out: torch.Tensor, d_in: torch.Tensor | None,
                 input_scaling: bool) -> torch.Tensor:
    """l's first gradient for one batch, from the site's input x, output y and their gradients, in float32 at least
    (the precision autograd gives l.grad; half-precision activations are widened)."""
    a, b = (x, d_in) if input_scaling else (y, d_out)
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (a.to(dtype) * b.to(dtype)).reshape(-1, a.shape[-1]).sum(dim=0)


def candidate(site: Site, module, options) -> Candidate:
    """The site as the shared pass scores it: l's first gradient from the output's gradient, or (the FFN's down
    projection) from the input's."""
    if feedforward(site):
        return Candidate(site.d_in, lambda x, y, grad: ia3_gradient(x, y, None, grad, input_scaling=True), "input")
    return Candidate(site.d_out, lambda x, y, grad: ia3_gradient(x, y, grad, None, input_scaling=False))


IA3 = register(Family(
    name="ia3",
    help="learned scaling of k, v and the FFN's down input (PEFT IA3Config)",
    score="||grad l||^2 at l = 1",
    roles=OUTPUT_ROLES + INPUT_ROLES,
    find_sites=ia3_sites,
    params=ia3_params,
    config=ia3_config,
    kwargs=plan_kwargs,
    candidate=candidate,
    mergeable=True,
    formats=("plan", "peft"),
))
