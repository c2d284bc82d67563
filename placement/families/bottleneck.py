"""Bottleneck adapters, ours (neither PEFT 0.21 nor an `adapters` release for transformers 5 has them): a small MLP
h -> h + s * U f(D h), D: d -> w, U: w -> d, with U zero-initialised so the adapter starts as the identity.

Placements, for Llama-style blocks as LLM-Adapters puts them:
    series    on the output of a site: y = h + s * U f(D h), h = W x   (Pfeiffer: after the FFN's down projection;
              Houlsby also after attention's output projection)
    parallel  beside a site: y = W x + s * U f(D x)                    (He et al., beside up and down)
LLM-Adapters draws both D and U from N(0, 0.02), so its adapters do not start as the identity; ours keep PyTorch's
default init for D (kaiming uniform) and U = 0, as Houlsby et al. intend with their near-identity init.

Init-gradient score (DESIGN.md section 10): with U = 0, grad U = s * sum_t d_t f(D v_t)^T, where d is the gradient
at the site's output and v the tensor D reads (the output h in series, the input x in parallel); the score is its
squared Frobenius norm for the seed's D. A site of width d and bottleneck w trains 2 d w + w + d parameters.

Files: `adapter_config.json` (our schema, `placement-bottleneck/1`) and `adapter_model.safetensors`; `load` puts them
back on a base model (`placement.families.load`).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PlacementError
from ..model.sites import Site, find_sites
from .base import Candidate, Family, Own, Size, register

SCHEMA = "placement-bottleneck/1"
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}
PLACEMENTS = {"series": ("down", "o"), "parallel": ("up", "down")}
CONFIG_ATTRIBUTE = "bottleneck_config"  # the model holds the config its adapters were made from, as PEFT's does
DEFAULT_REDUCTION = 16


@dataclass
class BottleneckConfig:
    targets: list[str] = field(default_factory=list)  # site names; each gets one adapter
    placement: str = "series"  # series | parallel
    width: int | None = None  # bottleneck size; None: d // reduction_factor
    reduction_factor: int = DEFAULT_REDUCTION
    activation: str = "relu"
    scale: float = 1.0
    schema: str = SCHEMA

    def check(self) -> None:
        if self.placement not in PLACEMENTS:
            raise PlacementError(f"unknown bottleneck placement {self.placement}: choose series or parallel")
        if self.activation not in ACTIVATIONS:
            raise PlacementError(f"unknown bottleneck activation {self.activation}: choose relu or tanh")
        if self.width is None and self.reduction_factor < 1:
            raise PlacementError(f"reduction factor {self.reduction_factor} must be at least 1")

    def width_for(self, d: int) -> int:
        width = self.width if self.width is not None else d // self.reduction_factor
        if width < 1:
            raise PlacementError(f"a bottleneck of width {width} for a site of width {d}: pass a smaller reduction "
                                 "factor (:rfN) or a width of at least 1")
        return width


def site_seed(seed: int, name: str) -> int:
    """Each site's own seed, so an adapter's draw of D depends on the seed and the site, not on which others exist."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


class Bottleneck(nn.Module):
    """s * U f(D v): zero at init (U = 0); D drawn as nn.Linear draws it, from `seed` alone."""

    def __init__(self, d_read: int, width: int, d_write: int, activation: str, scale: float, seed: int = 0):
        super().__init__()
        self.down = nn.Linear(d_read, width)
        self.up = nn.Linear(width, d_write)
        weight, bias = draw_down(d_read, width, seed)
        with torch.no_grad():
            self.down.weight.copy_(weight)
            self.down.bias.copy_(bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation, self.scale = activation, scale

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(ACTIVATIONS[self.activation](self.down(v)))


class Adapted(nn.Module):
    """A site with its bottleneck: series on its output, or parallel beside it."""

    def __init__(self, base: nn.Module, adapter: Bottleneck, placement: str):
        super().__init__()
        self.base_layer, self.adapter, self.placement = base, adapter, placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adapter(y if self.placement == "series" else x)


def _width_of(site: Site | dict, placement: str) -> int:
    """The width the adapter reads: the output (series) or the input (parallel) of the site."""
    get = (lambda k: site[k]) if isinstance(site, dict) else (lambda k: getattr(site, k))
    return int(get("d_out") if placement == "series" else get("d_in"))


def bottleneck_sites(model, placement: str = "series") -> list[Site]:
    return [s for s in find_sites(model) if s.role in PLACEMENTS[placement]]


def bottleneck_params(site: dict, width: int, placement: str = "series") -> int:
    d_read, d_out = _width_of(site, placement), int(site["d_out"])
    return d_read * width + width + width * d_out + d_out


def reduced_params(site: dict, reduction_factor: int | None, placement: str) -> int:
    """A site's trainable parameters at a reduction factor (width = read width // factor), as a plan counts them."""
    config = BottleneckConfig(placement=placement, reduction_factor=reduction_factor or DEFAULT_REDUCTION)
    return bottleneck_params(site, config.width_for(_width_of(site, placement)), placement)


def apply(model: nn.Module, config: BottleneckConfig, seed: int = 0) -> nn.Module:
    """Insert the adapters in place; the base is frozen, the adapters train. Returns the model."""
    config.check()
    if holds(model):  # a second set would stack on the first and train both
        raise PlacementError("this model already has bottleneck adapters: apply the plan to a fresh base model")
    modules = dict(model.named_modules())
    missing = [t for t in config.targets if t not in modules]
    if missing:
        raise PlacementError(f"site {missing[0]} is not in this model: profile this model and make a new plan")
    model.requires_grad_(False)
    sites = {s.name: s for s in find_sites(model)}
    for name in config.targets:
        base, site = modules[name], sites[name]
        d_read = _width_of(site, config.placement)
        adapter = Bottleneck(d_read, config.width_for(d_read), site.d_out, config.activation, config.scale,
                             site_seed(seed, name))
        adapter.to(next(base.parameters()).device)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, Adapted(base, adapter, config.placement))
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def holds(model: nn.Module) -> bool:
    return hasattr(model, CONFIG_ATTRIBUTE) or any(isinstance(m, Adapted) for m in model.modules())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if ".adapter." in name}


