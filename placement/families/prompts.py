"""What the virtual-token families share (prompt tuning, prefix tuning, LLaMA-Adapter; one module each): PEFT's
config for a plan, the modules they reach, and the site rows a plan counts their parameters from.

They change the forward (or, for LLaMA-Adapter, hold a gate at 0), so their init-gradient scores come from PEFT's own
model, one pass each (`placement.probe.prompts`); each family says which part of the first gradient belongs to
which of its sites. They have no linear sites: a plan names the modules they reach instead (the input embedding for
prompt tuning, the blocks for prefix tuning and LLaMA-Adapter's top layers), and a site row there carries the width
one virtual token trains as `d_out`.
"""
from __future__ import annotations

from ..errors import PlacementError
from ..model.sites import Site, find_blocks
from .base import Family, Size, family_names, register

DEFAULT_LENGTH = 10
TASK = "CAUSAL_LM"
LENGTH = Size("len", "length", "a number of virtual tokens, e.g. prefix:len10", DEFAULT_LENGTH, "num_virtual_tokens")
FORMATS = ("plan", "peft")  # PEFT saves these configs; axolotl, LLaMA-Factory and Spectrum train none of them


def __getattr__(name):  # the virtual-token families, as registered when asked (a family may register late)
    if name == "PROMPT_FAMILIES":
        return family_names("virtual")
    raise AttributeError(name)


def text_config(model_config):
    return getattr(model_config, "text_config", None) or model_config


def hidden_of(model_config) -> int:
    config = text_config(model_config)
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd")


def block_sites(model, role: str, width: int) -> list[Site]:
    """One row per block, as a plan names the blocks a family reaches; `width` is what one virtual token trains."""
    prefix, blocks = find_blocks(model)
    hidden = hidden_of(model.config)
    return [Site(f"{prefix}.{i}", i, role, hidden, width, kind="block") for i in range(len(blocks))]


def length_of(plan) -> int:
    length = (plan.family_args or {}).get(LENGTH.arg, DEFAULT_LENGTH)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise PlacementError(f"a {plan.family} length of {length} adds no virtual token: pass 1 or more")
    return length


def tokens_params(site: dict, length: int | None) -> int:
    """Trainable parameters of `length` virtual tokens at a site row: one `d_out`-wide vector each."""
    return (length or DEFAULT_LENGTH) * int(site["d_out"])


def virtual_kwargs(plan, model=None) -> dict:
    """PromptTuningConfig and PrefixTuningConfig arguments for a plan."""
    return {"task_type": TASK, "num_virtual_tokens": length_of(plan)}


def embedding_grad(peft_model):
    """The first gradient of PEFT's virtual-token table (prompt and prefix tuning keep one)."""
    return peft_model.prompt_encoder["default"].embedding.weight.grad


def peft_config(class_name: str):
    """`config` for a family of PEFT's: its config class, imported when a plan is applied."""
    def make(kwargs: dict):
        import peft

        return getattr(peft, class_name)(**kwargs)
    return make


def register_virtual(name: str, help: str, score: str, peft_class: str, **fields) -> Family:
    """Register a virtual-token family: PEFT's config class, the length after ':len', virtual tokens on every site
    it reaches unless `fields` says otherwise (LLaMA-Adapter's -N takes the top layers)."""
    return register(Family(**{"name": name, "help": help, "score": score, "config": peft_config(peft_class),
                              "params": tokens_params, "kwargs": virtual_kwargs, "size": LENGTH, "count": "none",
                              "ranked": False, "virtual": True, "formats": FORMATS} | fields))
