"""The probe: hooks on every site, the calibration loop, accumulation and distributed reduction.

A forward hook projects each site's input x onto its draws of A (x A^T, shared by the sites that read one input)
and registers a gradient hook on the site's output; when the output gradient d arrives during backward, the site's
scores for the batch are computed at once and its tensors dropped. Exact mode also keeps, per input, x or its
token Gram matrices, whichever is smaller, until its last reader is done. So no base weight ever requires grad,
no weight-sized gradient is kept, and at most one site's transient tensors exist at a time.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from . import scores
from .errors import PlacementError
from .sites import Site, find_blocks, modules_by_name

MODES = ("exact", "fast")


@dataclass
class ProbeSettings:
    """What a probe computes; every LoraConfig argument that changes the scores is here and goes into the plan."""

    r: int = 8
    alpha: float = 16
    seed: int = 0
    mode: str = "exact"
    draws: int = 8  # draws of A in fast mode; exact mode uses PEFT's one draw for page_sampled
    use_rslora: bool = False
    lora_dropout: float = 0.0  # recorded for the plan; the probe itself runs without dropout
    bias: str = "none"
    init_lora_weights: bool | str = True
    task_type: str = "CAUSAL_LM"
    checkpointing: bool = False

    def check(self) -> None:
        if self.mode not in MODES:
            raise PlacementError(f"unknown probe mode {self.mode}: choose exact or fast")
        if self.r < 1:
            raise PlacementError(f"--r {self.r} is not a rank: pass a positive integer")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PlacementError(f"--alpha {self.alpha} is not a LoRA alpha (it scales every score): pass a positive "
                                 "number such as 16")
        if self.mode == "fast" and self.draws < 2:
            raise PlacementError("--draws must be at least 2 in fast mode, to give page a standard error")
        if self.init_lora_weights is not True:
            raise PlacementError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: PAGE assumes PEFT's default "
                "init (B = 0, kaiming-uniform A); use init_lora_weights=True"
            )

    @property
    def num_draws(self) -> int:
        return self.draws if self.mode == "fast" else 1

    def lora_kwargs(self) -> dict:
        """The LoraConfig arguments that change the scores, as recorded in the plan."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return dict(
            task_type=self.task_type, r=self.r, lora_alpha=alpha, lora_dropout=self.lora_dropout,
            bias=self.bias, init_lora_weights=self.init_lora_weights, use_rslora=self.use_rslora,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def peft_lora_a(module: nn.Module, settings: ProbeSettings) -> torch.Tensor:
    """The lora_A that PEFT draws for this site after `torch.manual_seed(seed)`, taken from PEFT's own layer.

    PEFT draws other tensors before A (the default init of its lora_A and lora_B Linears), so re-deriving the
    order would be fragile; a shape-alike placeholder wrapped by PEFT consumes the RNG exactly as the real
    `get_peft_model(model, LoraConfig(target_modules=[site]))` does (a test holds the two equal).
    """
    conv = isinstance(module, Conv1D)
    with torch.device("meta"):
        if conv:
            placeholder = Conv1D(module.weight.shape[1], module.weight.shape[0])
        else:
            placeholder = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    box = nn.Module()
    box.site = placeholder.to_empty(device="cpu")
    kwargs = settings.lora_kwargs()
    kwargs.pop("task_type")
    torch.manual_seed(settings.seed)
    inject_adapter_in_model(LoraConfig(target_modules=["site"], fan_in_fan_out=conv, **kwargs), box)
    return box.site.lora_A["default"].weight.detach().float().clone()


def token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over target tokens, with logits only where a label is: the LM head is a large share of a
    small model's cost, and positions without a label contribute nothing to the loss."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    count = keep.sum()
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / count


@dataclass
class _SiteState:
    """One site: its draws of A and the sum over batches of its projected gradients (for coherence)."""

    index: int
    site: Site
    panels: tuple  # A split into shared panels: PEFT's draw for the seed, then in fast mode the extra draws
    g_sum: torch.Tensor  # (draws * r, d_out) float32: sum over batches of the projected gradients, transposed
    examples: int = 0


