"""Per-batch buffers and the sums over batches: a site's gradient hook writes one row, and the end of the batch
turns every site's rows into its scores in a handful of vectorised operations, so the per-site cost is the GEMMs,
not the dispatch of many tiny ops."""
from __future__ import annotations

import torch

from . import scores, spectrum
from .draws import SiteState
from .inputs import Input
from .settings import ProbeSettings


# The per-batch scores summed over batches, a column each: a new probe score adds its name here and its value in
# `close_batch`; `results` reads the sums by name.
SUMS = ("page", "grad_energy", "fisher")


class Accumulator:
    """Sums over batches, one row per site: a column per name in SUMS, and ||grad_B||^2 per draw of A."""

    def __init__(self, states: list[SiteState], settings: ProbeSettings, device):
        self.states, self.settings, self.device = states, settings, device
        n, m = len(states), settings.num_draws
        self.s2 = scores.lora_scale(settings.r, settings.alpha, settings.use_rslora) ** 2
        self.factor = torch.tensor(
            [scores.expected_factor(settings.r, settings.alpha, st.site.d_in, settings.use_rslora) for st in states],
            dtype=torch.float64, device=device)
        self.sums = torch.zeros(n, len(SUMS), dtype=torch.float64, device=device)
        self.sampled_sum = torch.zeros(n, m, dtype=torch.float64, device=device)
        self.batch_page: list[torch.Tensor] = []
        self.nonfinite = torch.zeros(n, dtype=torch.int64, device=device)  # batches whose gradient overflowed
        # sum over batches of each site's top sigma_i(G_b)^2: page_opt and the spectrum for rank allocation
        self.spectrum_sum = torch.zeros(n, settings.spectrum, dtype=torch.float64, device=device) \
            if settings.spectrum else None
        self.layout: scores.Layout | None = None
        self.w2: torch.Tensor | None = None
        self.buffers: dict[str, torch.Tensor] = {}

    def open_batch(self, batch) -> scores.Layout:
        n, k = len(self.states), self.settings.num_draws * self.settings.r
        self.layout = scores.batch_layout(batch.attention_mask)
        self.w2 = scores.example_weights(batch.labels).pow(2).float()
        # rows of sites the loss does not depend on stay zero, and so score zero
        self.buffers = {"columns": torch.zeros(n, k, device=self.device)}
        if self.settings.mode == "exact":
            self.buffers["exact"] = torch.zeros(n, 2, device=self.device)
        else:
            self.buffers["weighted"] = torch.zeros(n, k, device=self.device)
        return self.layout

    def absorb(self, state: SiteState, record: Input, xa: torch.Tensor, d: torch.Tensor,
               layout: scores.Layout) -> None:
        """One site, one batch: its row of the batch buffers from x A^T (and x in exact mode) and d.

        Buffers hold squared norms per column of the projected gradients (batch, and per example weighted by
        c_i^2), or in exact mode ||G||^2 and sum_i c_i^2 ||G_i||^2; nothing else outlives the call.
        """
        w2 = self.w2
        if layout is not self.layout:  # tokens flattened (e.g. routed experts): no per-example split
            d, xa = d.reshape(1, -1, d.shape[-1]), xa.reshape(1, -1, xa.shape[-1])
            w2 = torch.ones(1, device=d.device)
        i, buffers = state.index, self.buffers
        g = scores.projected_grads(d, xa)  # (B, draws * r, d_out)
        g_batch = g.sum(dim=0)
        state.g_sum += g_batch
        torch.linalg.vecdot(g_batch, g_batch, out=buffers["columns"][i])
        if self.settings.mode == "exact":
            if record.rows is None and record.source is not None:
                record.rows = layout.take(record.source)
            rows = layout.take(d)
            formed = [] if self.spectrum_sum is not None else None  # G or d's Grams, where the energies form them
            total, per, record.grams = scores.exact_energies(rows, record.rows, layout, record.grams, len(record.sites),
                                                             formed)
            if self.spectrum_sum is not None:
                self.spectrum_sum[i] += spectrum.top_spectrum(rows, record.rows, record.grams,
                                                              self.spectrum_sum.shape[1], *formed)
            buffers["exact"][i, 0] = total
            buffers["exact"][i, 1] = w2 @ per
        else:
            torch.mv(torch.linalg.vecdot(g, g).t(), w2, out=buffers["weighted"][i])
        record.taken()
        state.examples += layout.examples

    def close_batch(self) -> None:
        """Every site's scores for the batch from its buffer rows, all sites at once."""
        m, r = self.settings.num_draws, self.settings.r
        per_draw = lambda columns: columns.double().reshape(len(self.states), m, r).sum(dim=2)  # noqa: E731
        sampled = per_draw(self.buffers["columns"]) * self.s2  # (sites, draws)
        self.sampled_sum += sampled
        if self.settings.mode == "exact":
            exact = self.buffers["exact"].double()
            batch = dict(page=self.factor * exact[:, 0], grad_energy=exact[:, 0], fisher=self.factor * exact[:, 1])
        else:
            batch = dict(page=sampled.mean(dim=1), grad_energy=torch.zeros_like(self.factor),
                         fisher=per_draw(self.buffers["weighted"]).mean(dim=1) * self.s2)
        self.sums += torch.stack([batch[name] for name in SUMS], dim=1)
        self.batch_page.append(batch["page"])
        self.buffers = {}
