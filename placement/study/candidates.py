"""The entrants of a recommendation: every selector's plan at every budget, from the scores it reads.

The probe's scores (page, grad_energy, fisher, page_opt's spectrum) come from one profile of calibration batches
drawn from the training split; `lookahead` and `lora_drop` from one short run on the same batches; `kappa` and
`snr` from the weights; `params` from the shapes. A user's plan files enter as they are, at each budget they fit.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PlacementError
from ..plan.budget import get_selector, pick
from ..plan.plan import Plan

PROBE_COLUMNS = ("page", "page_sampled", "grad_energy", "fisher", "page_opt")


def _computed(name: str, model, sites, calib, settings, log=print) -> dict[str, dict[str, float]]:
    """A score the profile does not give, by name ({score: {site: value}}, with its run's companions)."""
    from ..plan import selectors
    from ..probe import lookahead

    if name in ("lookahead", "lora_drop"):  # one run gives both
        run = lookahead.lookahead_run(model, sites, calib, settings.probe_settings().lora_kwargs(), settings.seed,
                                      lookahead.LookaheadSettings(steps=settings.lookahead_steps,
                                                                  lr=settings.lookahead_lr))
        log(f"lookahead  {settings.lookahead_steps} steps on every site: loss change {run.realised:+.4f} realised, "
            f"{run.predicted:+.4f} predicted to first order (ratio {run.ratio:.2f})")
        return {"lookahead": run.attribution, "lora_drop": run.lora_drop}
    if name in ("kappa", "snr"):
        return {name: (selectors.kappa_scores if name == "kappa" else selectors.snr_scores)(model, sites)}
    if name == "params":
        return {name: {s.name: float(s.d_in + s.d_out) for s in sites}}
    try:  # any other score through the score registry, where the package has one
        from ..probe import registry
    except ImportError:
        registry = None
    if registry is None or name not in registry.score_names():
        raise PlacementError(f"score {name} is not available to recommend: choose another selector")
    context = registry.ScoreContext(model=model, sites=sites, batches=calib, settings=settings.probe_settings())
    return {name: registry.get_score(name).compute(context)}


def scores_and_base(model, tokenizer, source, data: str, train_set: list, settings, progress: bool = False,
                    log=print):
    """(the profile's plan, {score: {site: value}}, spectrum or None) for the selectors of `settings`."""
    from ..model.sites import find_sites
    from .profile import calibration_batches, profile_batches

    calib = calibration_batches(tokenizer, data, batches=settings.batches, batch_size=settings.batch_size,
                                max_length=settings.max_length, seed=settings.seed, examples=train_set)
    profile = profile_batches(model, source, calib, data=data, batch_size=settings.batch_size,
                              max_length=settings.max_length, settings=settings.probe_settings(), bootstrap=0,
                              progress=progress)
    ranked = profile.ranked
    scores = {c: dict(zip(ranked["site"], ranked[c].astype(float))) for c in PROBE_COLUMNS if c in ranked.columns}
    sites = find_sites(model)
    needed = {get_selector(name).score for name in settings.selectors} - {None} - set(scores)
    run_scores = {}
    for name in sorted(needed):
        if name not in run_scores:
            run_scores.update(_computed(name, model, sites, calib, settings, log))
    spectrum = None
    if profile.result.spectrum is not None:
        spectrum = dict(zip(profile.result.scores["site"], profile.result.spectrum))
    return profile.plan, scores | run_scores, spectrum


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
