"""What a probe computes: every LoraConfig argument that changes the scores, and the probe's own mode."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import PlacementError

MODES = ("exact", "fast")


@dataclass
class ProbeSettings:
    """What a probe computes; every LoraConfig argument that changes the scores is here and goes into the plan."""

    # Fields with a "help" are command-line options too (placement/cli_settings.py builds them); seed and
    # checkpointing arrive from the options of the same name that TrainSettings declares.
    r: int = field(default=8, metadata={
        "help": "LoRA rank: the one the scores assume, of arms without :rN, of every validated site (plan and "
                "train: the plan's unless given)", "range": (1, 2 ** 16)})
    alpha: float = field(default=16, metadata={
        "help": "LoRA alpha at rank --r: it scales every score; arms keep alpha / r", "range": (0, 1e6)})
    seed: int = 0
    mode: str = field(default="exact", metadata={
        "help": "never form a weight-sized gradient; page is estimated over --draws", "option": "--fast",
        "flag": "fast"})
    draws: int = field(default=8, metadata={  # exact mode uses PEFT's one draw for page_sampled
        "help": "draws of lora_A in --fast mode", "range": (1, 2 ** 16)})
    use_rslora: bool = field(default=False, metadata={
        "help": "score for rsLoRA scaling, alpha / sqrt(r)", "option": "--rslora"})
    lora_dropout: float = 0.0  # recorded for the plan; the probe itself runs without dropout
    bias: str = "none"
    init_lora_weights: bool | str = True
    task_type: str = "CAUSAL_LM"
    checkpointing: bool = False
    # exact mode: the top sigma_i(G)^2 kept per site, for page_opt and rank allocation; 0: none. Off by default: on
    # short sequences it costs two N x N eigendecompositions per site and batch, several times the probe itself.
    spectrum_k: int = field(default=0, metadata={
        "help": "top singular values of each site's gradient to keep (exact probe) for page_opt and rank "
                "allocation; 64 when --score page_opt or --strategy allocate asks for them", "range": (0, 2 ** 16)})

    # the training scores (lookahead, lora_drop): one short run of LoRA on every site, computed only when a ranking
    # or a selector asks for them
    lookahead_steps: int = field(default=16, metadata={
        "help": "steps of the short all-site LoRA run behind the lookahead and lora_drop scores",
        "range": (1, 10 ** 6)})
    lookahead_lr: float = field(default=3e-3, metadata={
        "help": "AdamW learning rate of that run", "range": (0, 10.0)})

    def __post_init__(self) -> None:
        self.check()

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
