"""Stage `families`: one plugin per adapter family, registered by name as PEFT registers its methods."""
from .base import FAMILIES, Family, get_family, register  # noqa: F401
from .lora import LORA, draw_lora_a, lora_config, lora_params  # noqa: F401
from . import bottleneck, ia3  # noqa: F401,E402  (registered: ia3, series-bn, parallel-bn)
from .bottleneck import load  # noqa: F401,E402  (our bottleneck adapters back on a base: PEFT has no such method)
