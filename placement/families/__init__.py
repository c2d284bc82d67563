"""Stage `families`: one plugin per adapter family, registered by name as PEFT registers its methods."""
from .base import FAMILIES, Family, get_family, register  # noqa: F401
from .lora import LORA, draw_lora_a, lora_config, lora_params  # noqa: F401
