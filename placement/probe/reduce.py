"""Distributed reduction: every accumulator is a sum over batches (or examples, or tokens), so summing it over
ranks that each took a disjoint share of the batches gives exactly what one process would get on all of them."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import all_sum
from .buffers import Accumulator


def reduce_over_ranks(acc: Accumulator, tokens: int, batch_page: np.ndarray, world: int) -> tuple[int, np.ndarray]:
    """Sum every accumulator over ranks; gather per-batch pages in the original batch order (rank r took batches
    r, r + world, ...)."""
    counts = all_sum(torch.tensor([st.examples for st in acc.states] + [tokens], device=acc.device))
    for st, count in zip(acc.states, counts.tolist()):
        st.examples = int(count)
        st.g_sum = all_sum(st.g_sum)
    acc.sums, acc.sampled_sum = all_sum(acc.sums), all_sum(acc.sampled_sum)
    acc.nonfinite = all_sum(acc.nonfinite)
    if acc.spectrum_sum is not None:
        acc.spectrum_sum = all_sum(acc.spectrum_sum)
    gathered = [None] * world
    dist.all_gather_object(gathered, batch_page)
    total = sum(len(part) for part in gathered)
    merged = np.zeros((total, batch_page.shape[1]))
    for rank, part in enumerate(gathered):
        merged[rank::world] = part
    return int(counts[-1]), merged
