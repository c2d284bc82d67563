"""What a probe computes: every LoraConfig argument that changes the scores, and the probe's own mode."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import PlacementError

MODES = ("exact", "fast")


@dataclass
class ProbeSettings:
    """What a probe computes; every LoraConfig argument that changes the scores is here and goes into the plan."""

    r: int = 8
    alpha: float = 16
    seed: int = 0
    mode: str = "exact"
    draws: int = 8  # draws of A in fast mode; exact mode uses PEFT's one draw for page_sampled
    use_rslora: bool = False
    lora_dropout: float = 0.0  # recorded for the plan; the probe itself runs without dropout
    bias: str = "none"
    init_lora_weights: bool | str = True
    task_type: str = "CAUSAL_LM"
    checkpointing: bool = False
    # exact mode: the top sigma_i(G)^2 kept per site, for page_opt and rank allocation; 0: none. Off by default: on
    # short sequences it costs two N x N eigendecompositions per site and batch, several times the probe itself.
    spectrum_k: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise PlacementError(f"unknown probe mode {self.mode}: choose exact or fast")
        if self.r < 1:
            raise PlacementError(f"--r {self.r} is not a rank: pass a positive integer")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PlacementError(f"--alpha {self.alpha} is not a LoRA alpha (it scales every score): pass a positive "
                                 "number such as 16")
        if self.mode == "fast" and self.draws < 2:
            raise PlacementError("--draws must be at least 2 in fast mode, to give page a standard error")
        if self.spectrum_k < 0:
            raise PlacementError(f"--spectrum-k {self.spectrum_k} is negative: pass 0 (no spectrum) or a count")
        if self.init_lora_weights is not True:
            raise PlacementError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: PAGE assumes PEFT's default "
                "init (B = 0, kaiming-uniform A); use init_lora_weights=True"
            )

    @property
    def spectrum(self) -> int:
        """How many singular values per site this probe keeps (the fast probe forms no G and keeps none)."""
        return self.spectrum_k if self.mode == "exact" else 0

    @property
    def num_draws(self) -> int:
        return self.draws if self.mode == "fast" else 1

    def lora_kwargs(self) -> dict:
        """The LoraConfig arguments that change the scores, as recorded in the plan."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return dict(
            task_type=self.task_type, r=self.r, lora_alpha=alpha, lora_dropout=self.lora_dropout,
            bias=self.bias, init_lora_weights=self.init_lora_weights, use_rslora=self.use_rslora,
        )

    def to_dict(self) -> dict:
        return asdict(self)
