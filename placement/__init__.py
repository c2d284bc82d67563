"""placement: find where a parameter-efficient adapter should go in a causal LM, and prove it.

The flow is profile -> plan -> train -> report, one subpackage per stage: `model`, `data`, `families`, `probe`,
`plan`, `train`, `study`, `report`. In Python: `placement.apply(model, plan)` puts a plan's LoRA on a model, and
`placement.callbacks.PlacementCallback` profiles inside a transformers Trainer.
"""
__version__ = "0.1.0"


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