class _Input:
    """One tensor read by one or more sites in a forward pass (q, k and v read the same one; gate and up too).

    Its projections x A^T are made once per distinct panel of A and shared. In exact mode it keeps, until the last
    of its readers has taken its gradient, either x itself or, where they are smaller and the cheaper route, the
    token Grams of x, which are all the exact energies need of it.
    """

    __slots__ = ("source", "leader", "sites", "pending", "panels", "projections", "rows", "grams")

    def __init__(self, source: torch.Tensor, leader: int, group: "_PanelGroup | None"):
        self.source: torch.Tensor | None = source.detach()
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

    def group(self) -> "_PanelGroup | None":
        if len(self.panels) < 2:
            return None
        cuts, start = {}, 0
        for key, panel in self.panels.items():
            cuts[key] = slice(start, start + panel.shape[0])
            start += panel.shape[0]
        return _PanelGroup(torch.cat(list(self.panels.values())), cuts)

    def settle(self, layout: scores.Layout | None) -> None:
        """No later site reads this input: keep only what the readers' gradients will need (nothing in fast
        mode, `layout` None; in exact mode x or its Grams)."""
        self.projections = {}
        if layout is not None and self.source is not None and \
                scores.keep_grams(layout, self.source.shape[-1], [s.d_out for s in self.sites]):
            self.grams = scores.token_grams(layout.take(self.source), layout, full=True)
        if layout is None or self.grams is not None:
            self.source = None

    def taken(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.source = self.rows = self.grams = None


@dataclass
class _PanelGroup:
    """The panels of A that the sites reading one input use, stacked: a batch's readers are the same every batch."""

    matrix: torch.Tensor
    cuts: dict


class Probe:
    """Measure PAGE and its companions at every site over calibration batches.

    A site's gradient hook does only the work that needs its own tensors (a few GEMMs and norms) and writes a row
    of small per-batch buffers; the scores of all sites are formed from those rows at the end of the batch in a
    handful of vectorised operations, so the per-site cost is the GEMMs, not the dispatch of many tiny ops.
    """

    def __init__(self, model: nn.Module, sites: list[Site], settings: ProbeSettings):
        settings.check()
        self.model, self.sites, self.settings = model, sites, settings
        modules = modules_by_name(model, sites)
        missing = [s.name for s in sites if s.name not in modules]
        if missing:
            raise PlacementError(f"site {missing[0]} is not a module of this model: rediscover the sites")
        self.modules = [modules[s.name] for s in sites]
        self.device = next(model.parameters()).device
        self.states = self._draw(settings)
        n, m = len(sites), settings.num_draws
        scale = scores.lora_scale(settings.r, settings.alpha, settings.use_rslora)
        self._s2 = scale ** 2
        self._factor = torch.tensor(
            [scores.expected_factor(settings.r, settings.alpha, s.d_in, settings.use_rslora) for s in sites],
            dtype=torch.float64, device=self.device)
        # sums over batches, one row per site: [page, grad_energy, fisher] and ||grad_B||^2 per draw of A
        self._sums = torch.zeros(n, 3, dtype=torch.float64, device=self.device)
        self._sampled_sum = torch.zeros(n, m, dtype=torch.float64, device=self.device)
        self._batch_page: list[torch.Tensor] = []
        self._layout: scores.Layout | None = None
        self._w2: torch.Tensor | None = None
        self._last: _Input | None = None
        self._groups: dict[int, _PanelGroup | None] = {}  # leader site index -> its input's panels
        self._buffers: dict[str, torch.Tensor] = {}

    def _draw(self, settings: ProbeSettings) -> list[_SiteState]:
        """Draw A once per probe, never per batch.

        PEFT's A for a seed depends only on the site's shape, so sites of one shape share it; the extra draws of
        fast mode depend only on d_in, so sites reading one input share their projection (each site's estimate
        stays unbiased; estimates of sites of one width are correlated, as PEFT's own draws are).
        """
        r, extra_draws = settings.r, settings.num_draws - 1
        peft_draws, extra = {}, {}
        states = []
        cpu_state = torch.get_rng_state()
        try:
            for index, (site, module) in enumerate(zip(self.sites, self.modules)):
                shape = (isinstance(module, Conv1D), site.d_in, site.d_out, getattr(module, "bias", None) is not None)
                if shape not in peft_draws:
                    peft_draws[shape] = peft_lora_a(module, settings).to(self.device)
                panels = [peft_draws[shape]]
                if extra_draws:
                    if site.d_in not in extra:
                        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + site.d_in)
                        more = scores.kaiming_draws((r, site.d_in), extra_draws, generator)
                        extra[site.d_in] = more.reshape(extra_draws * r, site.d_in).to(self.device)
                    panels.append(extra[site.d_in])
                states.append(_SiteState(index, site, tuple(panels),
                                         torch.zeros(settings.num_draws * r, site.d_out, device=self.device)))
        finally:
            torch.set_rng_state(cpu_state)  # probing must not change the caller's random stream
        return states

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _reader(self, source: torch.Tensor, state: _SiteState) -> _Input:
        """The record of this input: the previous site's when it read the very same tensor (sites that share an
        input run one after another), else a new one. Fast mode lets go of x once no later site can share it."""
        last = self._last
        if last is not None and last.source is not None and last.source.data_ptr() == source.data_ptr() \
                and last.source.shape == source.shape and last.source.stride() == source.stride():
            return last
        if last is not None:
            self._retire(last)
        self._last = _Input(source, state.index, self._groups.get(state.index))
        return self._last

    def _retire(self, record: _Input) -> None:
        """No later site reads this input: learn its readers' panels for the next batch, keep what they need."""
        if record.leader not in self._groups:
            self._groups[record.leader] = record.group()
        if record.source is not None:
            record.settle(self._layout_of(record.source) if self.settings.mode == "exact" else None)

    def _layout_of(self, y: torch.Tensor) -> scores.Layout:
        """The batch's layout for a site's (B, T, d) tensor, or one flat example for tokens laid out otherwise."""
        if self._layout.fits(y):
            return self._layout
        return scores.flat_layout(y.numel() // y.shape[-1], y.device)

    def _forward_hook(self, state: _SiteState):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return  # e.g. the no-grad first pass of reentrant checkpointing; the recompute pass is hooked
            record = self._reader(inputs[0], state)
            record.sites.append(state.site)
            record.pending += 1
            xa = record.project(state.panels)

            def on_grad(grad):
                self._absorb(state, record, xa, grad.detach())

            output.register_hook(on_grad)

        return hook

    def _absorb(self, state: _SiteState, record: _Input, xa: torch.Tensor, d: torch.Tensor) -> None:
        """One site, one batch: its row of the batch buffers from x A^T (and x in exact mode) and d.

        Buffers hold squared norms per column of the projected gradients (batch, and per example weighted by
        c_i^2), or in exact mode ||G||^2 and sum_i c_i^2 ||G_i||^2; nothing else outlives the call.
        """
        layout, w2 = self._layout_of(d), self._w2
        if layout is not self._layout:  # tokens flattened (e.g. routed experts): no per-example split
            d, xa = d.reshape(1, -1, d.shape[-1]), xa.reshape(1, -1, xa.shape[-1])
            w2 = torch.ones(1, device=d.device)
        i, buffers = state.index, self._buffers
        g = scores.projected_grads(d, xa)  # (B, draws * r, d_out)
        g_batch = g.sum(dim=0)
        state.g_sum += g_batch
        torch.linalg.vecdot(g_batch, g_batch, out=buffers["columns"][i])
        if self.settings.mode == "exact":
            if record.rows is None and record.source is not None:
                record.rows = layout.take(record.source)
            total, per, record.grams = scores.exact_energies(
                layout.take(d), record.rows, layout, record.grams, len(record.sites))
            buffers["exact"][i, 0] = total
            buffers["exact"][i, 1] = w2 @ per
        else:
            torch.mv(torch.linalg.vecdot(g, g).t(), w2, out=buffers["weighted"][i])
        record.taken()
        state.examples += layout.examples

    def _open_batch(self, batch) -> None:
        n, k = len(self.states), self.settings.num_draws * self.settings.r
        self._layout = scores.batch_layout(batch.attention_mask)
        self._w2 = scores.example_weights(batch.labels).pow(2).float()
        # rows of sites the loss does not depend on stay zero, and so score zero
        self._buffers = {"columns": torch.zeros(n, k, device=self.device)}
        if self.settings.mode == "exact":
            self._buffers["exact"] = torch.zeros(n, 2, device=self.device)
        else:
            self._buffers["weighted"] = torch.zeros(n, k, device=self.device)

    def _close_batch(self) -> None:
        """Every site's scores for the batch from its buffer rows, all sites at once."""
        m, r = self.settings.num_draws, self.settings.r
        per_draw = lambda columns: columns.double().reshape(len(self.states), m, r).sum(dim=2)  # noqa: E731
        sampled = per_draw(self._buffers["columns"]) * self._s2  # (sites, draws)
        self._sampled_sum += sampled
        if self.settings.mode == "exact":
            exact = self._buffers["exact"].double()
            page, grad_energy, fisher = self._factor * exact[:, 0], exact[:, 0], self._factor * exact[:, 1]
        else:
            page, grad_energy = sampled.mean(dim=1), torch.zeros_like(self._factor)
            fisher = per_draw(self._buffers["weighted"]).mean(dim=1) * self._s2
        self._sums += torch.stack([page, grad_energy, fisher], dim=1)
        self._batch_page.append(page)
        if self._last is not None:
            self._retire(self._last)
        self._last, self._buffers = None, {}

    # -- the loop ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooked(self):
        model = self.model
        was_training = model.training
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        model.enable_input_require_grads()
        blocks = find_blocks(model)[1] if self.settings.checkpointing else []
        if blocks:
            # HF checkpoints a block only while `block.training`; set it on the blocks alone so that every
            # dropout inside stays off and the scores stay those of eval mode.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for block in blocks:
                block.training = True
        handles = [m.register_forward_hook(self._forward_hook(st)) for m, st in zip(self.modules, self.states)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            model.disable_input_require_grads()
            if blocks:
                model.gradient_checkpointing_disable()
            model.train(was_training)
            for p, flag in frozen:
                p.requires_grad_(flag)

    def run(self, batches: list, progress: bool = False) -> "ProbeResult":
        if not batches:
            raise PlacementError("no calibration batches: pass --batches 1 or more")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = batches[rank::world]
        start = time.perf_counter()
        tokens = 0
        with self._hooked():
            for batch in tqdm(mine, desc="probing", unit="batch", disable=not progress or rank != 0):
                batch = batch.to(self.device)
                self._open_batch(batch)
                loss = token_loss(self.model, batch)
                if not torch.isfinite(loss):
                    raise PlacementError("the calibration loss is not finite: check the data and --dtype")
                loss.backward()
                self._close_batch()
                tokens += batch.target_tokens()
        seconds = time.perf_counter() - start
        batch_page = torch.stack(self._batch_page).cpu().numpy() if self._batch_page \
            else np.zeros((0, len(self.states)))  # (batches, sites)
        if world > 1:
            tokens, batch_page = self._reduce(tokens, batch_page, world)
        return self._result(len(batches), tokens, seconds, batch_page)

    def _reduce(self, tokens: int, batch_page: np.ndarray, world: int):
        """Sum every accumulator over ranks; gather per-batch pages in the original batch order."""
        on_device = dist.get_backend() == "nccl"  # gloo reduces host tensors

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            moved = t if on_device else t.cpu()
            dist.all_reduce(moved)
            return moved.to(t.device)

        counts = all_reduce(torch.tensor([st.examples for st in self.states] + [tokens], device=self.device))
        for st, count in zip(self.states, counts.tolist()):
            st.examples = int(count)
            st.g_sum = all_reduce(st.g_sum)
        self._sums, self._sampled_sum = all_reduce(self._sums), all_reduce(self._sampled_sum)
        gathered = [None] * world
        dist.all_gather_object(gathered, batch_page)
        total = sum(len(part) for part in gathered)
        merged = np.zeros((total, batch_page.shape[1]))
        for rank, part in enumerate(gathered):
            merged[rank::world] = part
        return int(counts[-1]), merged

    def _result(self, n_batches: int, tokens: int, seconds: float, batch_page: np.ndarray) -> "ProbeResult":
        fast = self.settings.mode == "fast"
        totals = self._sums.cpu().numpy()  # (sites, [page, grad_energy, fisher]) summed over batches
        sampled = (self._sampled_sum / n_batches).cpu()  # (sites, draws)
        rows = []
        for st, (page_sum, grad_energy_sum, fisher_sum), draws in zip(self.states, totals, sampled):
            # coherence = ||mean_b g_b||^2 / mean_b ||g_b||^2, pooled over the draws of A
            g_mean = st.g_sum.double() / n_batches
            spread = float(draws.sum())
            coherence = float(g_mean.pow(2).sum()) * self._s2 / spread if spread > 0 else 0.0
            rows.append(dict(
                st.site.to_dict(),
                page=float(draws.mean()) if fast else page_sum / n_batches,
                page_se=float(draws.std() / len(draws) ** 0.5) if fast else np.nan,
                page_sampled=float(draws[0]),
                grad_energy=np.nan if fast else grad_energy_sum / n_batches,
                fisher=fisher_sum / max(st.examples, 1),
                coherence=coherence,
            ))
        frame = pd.DataFrame(rows).rename(columns={"name": "site"})
        return ProbeResult(frame, batch_page, n_batches, tokens, seconds, self.settings)


@dataclass
class ProbeResult:
    """Scores per site (one row each, in model order) and the per-batch page values for bootstrap."""

    scores: pd.DataFrame
    batch_page: np.ndarray  # (batches, sites)
    batches: int
    tokens: int
    seconds: float
    settings: ProbeSettings


def probe(model: nn.Module, sites: list[Site], batches: list, settings: ProbeSettings | None = None,
          progress: bool = False) -> ProbeResult:
    return Probe(model, sites, settings or ProbeSettings()).run(batches, progress=progress)
