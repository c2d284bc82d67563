"""The probe's answer: one row of scores per site, in model order, and the per-batch page values."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .buffers import SUMS, Accumulator
from .settings import ProbeSettings


@dataclass
class ProbeResult:
    """Scores per site (one row each, in model order) and the per-batch page values for bootstrap."""

    scores: pd.DataFrame
    batch_page: np.ndarray  # (batches, sites)
    batches: int
    tokens: int
    seconds: float
    settings: ProbeSettings
    spectrum: np.ndarray | None = None  # (sites, k): mean over batches of sigma_i(G_b)^2, exact mode only


def probe_result(acc: Accumulator, n_batches: int, tokens: int, seconds: float,
                 batch_page: np.ndarray) -> ProbeResult:
    fast = acc.settings.mode == "fast"
    r = acc.settings.r
    spectrum = (acc.spectrum_sum / n_batches).cpu().numpy() if acc.spectrum_sum is not None else None
    totals = acc.sums.cpu().numpy()  # (sites, SUMS) summed over batches
    sampled = (acc.sampled_sum / n_batches).cpu()  # (sites, draws)
    rows = []
    nonfinite = acc.nonfinite.cpu().numpy()
    for i, (st, sums, draws) in enumerate(zip(acc.states, totals, sampled)):
        total = dict(zip(SUMS, sums))
        finite_batches = max(n_batches - int(nonfinite[i]), 1)  # overflowed batches scored zero: average the rest
        # coherence = ||mean_b g_b||^2 / mean_b ||g_b||^2, pooled over the draws of A
        g_mean = st.g_sum.double() / n_batches
        spread = float(draws.sum())
        coherence = float(g_mean.pow(2).sum()) * acc.s2 / spread if spread > 0 else 0.0
        rows.append(dict(
            st.site.to_dict(),
            page=float(draws.mean()) * n_batches / finite_batches if fast else total["page"] / finite_batches,
            page_se=float(draws.std() / len(draws) ** 0.5) if fast else np.nan,
            page_sampled=float(draws[0]),
            grad_energy=np.nan if fast else total["grad_energy"] / finite_batches,
            nonfinite_batches=int(nonfinite[i]),
            fisher=total["fisher"] / max(st.examples, 1),
            coherence=coherence,
            # an A with orthonormal rows of squared norm 1/3 on G's top-r right singular vectors: s^2/3 sum_i<=r
            page_opt=acc.s2 / 3 * float(spectrum[i, :r].sum()) if spectrum is not None and spectrum.shape[1] >= r
            else np.nan,
        ))
    frame = pd.DataFrame(rows).rename(columns={"name": "site"})
    return ProbeResult(frame, batch_page, n_batches, tokens, seconds, acc.settings, spectrum)