def save(model: nn.Module, config: BottleneckConfig, folder: str | Path) -> None:
    from safetensors.torch import save_file

    from ..outputs import atomic_path, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "adapter_config.json", json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(adapter_state(model), str(tmp))


def load(model: nn.Module, folder: str | Path) -> nn.Module:
    """A saved bottleneck adapter back on its base model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlacementError(f"{folder} holds no readable adapter_config.json: pass a saved adapter folder") from err
    if data.get("schema") != SCHEMA:
        raise PlacementError(f"{folder} is not a bottleneck adapter (schema {data.get('schema')!r}); a PEFT adapter "
                             "loads with PeftModel.from_pretrained")
    config = BottleneckConfig(**{k: v for k, v in data.items() if k in BottleneckConfig.__dataclass_fields__})
    sites = {s.name for s in find_sites(model)}
    if not isinstance(config.targets, list) or not all(isinstance(t, str) and t in sites for t in config.targets):
        raise PlacementError(f"{folder} adapts modules that are no sites of this model: load it on the model it was "
                             "trained on")
    try:
        state = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as err:  # an empty or cut file surfaces as the reader's own error type
        raise PlacementError(f"{folder}/adapter_model.safetensors is empty or damaged ({type(err).__name__}): save "
                             "the adapter again") from err
    apply(model, config)
    try:
        load_state(model, state)
    except PlacementError as err:
        raise PlacementError(f"{folder}: {err}") from err
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors (`adapter_state`'s) into the adapters on `model`."""
    own = dict(model.named_parameters())
    if set(state) != {k for k in own if ".adapter." in k}:
        raise PlacementError("the saved tensors do not match the adapter's config: save the adapter again")
    wrong = [name for name, value in state.items() if own[name].shape != value.shape]
    if wrong:
        raise PlacementError(f"the saved {wrong[0]} has shape {tuple(state[wrong[0]].shape)} where this model's "
                             f"adapter has {tuple(own[wrong[0]].shape)}: load it on the model it was trained on")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def bottleneck_gradient(v: torch.Tensor, d: torch.Tensor, down: torch.Tensor, bias: torch.Tensor,
                        activation: str, scale: float) -> torch.Tensor:
    """U's first gradient for one batch: s * sum_t d_t f(D v_t + b)^T, in float32 at least (the precision autograd
    gives U.grad; half-precision activations are widened)."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    z = ACTIVATIONS[activation](v.to(dtype) @ down.to(dtype).t() + bias.to(dtype))
    return scale * d.to(dtype).reshape(-1, d.shape[-1]).t() @ z.reshape(-1, z.shape[-1])


def draw_down(d_read: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D and its bias as nn.Linear initialises them (kaiming uniform, a = sqrt(5); bias within 1/sqrt(d_read)),
    from their own generator."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.empty(width, d_read)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
    bound = 1 / math.sqrt(d_read)
    bias = torch.empty(width).uniform_(-bound, bound, generator=g)
    return weight, bias


def candidate(placement: str, site: Site, module: nn.Module, options) -> Candidate:
    """The site as the shared pass scores it, with its own draw of D (the seed's and the site's)."""
    d_read = _width_of(site, placement)
    width = options.width or max(d_read // options.width_factor, 1)
    device = next(module.parameters()).device
    down = tuple(t.to(device) for t in draw_down(d_read, width, site_seed(options.seed, site.name)))
    params = bottleneck_params(site.to_dict(), width, placement)
    return Candidate(params, lambda x, y, grad: bottleneck_gradient(y if placement == "series" else x, grad, *down,
                                                                    options.activation, options.scale))


OWN = Own(config_type=BottleneckConfig, schema=SCHEMA, attach=apply, holds=holds, tensors=adapter_state,
          load_tensors=load_state, save=lambda model, folder: save(model, getattr(model, CONFIG_ATTRIBUTE), folder),
          load=load)


def _family(placement: str, help: str) -> Family:
    return register(Family(
        name=f"{placement}-bn", help=help, score="||grad U||^2",
        roles=PLACEMENTS[placement], find_sites=lambda model: bottleneck_sites(model, placement),
        params=lambda site, reduction_factor: reduced_params(site, reduction_factor, placement),
        config=lambda kwargs: BottleneckConfig(**(kwargs | {"placement": placement})),
        kwargs=lambda plan, model=None: {"targets": list(plan.targets), "reduction_factor": (
            plan.family_args or {}).get("reduction_factor", DEFAULT_REDUCTION)},
        size=Size("rf", "reduction factor", "a bottleneck reduction factor, e.g. series-bn:rf16", DEFAULT_REDUCTION,
                  "reduction_factor"),
        candidate=lambda site, module, options: candidate(placement, site, module, options),
        own=OWN,
    ))


SERIES = _family("series", "series bottleneck after the FFN and attention outputs (ours, Houlsby/Pfeiffer)")
PARALLEL = _family("parallel", "parallel bottleneck beside the FFN's up and down projections (ours, He et al.)")
