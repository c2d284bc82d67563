"""Stage `model`: load a causal LM and its tokenizer (`load.py`), find its candidate sites (`sites.py`), and the
token loss every stage shares (`loss.py`). `placement.model.load` is the module; its function is `load.load`."""
from .load import EMBEDDED_ALIAS, ModelSource, cache_root, embedded_gguf, pick_device, resolve  # noqa: F401
from .loss import token_loss  # noqa: F401
from .sites import ROLES, Site, find_blocks, find_sites, fingerprint, modules_by_name, num_layers  # noqa: F401
