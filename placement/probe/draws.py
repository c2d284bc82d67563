"""Draws of A, once per probe and never per batch, and each site's running sum of projected gradients."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..families.lora import draw_lora_a
from ..model.sites import Site
from . import scores
from .settings import ProbeSettings


@dataclass
class SiteState:
    """One site: its draws of A and the sum over batches of its projected gradients (for coherence)."""

    index: int
    site: Site
    panels: tuple  # A split into shared panels: PEFT's draw for the seed, then in fast mode the extra draws
    g_sum: torch.Tensor  # (draws * r, d_out) float32: sum over batches of the projected gradients, transposed
    examples: int = 0


def peft_lora_a(module: nn.Module, settings: ProbeSettings) -> torch.Tensor:
    """The lora_A that PEFT draws for this site after `torch.manual_seed(settings.seed)`."""
    return draw_lora_a(module, settings.lora_kwargs(), settings.seed)


def draw_sites(sites: list[Site], modules: list[nn.Module], settings: ProbeSettings, device) -> list[SiteState]:
    """Every site's panels of A.

    PEFT's A for a seed depends only on the site's shape, so sites of one shape share it; the extra draws of
    fast mode depend only on d_in, so sites reading one input share their projection (each site's estimate
    stays unbiased; estimates of sites of one width are correlated, as PEFT's own draws are).
    """
    r, extra_draws = settings.r, settings.num_draws - 1
    peft_draws, extra = {}, {}
    states = []
    cpu_state = torch.get_rng_state()
    try:
        for index, (site, module) in enumerate(zip(sites, modules)):
            shape = (isinstance(module, Conv1D), site.d_in, site.d_out, getattr(module, "bias", None) is not None)
            if shape not in peft_draws:
                peft_draws[shape] = peft_lora_a(module, settings).to(device)
            panels = [peft_draws[shape]]
            if extra_draws:
                if site.d_in not in extra:
                    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + site.d_in)
                    more = scores.kaiming_draws((r, site.d_in), extra_draws, generator)
                    extra[site.d_in] = more.reshape(extra_draws * r, site.d_in).to(device)
                panels.append(extra[site.d_in])
            states.append(SiteState(index, site, tuple(panels),
                                    torch.zeros(settings.num_draws * r, site.d_out, device=device)))
    finally:
        torch.set_rng_state(cpu_state)  # probing must not change the caller's random stream
    return states
