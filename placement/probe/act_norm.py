"""act_norm (activation-guided selection, as in Act-LoRA): the mean squared norm ||x||^2 of each site's input over
the calibration batches, a forward pass only.

The tokens are those the loss reads: the positions whose next token is a target (labels after the causal shift),
the rows a LoRA's update reaches the loss through; a batch without labels counts every attended position. Sites
whose input is not laid out per position (routed experts) count every row they read.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..distributed import all_sum, rank_and_world
from ..model.loss import token_loss
from ..model.sites import modules_by_name
from .registry import Score, ScoreContext, register_score


def read_positions(batch) -> torch.Tensor:
    """(B, T) bool: the positions whose output the loss reads (the next token is a target)."""
    labels = getattr(batch, "labels", None)
    if labels is None:
        return batch.attention_mask.bool()
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def act_norm_scores(ctx: ScoreContext) -> dict[str, float]:
    """{site: sum of ||x_t||^2 / number of tokens}, pooled over every batch's read positions (and over ranks)."""
    model, sites = ctx.model, ctx.sites
    modules = modules_by_name(model, sites)
    device = next(model.parameters()).device
    sums = torch.zeros(len(sites), dtype=torch.float64, device=device)
    counts = torch.zeros(len(sites), dtype=torch.float64, device=device)
    positions: list[torch.Tensor] = []  # the current batch's read positions, as the only item

    def hook(i: int):
        def record(module, inputs):
            x = inputs[0]
            keep = positions[-1]
            rows = x[keep.to(x.device)] if x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape) \
                else x.reshape(-1, x.shape[-1])
            sums[i] += rows.float().pow(2).sum().to(device, torch.float64)
            counts[i] += rows.shape[0]
        return record

    rank, world = rank_and_world()
    forward = ctx.loss or (lambda batch: token_loss(model, batch))
    handles = [modules[s.name].register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(ctx.batches[rank::world], desc="act_norm", unit="batch",
                              disable=not ctx.progress or rank != 0):
                batch = batch.to(device)
                positions[:] = [read_positions(batch)]
                forward(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if world > 1:
        sums, counts = all_sum(sums), all_sum(counts)
    values = (sums / counts.clamp(min=1)).tolist()
    return {s.name: value for s, value in zip(sites, values)}


register_score(Score(
    "act_norm", "mean ||x||^2 of the site's input over the positions that predict a target token (forward only)",
    "forward", act_norm_scores))
