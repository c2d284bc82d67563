"""placement: find where a parameter-efficient adapter should go in a causal LM, and prove it.

The flow is profile -> plan -> train -> report, one subpackage per stage: `model`, `data`, `families`, `probe`,
`plan`, `train`, `study`, `report`. In Python: `placement.apply(model, plan)` puts a plan's LoRA on a model, and
`placement.callbacks.PlacementCallback` profiles inside a transformers Trainer.
"""
__version__ = "0.1.0"

# The public API, as PEFT names its own: everything else is reached by its real path (placement.study.compare, ...).
# Each name is imported when first used, so `import placement` stays cheap (no torch, no transformers).
__all__ = ["apply", "load", "profile", "recommend", "Plan", "PlacementCallback", "register_score", "register_family",
           "__version__"]
_LAZY = {"Plan": ("placement.plan.plan", "Plan"), "PlacementCallback": ("placement.study.callback", "PlacementCallback")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'placement' has no attribute {name!r}")


def load(model="smollm2-135m", **kwargs):
    """(model, tokenizer, source) for a hub id, a local folder, a .gguf file or the embedded alias; see
    `placement.model.load.load`."""
    from .model.load import load as _load
    return _load(model, **kwargs)


def profile(model, tokenizer, source, data, **kwargs):
    """Probe every site on calibration batches of `data` and rank them: a `Profile` whose `.plan` is the placement
    plan; see `placement.study.profile.run_profile` (and `write_profile` for its files)."""
    from .study.profile import run_profile
    return run_profile(model, tokenizer, source, data, **kwargs)


def apply(model, plan, **kwargs):
    """The plan's LoRA on `model` (a plan, a plan file or a profile folder); see `placement.train.apply.apply`."""
    from .train.apply import apply as _apply
    return _apply(model, plan, **kwargs)


def register_family(family):
    """Add an adapter family (a `placement.families.Family`) to the registry, as PEFT's `register_peft_method`."""
    from .families.base import register
    return register(family)


def register_score(score):
    """Add a score (a `placement.probe.registry.Score`) to every ranking, table and report; see that module."""
    from .probe.registry import register_score as _register
    return _register(score)


def recommend(model, data, budgets="1%,2.5%,5%", out="recommend", **kwargs):
    """The plan to follow at each budget, chosen by trials; see `placement.study.recommend.recommend`."""
    from .study.recommend import recommend as _recommend
    return _recommend(model, data, budgets, out, **kwargs)
