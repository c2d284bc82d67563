"""Find the candidate adapter sites of a decoder model: every linear map inside its repeated blocks.

Discovery is structural (the largest `ModuleList` of identical blocks), so new architectures work without a name
list; only the role of a site comes from a small alias table, because role is a naming convention.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import PlacementError

# The order roles are shown in: attention first, then the FFN, in the order data flows through them.
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "router")

# Leaf module name -> role. Names that mean different things in attention and in the FFN are in CONTEXTUAL.
ALIASES = {
    "q_proj": "q", "query": "q", "wq": "q", "q_lin": "q",
    "k_proj": "k", "key": "k", "wk": "k", "k_lin": "k",
    "v_proj": "v", "value": "v", "wv": "v", "v_lin": "v",
    "o_proj": "o", "out_proj": "o", "out_lin": "o",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "wqkv": "qkv", "qkv": "qkv", "w_pack": "qkv",
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate",
    "up_proj": "up", "c_fc": "up", "dense_h_to_4h": "up", "fc1": "up", "w3": "up", "fc_in": "up", "wi_1": "up",
    "lin1": "up",
    "down_proj": "down", "dense_4h_to_h": "down", "fc2": "down", "w2": "down", "fc_out": "down", "lin2": "down",
    "gate_up_proj": "gate_up",
    "router": "router",
}
ATTENTION_PARENTS = {"attn", "self_attn", "attention", "self_attention", "mixer"}
CONTEXTUAL = {  # leaf -> (role inside attention, role elsewhere)
    "c_proj": ("o", "down"),
    "dense": ("o", "down"),
    "wo": ("o", "down"),
}


@dataclass(frozen=True)
class Site:
    """One linear map an adapter can attach to. `name` is exactly the string PEFT's `target_modules` matches."""

    name: str
    layer: int
    role: str
    d_in: int
    d_out: int
    kind: str = "Linear"

    def lora_params(self, r: int) -> int:
        """Trainable parameters of a rank-r LoRA here: A is r x d_in, B is d_out x r."""
        return r * (self.d_in + self.d_out)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_row(self) -> dict:
        """What `placement sites --json` lists."""
        return {"site": self.name, "layer": self.layer, "role": self.role, "d_in": self.d_in, "d_out": self.d_out}


def site_table(sites: list[Site]) -> list[str]:
    """The sites as aligned text lines, with a closing count."""
    lines = [f"{'site':48s} {'layer':>5s} {'role':>7s} {'d_in':>6s} {'d_out':>6s}"]
    lines += [f"{s.name:48s} {s.layer:5d} {s.role:>7s} {s.d_in:6d} {s.d_out:6d}" for s in sites]
    lines.append(f"{len(sites)} sites in {len({s.layer for s in sites})} layers")
    return lines


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out): `Conv1D` stores its weight transposed relative to `nn.Linear`."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's repeated blocks: the `ModuleList` with the most children of one class holding linear maps."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > best[0]:
            best = (len(module), name, module)
    if best is None:
        raise PlacementError(
            f"no repeated blocks with linear layers found in {type(model).__name__}: is this a decoder-only causal LM?"
        )
    return best[1], best[2]


def role_of(path: str, d_out: int, num_experts: int | None) -> str:
    """Canonical role from the module's path inside its block, e.g. `self_attn.q_proj` -> q."""
    parts = path.split(".")
    leaf = parts[-1].lower()
    parent = parts[-2].lower() if len(parts) > 1 else ""
    if leaf in CONTEXTUAL:
        in_attention, elsewhere = CONTEXTUAL[leaf]
        return in_attention if parent in ATTENTION_PARENTS else elsewhere
    if leaf == "gate" or leaf.endswith("_gate") or "router" in leaf:
        # A mixture-of-experts router maps to the number of experts; a shared-expert gate to one scalar.
        if d_out == 1 or (num_experts is not None and d_out == num_experts) or leaf != "gate":
            return "router"
    return ALIASES.get(leaf, "other")


def _num_experts(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_sites(model: nn.Module, include_routers: bool = False) -> list[Site]:
    """Every linear map inside the decoder blocks, in model order, with layer index and role."""
    prefix, blocks = find_blocks(model)
    experts = _num_experts(model)
    sites = []
    for layer, block in enumerate(blocks):
        inside = None  # a PEFT layer being walked: its base_layer, lora_A, lora_B, ... are not sites
        for path, module in block.named_modules():
            if inside and path.startswith(inside):
                continue
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Module) and is_linear(base):  # PEFT wraps the site: the site keeps its name
                inside, module = path + ".", base
            elif not is_linear(module):
                continue
            d_in, d_out = shape_of(module)
            role = role_of(path, d_out, experts)
            if role == "router" and not include_routers:
                continue
            name = f"{prefix}.{layer}.{path}" if prefix else f"{layer}.{path}"
            sites.append(Site(name, layer, role, d_in, d_out, type(module).__name__))
    if not sites:
        raise PlacementError(f"{type(model).__name__} has no linear layers inside its blocks: nothing to adapt")
    return sites


def fingerprint(sites: list[Site]) -> str:
    """A short hash of site names and shapes: a plan made for one model is refused on a different one."""
    text = "\n".join(f"{s.name}:{s.d_in}:{s.d_out}" for s in sites)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def modules_by_name(model: nn.Module, sites: list[Site]) -> dict[str, nn.Module]:
    wanted = {s.name for s in sites}
    return {name: module for name, module in model.named_modules() if name in wanted}


def num_layers(model: nn.Module) -> int:
    return len(find_blocks(model)[1])


def candidate_weight_bytes(model: nn.Module, sites: list[Site]) -> int:
    modules = modules_by_name(model, sites)
    return sum(m.weight.numel() * m.weight.element_size() for m in modules.values())


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
