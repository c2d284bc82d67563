"""`placement.callbacks.PlacementCallback`: profile the model at the start of a transformers Trainer run."""
from .study.callback import PlacementCallback, to_batch

__all__ = ["PlacementCallback", "to_batch"]
