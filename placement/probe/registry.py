"""The registry of scores: one entry per score, and every list of score names in the package derived from it.

A score says what it needs: the probe's hooked forward and backward ("probe": the engine computes those columns
itself), the weights alone ("weights"), a forward pass only ("forward") or a short training run ("training"). A score
that needs anything but the probe carries its own `compute`, which the profile stage calls and joins as a column of
the result table (scores.csv). Adding a score is one module that calls `register_score` (built-in modules are
imported at the bottom of this file) plus its test; code outside the package calls `placement.register_score`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from ..errors import PlacementError

NEEDS = ("probe", "weights", "forward", "training")


@dataclass(frozen=True)
class Score:
    name: str
    help: str  # one line, used by the CLI help and the report
    needs: str  # one of NEEDS
    compute: Callable | None = None  # for needs != "probe": (ctx: ScoreContext) -> {site name: value}
    higher_is_better: bool = True
    # a non-negative energy (a ranking takes shares of it; a budget goes greedy by score per parameter) rather than
    # a figure that only orders sites (kappa, snr, params)
    energy: bool = True

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise PlacementError(f"score {self.name} needs {self.needs!r}: choose one of {', '.join(NEEDS)}")
        if (self.compute is None) != (self.needs == "probe"):
            raise PlacementError(f"score {self.name}: give `compute` exactly when needs is not 'probe' (the probe "
                                 "computes its own scores)")
        if self.energy and not self.higher_is_better:
            raise PlacementError(f"score {self.name}: an energy is ranked largest first; pass energy=False for a "
                                 "score where lower is better")


@dataclass
class ScoreContext:
    """What a score's `compute` may read: the model, its candidate sites, the calibration batches the probe saw and
    the probe's settings. `loss` (batch -> mean token loss) is the forward to run when the model is sharded."""

    model: object
    sites: list
    batches: list = field(default_factory=list)
    settings: object = None
    progress: bool = False
    loss: Callable | None = None


SCORES: dict[str, Score] = {}


def register_score(score: Score) -> Score:
    """Add `score` to the registry (a name may be registered once) and return it."""
    if score.name in SCORES:
        raise PlacementError(f"a score named {score.name} is registered already: pick another name")
    SCORES[score.name] = score
    return score


def get_score(name: str) -> Score:
    if name not in SCORES:
        raise PlacementError(f"unknown score {name}: choose one of {', '.join(SCORES)}")
    return SCORES[name]


def score_names(needs: str | None = None) -> list[str]:
    """Registered names in registration order, those with the given `needs` only when it is given."""
    return [name for name, score in SCORES.items() if needs is None or score.needs == needs]


def ranking_names() -> list[str]:
    """The scores a ranking can be taken by (`--score`, the score agreement, the report's table): the energies."""
    return [name for name, score in SCORES.items() if score.energy]


def profile_names(ranking: str = "page") -> list[str]:
    """The scores the profile stage computes beside the probe: every energy (each a score one could rank by) that
    needs no training run, and `ranking` itself; order-only figures (kappa, snr) are computed where they are used,
    training scores (a run of their own, many times the probe's cost) when they rank or a selector asks for them."""
    return [name for name, score in SCORES.items() if score.needs != "probe"
            and ((score.energy and score.needs != "training") or name == ranking)]


def compute_scores(ctx: ScoreContext, names: list[str]) -> pd.DataFrame:
    """One column per named score (none of them a probe score) and a `site` column, one row per site of `ctx`."""
    frame = pd.DataFrame({"site": [s.name for s in ctx.sites]})
    for name in names:
        score = get_score(name)
        if score.needs == "probe":
            raise PlacementError(f"score {name} comes from the probe itself: run the probe for it")
        values = score.compute(ctx)
        missing = [s.name for s in ctx.sites if s.name not in values]
        if missing:
            raise PlacementError(f"score {name} gave no value for site {missing[0]}: its compute must cover every "
                                 "site it is given")
        frame[name] = [values[s.name] for s in ctx.sites]
    return frame


# The probe's own columns (computed by the engine: see `probe.results`).
for _score in (
    Score("page", "E_A ||grad_B||^2 = s^2 r / (3 d_in) ||G||^2, seed-free: the default ranking score", "probe"),
    Score("page_se", "standard error of page over the draws of A (fast mode)", "probe", higher_is_better=False,
          energy=False),
    Score("page_sampled", "||grad_B||^2 with the A that PEFT draws for the seed", "probe"),
    Score("grad_energy", "||G||_F^2, the raw weight gradient's energy, no adapter (exact mode)", "probe"),
    Score("fisher", "page of each example's own mean loss, averaged: the empirical Fisher form", "probe"),
    Score("page_opt", "s^2/3 times G's top-r squared singular values: page with the best A (exact, --spectrum-k)",
          "probe"),
    Score("coherence", "||mean_b g_b||^2 / mean_b ||g_b||^2 in [0, 1]: do the batches agree on a direction", "probe",
          energy=False),
):
    register_score(_score)

# Built-in scores with their own computation: each module registers its scores on import.
from . import act_norm, lookahead, weights  # noqa: E402,F401
