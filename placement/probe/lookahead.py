"""Scores that look past the first step: one short LoRA run on every candidate site at once.

PAGE is exact about the first SGD step, and the first step is not what tens of steps achieve. Here every site gets
a LoRA (PEFT, the probe's rank, alpha and seed) and the adapters train together for K steps, so the scores see the
interactions between sites and the optimizer's own geometry:

- `lookahead`: the first-order attribution of the loss change along the path,
  a_s = - sum_t <grad_{theta_s} L_t, theta_{s,t+1} - theta_{s,t}> over the site's A and B, from the actual updates
  (so clipping, warm-up and AdamW's preconditioning need no special case). With SGD at a constant rate, no clipping,
  one batch and K = 1 it is lr * ||s G A^T||^2 for the run's own A (grad_A = 0 at B = 0): PAGE's sampled form.
- `lora_drop` (LoRA-drop, arXiv 2402.07721): after the run, with every adapter active, the mean over the
  calibration target tokens of ||s B A x||^2, the size of what each adapter adds to its layer's output.
- `params`: d_in + d_out, the adapter's size per rank; the baseline every data score has to beat.

Both training scores come from one run, cached on the score context, so asking for both costs one run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlacementError
from ..families import adapters
from ..model.loss import token_loss
from ..model.sites import Site

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class LookaheadSettings:
    """The short run behind `lookahead` and `lora_drop`."""

    steps: int = 16  # K, one calibration batch per step, cycling
    lr: float = 3e-3  # compare-v2's best all-linear rate on the embedded model
    optimizer: str = "adamw"
    clip: float | None = 1.0  # max gradient norm over all adapters; None: no clipping

    def check(self) -> None:
        if self.steps < 1:
            raise PlacementError(f"--lookahead-steps {self.steps} trains nothing: pass at least 1")
        if not self.lr > 0:
            raise PlacementError(f"--lookahead-lr {self.lr} is not a learning rate: pass a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise PlacementError(f"unknown optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class LookaheadResult:
    attribution: dict[str, float]  # lookahead, per site
    lora_drop: dict[str, float]
    losses: list[float] = field(default_factory=list)  # the loss of every step
    start_loss: float = float("nan")  # mean over the trained batches of their loss when first met
    end_loss: float = float("nan")  # mean over the same batches after the run (the lora_drop forward)
    adapter: dict[str, tuple] = field(default_factory=dict)  # site -> (A, B, s) at the end of the run

    @property
    def predicted(self) -> float:
        """The first-order loss change the attributions add up to."""
        return -sum(self.attribution.values())

    @property
    def realised(self) -> float:
        return self.end_loss - self.start_loss

    @property
    def ratio(self) -> float:
        """Realised over predicted loss change: near 1 where first order holds along the path."""
        return self.realised / self.predicted if self.predicted else float("nan")


def _lora_layers(peft_model, sites: list[Site]) -> dict[str, nn.Module]:
    base = peft_model.base_model.model
    return {s.name: base.get_submodule(s.name) for s in sites}


@contextlib.contextmanager
def _adapted(model: nn.Module, sites: list[Site], lora_kwargs: dict, seed: int):
    """`model` with a PEFT LoRA on every site (A drawn after `torch.manual_seed(seed)`), frozen base, eval mode;
    the adapters removed, the flags and the caller's random stream restored afterwards."""
    from peft import LoraConfig

    kwargs = {k: v for k, v in lora_kwargs.items() if k not in ("target_modules", "task_type")}
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    rng = torch.get_rng_state()
    peft_model = adapters.attach(model, LoraConfig(target_modules=[s.name for s in sites], **kwargs), seed)
    torch.set_rng_state(rng)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()  # the base modules go back in place of the LoRA layers
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def _site_params(layers: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
    return {name: [layer.lora_A["default"].weight, layer.lora_B["default"].weight] for name, layer in layers.items()}


def _train(peft_model, params: dict[str, list[torch.Tensor]], batches: list, settings: LookaheadSettings,
           device) -> tuple[dict[str, float], list[float], dict[int, float]]:
    """K steps; per site the summed -<g_t, delta_t>; the step losses; each batch's loss when first met."""
    flat = [p for ps in params.values() for p in ps]
    optimizer = OPTIMIZERS[settings.optimizer](flat, lr=settings.lr)
    # summed on the device, read once at the end: no host sync per site and step
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in params}
    losses, first = [], {}
    for step in range(settings.steps):
        index = step % len(batches)
        loss = token_loss(peft_model, batches[index].to(device))
        loss.backward()
        value = float(loss.detach())
        losses.append(value)
        first.setdefault(index, value)
        # the attribution takes the true gradient, before clipping changes what the optimizer sees
        grads = [p.grad.detach().clone() for p in flat]
        before = [p.detach().clone() for p in flat]
        if settings.clip is not None:
            torch.nn.utils.clip_grad_norm_(flat, settings.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        position = 0
        for name, ps in params.items():
            for p in ps:
                moved = p.detach() - before[position]
                sums[name] -= (grads[position].double() * moved.double()).sum()
                position += 1
    attribution = {name: float(value) for name, value in sums.items()}
    return attribution, losses, first


def _drop_energy(peft_model, layers: dict[str, nn.Module], batches: list, device) -> tuple[dict[str, float], list]:
    """Per site the mean over target tokens of ||s B A x||^2, all adapters on; and each batch's loss."""
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in layers}
    keep: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():
        scale = float(layer.scaling["default"])

        def hook(module, inputs, output, name=name, scale=scale):
            energy = (output.detach().float() * scale).pow(2).sum(dim=-1)  # (batch, tokens)
            sums[name] += energy[keep["mask"]].double().sum()
        handles.append(layer.lora_B["default"].register_forward_hook(hook))
    losses, tokens = [], 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                mask = torch.zeros_like(batch.labels, dtype=torch.bool)
                mask[:, :-1] = batch.labels[:, 1:] != -100  # position t's output predicts token t + 1
                keep["mask"] = mask
                losses.append(float(token_loss(peft_model, batch)))
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(value) / max(tokens, 1) for name, value in sums.items()}, losses


