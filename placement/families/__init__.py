"""Stage `families`: one module per adapter family, each registering everything about itself, as PEFT registers its
methods (`base.py` says what a family is). Adding one is a module that calls `register` (`placement.register_family`
from outside the package)."""
from .base import FAMILIES, Candidate, Family, Own, Part, ScoreOptions, Size, family_names, families_help, \
    get_family, register, unregister  # noqa: F401
from . import lora, ia3, bottleneck, prompt, prefix, llama_adapter  # noqa: F401,E402  (each registers its family)
from .lora import LORA, draw_lora_a, lora_config, lora_params  # noqa: F401,E402
from .adapters import load  # noqa: F401,E402  (an adapter of ours back on a base: PEFT has no such method)
