"""The probe: hooks on every site and the calibration loop.

A forward hook projects each site's input x onto its draws of A (x A^T, shared by the sites that read one input)
and registers a gradient hook on the site's output; when the output gradient d arrives during backward, the site's
scores for the batch are computed at once and its tensors dropped. Exact mode also keeps, per input, x or its
token Gram matrices, whichever is smaller, until its last reader is done. So no base weight ever requires grad,
no weight-sized gradient is kept, and at most one site's transient tensors exist at a time.

The parts, in the order a batch meets them: `draws` (A, once per probe), `inputs` (sharing an input among its
readers), `buffers` (a row per site per batch, scores per batch, sums), `reduce` (across ranks), `results`.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import rank_and_world
from ..errors import PlacementError
from ..model.checkpointing import disable_checkpointing, enable_checkpointing
from ..model.loss import token_loss
from ..model.sites import Site, find_blocks, modules_by_name
from .buffers import Accumulator
from .draws import SiteState, draw_sites
from .inputs import InputTracker
from .reduce import reduce_over_ranks
from .results import ProbeResult, probe_result
from .settings import ProbeSettings


@contextlib.contextmanager
def gradients_reach_inputs(model: nn.Module):
    """The model as a probe runs it: every weight frozen, eval mode (no dropout), and the input embeddings requiring
    grad so that a backward reaches every site's input and output; all restored afterwards."""
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    model.eval()
    model.enable_input_require_grads()
    try:
        yield model
    finally:
        model.disable_input_require_grads()
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)


class Probe:
    """Measure PAGE and its companions at every site over calibration batches."""

    def __init__(self, model: nn.Module, sites: list[Site], settings: ProbeSettings, loss=None):
        settings.check()
        self.model, self.sites, self.settings = model, sites, settings
        # batch -> mean token loss; under FSDP2 the sharded root module computes it (see model.shard)
        self.loss = loss or (lambda batch: token_loss(model, batch))
        modules = modules_by_name(model, sites)
        missing = [s.name for s in sites if s.name not in modules]
        if missing:
            raise PlacementError(f"site {missing[0]} is not a module of this model: rediscover the sites")
        self.modules = [modules[s.name] for s in sites]
        self.device = next(model.parameters()).device
        self.half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        self.states = draw_sites(sites, self.modules, settings, self.device)
        self.inputs = InputTracker(settings.mode, self.device)
        self.acc = Accumulator(self.states, settings, self.device)

    def _forward_hook(self, state: SiteState):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return  # e.g. the no-grad first pass of reentrant checkpointing; the recompute pass is hooked
            record = self.inputs.reader(inputs[0], state.index)
            record.sites.append(state.site)
            record.pending += 1
            xa = record.project(state.panels)

            def on_grad(grad):
                d = grad.detach().to(self.device)  # no copy unless the site lives on another device
                if self.half:  # an overflow at one site must not poison the ranking: score it zero, count it
                    finite = torch.isfinite(d).all()
                    self.acc.nonfinite[state.index] += ~finite
                    d = torch.where(finite, d, torch.zeros((), dtype=d.dtype, device=d.device))
                self.acc.absorb(state, record, xa, d, self.inputs.layout_of(d))

            output.register_hook(on_grad)

        return hook

    @contextlib.contextmanager
    def _hooked(self):
        model = self.model
        blocks = find_blocks(model)[1] if self.settings.checkpointing else []
        with gradients_reach_inputs(model):
            if blocks:
                # HF checkpoints a block only while `block.training`; set it on the blocks alone so that every
                # dropout inside stays off and the scores stay those of eval mode.
                enable_checkpointing(model)
                for block in blocks:
                    block.training = True
            handles = [m.register_forward_hook(self._forward_hook(st)) for m, st in zip(self.modules, self.states)]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                if blocks:
                    disable_checkpointing(model)

    def _batch(self, batch) -> int:
        """One calibration batch: forward, backward (the hooks score every site), close the batch."""
        batch = batch.to(self.device)
        self.inputs.layout = self.acc.open_batch(batch)
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise PlacementError("the calibration loss is not finite: check the data and --dtype")
        loss.backward()
        self.inputs.close_batch()
        self.acc.close_batch()
        return batch.target_tokens()

    def run(self, batches: list, progress: bool = False) -> ProbeResult:
        """Every rank takes batches rank, rank + world, ...; the sums are reduced so the result is that of all."""
        if not batches:
            raise PlacementError("no calibration batches: pass --batches 1 or more")
        rank, world = rank_and_world()
        if len(batches) < world:  # uneven shares are exact (every sum is reduced); an empty one has nothing to sum
            raise PlacementError(f"{len(batches)} calibration batch(es) for {world} ranks: pass --batches of at "
                                 "least the number of processes")
        start = time.perf_counter()
        tokens = 0
        with self._hooked():
            for batch in tqdm(batches[rank::world], desc="probing", unit="batch", disable=not progress or rank != 0):
                tokens += self._batch(batch)
        seconds = time.perf_counter() - start
        pages = self.acc.batch_page
        batch_page = torch.stack(pages).cpu().numpy() if pages else np.zeros((0, len(self.states)))  # (batches, sites)
        if world > 1:
            tokens, batch_page = reduce_over_ranks(self.acc, tokens, batch_page, world)
        return probe_result(self.acc, len(batches), tokens, seconds, batch_page)


def probe(model: nn.Module, sites: list[Site], batches: list, settings: ProbeSettings | None = None,
          progress: bool = False, loss=None) -> ProbeResult:
    return Probe(model, sites, settings or ProbeSettings(), loss).run(batches, progress=progress)
