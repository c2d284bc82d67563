"""Site discovery against a direct walk of each family's blocks, and against PEFT as the oracle for names."""
import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from placement.errors import PlacementError
from placement.model.sites import Site, find_blocks, find_sites, fingerprint, num_layers, role_of
from tiny import FAMILIES, tiny_model

LLAMA_LIKE = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
}
# family -> (path of the block list, role of each linear map by its path inside a block)
EXPECTED = {
    "llama": ("model.layers", LLAMA_LIKE),
    "mistral": ("model.layers", LLAMA_LIKE),
    "qwen2": ("model.layers", LLAMA_LIKE),
    "qwen3": ("model.layers", LLAMA_LIKE),
    "gemma": ("model.layers", LLAMA_LIKE),
    "phi3": ("model.layers", {
        "self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down",
    }),
    "gpt2": ("transformer.h", {
        "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down",
    }),
    "gpt_neox": ("gpt_neox.layers", {
        "attention.query_key_value": "qkv", "attention.dense": "o", "mlp.dense_h_to_4h": "up",
        "mlp.dense_4h_to_h": "down",
    }),
    "opt": ("model.decoder.layers", {
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
        "fc1": "up", "fc2": "down",
    }),
}


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in FAMILIES}


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(FAMILIES)


def walk(model, block_path):
    """Every nn.Linear / Conv1D inside the blocks, in module order: (name, layer, path in block, module)."""
    blocks = model.get_submodule(block_path)
    assert isinstance(blocks, nn.ModuleList)
    out = []
    for layer, block in enumerate(blocks):
        for path, module in block.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                out.append((f"{block_path}.{layer}.{path}", layer, path, module))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_find_sites_matches_a_walk_of_the_blocks(models, family):
    model = models[family]
    block_path, roles = EXPECTED[family]
    expected = walk(model, block_path)
    sites = find_sites(model)

    assert find_blocks(model)[0] == block_path
    assert num_layers(model) == FAMILIES[family].get("num_hidden_layers", FAMILIES[family].get("n_layer"))
    assert [s.name for s in sites] == [name for name, *_ in expected]
    assert len({s.name for s in sites}) == len(sites)
    assert {s.layer for s in sites} == set(range(num_layers(model)))
    for site, (name, layer, path, module) in zip(sites, expected):
        assert site.layer == layer
        assert site.role == roles[path], site
        assert site.kind == type(module).__name__
        # The module itself says which sizes it maps between: feed it d_in features, get d_out back.
        with torch.no_grad():
            assert module(torch.zeros(1, site.d_in)).shape == (1, site.d_out)
        assert site.lora_params(3) == 3 * (site.d_in + site.d_out)
    # Every role the family uses is found, in every layer.
    for layer in range(num_layers(model)):
        assert sorted(s.role for s in sites if s.layer == layer) == sorted(roles.values())


def test_conv1d_shape_is_transposed(models):
    sites = {s.name: s for s in find_sites(models["gpt2"])}
    c_fc = sites["transformer.h.0.mlp.c_fc"]
    c_proj = sites["transformer.h.0.mlp.c_proj"]
    c_attn = sites["transformer.h.0.attn.c_attn"]
    assert (c_fc.kind, c_fc.d_in, c_fc.d_out) == ("Conv1D", 16, 64)
    assert (c_proj.d_in, c_proj.d_out) == (64, 16)
    assert (c_attn.d_in, c_attn.d_out) == (16, 48)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_site_name_targets_exactly_one_module_in_peft(models, family):
    model = models[family]
    for site in find_sites(model):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=[site.name], r=2))
        wrapped = [name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A")]
        assert wrapped == [site.name]
        layer = peft_model.base_model.model.get_submodule(site.name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.numel() + b.numel() == site.lora_params(2)


def test_to_dict_round_trips():
    site = Site("model.layers.0.mlp.down_proj", 0, "down", 24, 16)
    assert Site(**site.to_dict()) == site
    assert site.to_dict()["kind"] == "Linear"


@pytest.mark.parametrize("path, d_out, experts, role", [
    ("attn.c_proj", 16, None, "o"),
    ("mlp.c_proj", 16, None, "down"),
    ("attention.dense", 16, None, "o"),
    ("mlp.dense", 16, None, "down"),
    ("mlp.gate", 4, 4, "router"),
    ("block_sparse_moe.gate", 8, 8, "router"),
    ("mlp.shared_expert_gate", 1, 4, "router"),
    ("mlp.gate", 24, None, "other"),  # a dense FFN's gate named plainly is not a router
    ("mlp.some_new_proj", 24, None, "other"),
])
def test_role_of(path, d_out, experts, role):
    assert role_of(path, d_out, experts) == role


def tiny_moe():
    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4,
        num_experts_per_tok=2, vocab_size=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_routers_excluded_by_default_and_included_on_request():
    model = tiny_moe()
    linears = walk(model, "model.layers")
    is_router = lambda path: re.search(r"(^|\.)gate$|_gate$", path) is not None  # noqa: E731
    routers = [name for name, _, path, _ in linears if is_router(path)]

    default = find_sites(model)
    assert all(s.role != "router" for s in default)
    assert [s.name for s in default] == [name for name, _, path, _ in linears if not is_router(path)]
    assert all(s.kind == "Linear" for s in default)
    # The experts' own FFNs and the attention are still there.
    assert {"q", "k", "v", "o", "gate", "up", "down"} <= {s.role for s in default}

    with_routers = find_sites(model, include_routers=True)
    assert all(s.kind == "Linear" for s in with_routers)
    if routers:
        assert [s.name for s in with_routers if s.role == "router"] == routers
        assert [s.name for s in with_routers] == [name for name, *_ in linears]
    else:  # a router that is not an nn.Linear is not a site at all
        assert all(s.role != "router" for s in with_routers)
        assert with_routers == default


def test_fingerprint_follows_names_and_shapes():
    base = find_sites(tiny_model("llama"))
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", fingerprint(base))
    assert fingerprint(find_sites(tiny_model("llama", seed=5))) == fingerprint(base)  # weights do not matter
    assert fingerprint(find_sites(tiny_model("llama", intermediate_size=32))) != fingerprint(base)
    assert fingerprint(find_sites(tiny_model("llama", num_hidden_layers=3))) != fingerprint(base)
    changed = [base[0].__class__(**(base[0].to_dict() | {"d_out": base[0].d_out + 1}))] + base[1:]
    assert fingerprint(changed) != fingerprint(base)
    renamed = [base[0].__class__(**(base[0].to_dict() | {"name": base[0].name + "x"}))] + base[1:]
    assert fingerprint(renamed) != fingerprint(base)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)


def test_non_decoder_modules_are_refused():
    with pytest.raises(PlacementError, match="no repeated blocks"):
        find_sites(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    with pytest.raises(PlacementError):  # repeated blocks, but nothing linear in them
        find_sites(nn.ModuleDict({"layers": nn.ModuleList([Block(), Block()])}))
    with pytest.raises(PlacementError):  # a list of mixed module types is not a stack of blocks
        find_sites(nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])}))


def test_largest_block_list_wins():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)) for _ in range(3)])

    sites = find_sites(Net())
    assert [s.name for s in sites] == [f"layers.{i}.{j}" for i in range(3) for j in range(2)]
    assert [(s.d_in, s.d_out) for s in sites[:2]] == [(4, 6), (6, 4)]
    assert all(s.role == "other" for s in sites)
