"""Stage `data`: task records, prompt/response examples with loss masks, batches and splits."""
from .batches import *  # noqa: F401,F403
from .examples import *  # noqa: F401,F403
from .records import *  # noqa: F401,F403
