"""Stage `probe`: the score formulas (`scores`), hooks and the calibration loop (`engine`), reduction over ranks."""
from ..model.loss import token_loss  # noqa: F401  (its home before the stages; scripts import it from here)
from .draws import SiteState, draw_sites, peft_lora_a  # noqa: F401
from .engine import Probe, probe  # noqa: F401
from .results import ProbeResult  # noqa: F401
from .settings import MODES, ProbeSettings  # noqa: F401