def lookahead_run(model: nn.Module, sites: list[Site], batches: list, lora_kwargs: dict, seed: int = 0,
                  settings: LookaheadSettings | None = None) -> LookaheadResult:
    """One short LoRA run on every site of `sites`, step t on `batches[t % len(batches)]`: the `lookahead`
    attribution and the `lora_drop` energy per site. `lora_kwargs` are LoraConfig arguments (r, lora_alpha, ...);
    the model is left as it was."""
    settings = settings or LookaheadSettings()
    settings.check()
    if not batches:
        raise PlacementError("the lookahead run needs calibration batches: pass at least one")
    device = next(model.parameters()).device
    with _adapted(model, sites, lora_kwargs, seed) as peft_model:
        layers = _lora_layers(peft_model, sites)
        attribution, losses, first = _train(peft_model, _site_params(layers), batches, settings, device)
        drop, end = _drop_energy(peft_model, layers, batches, device)
        adapter = {name: (layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone(), float(layer.scaling["default"]))
                   for name, layer in layers.items()}
    seen = sorted(first)
    return LookaheadResult(attribution, drop, losses, start_loss=sum(first[i] for i in seen) / len(seen),
                           end_loss=sum(end[i] for i in seen) / len(seen), adapter=adapter)


# -- the scores, as the score registry computes them: compute(ctx) -> {site: value} --------------------------------
def _settings_of(ctx) -> tuple[dict, int, LookaheadSettings]:
    settings = ctx.settings
    lora_kwargs = settings.lora_kwargs() if hasattr(settings, "lora_kwargs") else dict(settings)
    run = LookaheadSettings(steps=getattr(settings, "lookahead_steps", 16), lr=getattr(settings, "lookahead_lr", 3e-3))
    return lora_kwargs, getattr(settings, "seed", 0), run


def cached_run(ctx) -> LookaheadResult:
    """The context's one lookahead run (both training scores read it)."""
    cache = vars(ctx)
    if "_lookahead_run" not in cache:
        lora_kwargs, seed, run = _settings_of(ctx)
        cache["_lookahead_run"] = lookahead_run(ctx.model, ctx.sites, ctx.batches, lora_kwargs, seed, run)
    return cache["_lookahead_run"]


def lookahead_score(ctx) -> dict[str, float]:
    return cached_run(ctx).attribution


def lora_drop_score(ctx) -> dict[str, float]:
    return cached_run(ctx).lora_drop


from .registry import Score, register_score  # noqa: E402  (the registry imports this module last)

register_score(Score("lookahead", "first-order loss decrease attributed to each site along a short LoRA run on "
                                  "every site (--lookahead-steps, --lookahead-lr)", "training", lookahead_score))
register_score(Score("lora_drop", "mean ||s B A x||^2 over target tokens after the same run (LoRA-drop)", "training",
                     lora_drop_score))
