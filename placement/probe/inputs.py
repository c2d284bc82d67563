"""Input sharing: sites that read one tensor (q, k and v; gate and up) project it once, and exact mode keeps only
what their gradients will need of it (x itself, or its token Grams where those are smaller).

What each form costs, per input read by sites of widths d_out (N tokens, chunks of whole examples c_j, s_j their
starts): x itself, N d_in elements in the model's dtype (4 bytes in float32, 2 in bfloat16), exact; its full token
Grams, sum_j c_j (N - s_j) float32 elements (about N^2 / 2 for long examples, B c^2 / 2 plus the cross-example
blocks for short ones), exact too, and read by every reader at no further cost. A backward through frozen weights
saves neither, so the kept form is the probe's own memory: at 512 tokens x 8 on the embedded model x is 9 MiB per
576-wide input (four inputs a layer, one 1536 wide: 1.6 GB over 30 layers), its Grams 36 MiB, so x is kept; at 8
prompts of about 44 tokens the Grams are a sixth to a half of x. A half-precision copy of a float32 x would halve
its bytes, but the energies would then be those of x rounded to 8 bits of mantissa (a relative error of about 2^-9
per element), which the exact mode does not promise; recomputing x in the backward is what `--checkpointing` does
for every block at once (its figures are in the README).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.sites import Site
from . import scores


class Input:
    """One tensor read by one or more sites in a forward pass (q, k and v read the same one; gate and up too).

    Its projections x A^T are made once per distinct panel of A and shared. In exact mode it keeps, until the last
    of its readers has taken its gradient, either x itself or, where they are smaller and the cheaper route, the
    token Grams of x, which are all the exact energies need of it.
    """

    __slots__ = ("source", "key", "leader", "sites", "pending", "panels", "projections", "rows", "grams")

    def __init__(self, source: torch.Tensor, leader: int, group: "PanelGroup | None", key: tuple = ()):
        self.source: torch.Tensor | None = source.detach()
        self.key = key  # the tensor the sites read, as found on its own device
        self.leader = leader  # index of the first site that read it
        self.sites: list[Site] = []
        self.pending = 0
        self.panels: dict[int, torch.Tensor] = {}  # id -> panel, in the order first used
        self.projections: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.grams: scores.Grams | None = None
        if group is not None:  # every panel its readers used last batch, in one GEMM rather than a narrow one each
            projected = scores.project_inputs(self.source, group.matrix)
            self.projections = {key: projected[..., cut] for key, cut in group.cuts.items()}

    def project(self, panels: tuple) -> torch.Tensor:
        parts = []
        for panel in panels:
            self.panels.setdefault(id(panel), panel)
            if id(panel) not in self.projections:
                self.projections[id(panel)] = scores.project_inputs(self.source, panel)
            parts.append(self.projections[id(panel)])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def group(self) -> "PanelGroup | None":
        if len(self.panels) < 2:
            return None
        cuts, start = {}, 0
        for key, panel in self.panels.items():
            cuts[key] = slice(start, start + panel.shape[0])
            start += panel.shape[0]
        return PanelGroup(list(self.panels.values()), cuts)

    def settle(self, layout: scores.Layout | None) -> None:
        """No later site reads this input: keep only what the readers' gradients will need (nothing in fast
        mode, `layout` None; in exact mode x or its Grams)."""
        self.projections = {}
        if layout is not None and self.source is not None and grams_are_smaller(layout, self.source) and \
                scores.keep_grams(layout, self.source.shape[-1], [s.d_out for s in self.sites]):
            self.grams = scores.token_grams(layout.take(self.source), layout, full=True)
        if layout is None or self.grams is not None:
            self.source = None

    def taken(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.source = self.rows = self.grams = None


def grams_are_smaller(layout: scores.Layout, x: torch.Tensor) -> bool:
    """Whether x's full token Grams (float32) take fewer bytes than x as it is kept (its own dtype, padding too):
    in bfloat16 x takes half the bytes per element that the Grams do."""
    grams = 4 * sum((e - s) * (layout.tokens - s) for s, e in layout.chunks)
    return grams < x.numel() * x.element_size()


@dataclass
class PanelGroup:
    """The panels of A that the sites reading one input use: a batch's readers are the same every batch.

    They are stacked for each batch's one GEMM and the stack dropped after it, not kept: kept, the stacks doubled
    the draws of A, 24 MiB for the fast probe's 8 draws on the embedded model (measured: its peak at 128 tokens x 2
    fell from 335 to 311 MiB), whatever the batch."""

    panels: list
    cuts: dict

    @property
    def matrix(self) -> torch.Tensor:
        return torch.cat(self.panels)


class InputTracker:
    """Which input the site now firing reads: sites that share an input run one after another, so the previous
    site's record is the only one to compare with. Learns each input's panels of A for the next batch."""

    def __init__(self, mode: str, device=None):
        self.mode = mode
        self.device = device  # where the probe computes: inputs of sites on other devices are brought here
        self.layout: scores.Layout | None = None  # the batch's token layout
        self.last: Input | None = None
        self.groups: dict[int, PanelGroup | None] = {}  # leader site index -> its input's panels

    def reader(self, source: torch.Tensor, index: int) -> Input:
        """The record of this input: the previous site's when it read the very same tensor, else a new one. Fast
        mode lets go of x once no later site can share it."""
        last = self.last
        key = (source.device, source.data_ptr(), tuple(source.shape), source.stride())
        if last is not None and last.source is not None and last.key == key:
            return last
        if last is not None:
            self.retire(last)
        here = source if self.device is None else source.to(self.device)  # a model spread over devices
        self.last = Input(here, index, self.groups.get(index), key)
        return self.last

    def retire(self, record: Input) -> None:
        """No later site reads this input: learn its readers' panels for the next batch, keep what they need."""
        if record.leader not in self.groups:
            self.groups[record.leader] = record.group()
        if record.source is not None:
            record.settle(self.layout_of(record.source) if self.mode == "exact" else None)

    def layout_of(self, y: torch.Tensor) -> scores.Layout:
        """The batch's layout for a site's (B, T, d) tensor, or one flat example for tokens laid out otherwise."""
        if self.layout.fits(y):
            return self.layout
        return scores.flat_layout(y.numel() // y.shape[-1], y.device)

    def close_batch(self) -> None:
        if self.last is not None:
            self.retire(self.last)
        self.last = None
