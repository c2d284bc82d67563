"""The demo: what a newcomer should see first. A quick recommendation at one budget, then the recommended plan
trained beside the dominant site and LoRA on every linear layer, on the same data, steps and test questions.

The recommendation is the short form of `placement recommend` (rung 0 only: one seed, short trials), so the demo
says which plan the tool would have the user follow and why; the comparison then says, on held-out questions the
recommendation never saw (the same split rule keeps them apart), how that plan does against the alternatives.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..plan.plan import Plan
from .arms import parse_plan_arm
from .compare import CompareSettings, run_comparison
from .recommend import RecommendSettings, run_recommend

BUDGET = 5.0  # percent of all-linear LoRA's parameters
RECOMMEND = "recommend"
PROFILE = "profile"


def quick_recommendation(settings: CompareSettings, n_test: int | None, n_validation: int | None, batches: int,
                         trial_steps: int, lookahead_steps: int) -> RecommendSettings:
    """Recommend's settings for the demo: one budget, rung 0 only, the comparison's data split and batches."""
    train = settings.train
    return RecommendSettings(budget=(BUDGET,), rungs=1, trial_steps=trial_steps, rates=(3e-3, 1e-2),
                             batches=batches, batch_size=train.batch_size, max_length=train.max_length,
                             seed=train.seed, n_test=n_test, n_validation=n_validation,
                             lookahead_steps=lookahead_steps)


def run_demo(model, tokenizer, source, data: str, splits, settings: CompareSettings, recommend: RecommendSettings,
             out: str | Path, *, progress: bool = False, log=print):
    """Recommend at one budget into OUT/recommend, then compare the recommended plan (the arm `recommended`) with
    the comparison's own arms, made from the recommendation's own profile (OUT/profile: one probe, not two).
    Returns (Comparison, the profile's plan, the recommendation at the budget)."""
    folder, profile = Path(out) / RECOMMEND, Path(out) / PROFILE
    decision = run_recommend(model, tokenizer, source, data, recommend, folder, progress=progress,
                             profile_out=profile, log=log)
    budget, chosen = next(iter(decision.items()))
    arm = parse_plan_arm(f"recommended={folder / f'plan-{budget}.json'}")  # at its judged rate; the others at --lr
    settings = replace(settings, arms=[arm, *settings.arms])
    comparison, base = run_comparison(model, tokenizer, source, data, splits, settings, out,
                                      base=Plan.load(profile / "plan.json"), progress=progress, log=log,
                                      scores_folder=profile)
    return comparison, base, {"budget": budget, **chosen}


def recommendation_lines(chosen: dict) -> list[str]:
    """What the demo prints about the recommendation: the plan, its size and why it was chosen."""
    why = (f"lowest validation loss of the selectors' plans after a short trial ({chosen['val_loss']:.4f}"
           + (f"; {chosen['margin_page']:+.4f} against page's own plan" if chosen.get("margin_page") is not None
              else "")
           + (f", {chosen['margin_runner_up']:+.4f} against the runner-up, {chosen['runner_up']}"
              if chosen.get("runner_up") else "") + ")")
    return [f"recommended at {chosen['budget']} of all-linear's parameters: the {chosen['selector']} selector's plan, "
            f"{chosen['params']:,} trainable parameters at lr {chosen['lr']:g}, for its {why}"]
