"""The entrants of a recommendation: every selector's plan at every budget, from the scores it reads.

The probe's scores (page, grad_energy, fisher, page_opt's spectrum, and the profile's forward scores such as act_norm)
come from one profile of calibration batches drawn from the training split; every other score a selector reads
through the score registry on one context over the same batches (`lookahead` and `lora_drop` share one short run;
`kappa`, `snr` and `params` read the weights). A user's plan files enter as they are, at each budget they fit.
"""
from __future__ import annotations

from pathlib import Path

from ..plan.budget import get_selector, pick
from ..plan.plan import Plan
from ..probe.lookahead import cached_run
from ..probe.registry import ScoreContext, get_score, score_names


def computed_scores(names: list[str], model, sites, calib, settings, log=print) -> dict[str, dict[str, float]]:
    """The named scores the profile does not give ({score: {site: value}}), each through the score registry, on one
    shared context: scores that read one cached run (lookahead and lora_drop) share that run."""
    context = ScoreContext(model=model, sites=sites, batches=calib, settings=settings.probe_settings())
    scores = {name: {site: float(v) for site, v in get_score(name).compute(context).items()} for name in names}
    if any(get_score(name).needs == "training" for name in names):
        run = cached_run(context)  # the run those scores read, not a second one
        log(f"lookahead  {settings.lookahead_steps} steps on every site: loss change {run.realised:+.4f} realised, "
            f"{run.predicted:+.4f} predicted to first order (ratio {run.ratio:.2f})")
    return scores


def scores_and_base(model, tokenizer, source, data: str, train_set: list, settings, progress: bool = False,
                    log=print):
    """(the profile, {score: {site: value}}, spectrum or None) for the selectors of `settings`."""
    from ..model.sites import find_sites
    from .profile import calibration_batches, profile_batches

    calib = calibration_batches(tokenizer, data, batches=settings.batches, batch_size=settings.batch_size,
                                max_length=settings.max_length, seed=settings.seed, examples=train_set)
    profile = profile_batches(model, source, calib, data=data, batch_size=settings.batch_size,
                              max_length=settings.max_length, settings=settings.probe_settings(), bootstrap=0,
                              progress=progress)
    ranked = profile.ranked
    scores = {c: dict(zip(ranked["site"], ranked[c].astype(float))) for c in score_names() if c in ranked.columns}
    needed = [get_selector(name).score for name in settings.selectors]
    needed = [name for name in dict.fromkeys(needed) if name is not None and name not in scores]
    run_scores = computed_scores(needed, model, find_sites(model), calib, settings, log)
    spectrum = None
    if profile.result.spectrum is not None:
        spectrum = dict(zip(profile.result.scores["site"], profile.result.spectrum))
    return profile, scores | run_scores, spectrum


def selector_plans(base: Plan, budgets: dict[str, int], scores: dict, spectrum, settings,
                   log=print) -> dict[tuple[str, str], Plan]:
    """Every selector's plan at every budget (page's always: the sweep and the reference use it); a role selector
    that cannot fit rank 1 is skipped, and said so."""
    from .recommend import plan_for

    plans = {}
    names = list(dict.fromkeys(("page",) + tuple(settings.selectors)))
    for budget, max_params in budgets.items():
        for name in names:
            selector = get_selector(name)
            chosen = pick(selector, base.sites, scores.get(selector.score), max_params, settings.r, spectrum)
            if chosen.skipped:
                log(f"{name} at {budget}: skipped ({chosen.skipped})")
                continue
            plans[name, budget] = plan_for(base, chosen, f"{name}@{budget}")
    return plans


def entrant_plans(paths: list[str], model, budgets: dict[str, int], log=print) -> dict[tuple[str, str], Plan]:
    """The user's plan files, each at every budget it fits."""
    plans = {}
    for path in paths:
        plan = Plan.load(path)
        plan.check(model)
        name = f"entrant:{Path(path).stem}"
        for budget, max_params in budgets.items():
            if plan.trainable_params <= max_params:
                plans[name, budget] = plan
            else:
                log(f"{name} at {budget}: skipped ({plan.trainable_params} parameters, over the budget)")
    return plans
