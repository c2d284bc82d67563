"""Stage `train`: train an adapter on a plan (checkpoints, resume), and evaluate held-out loss and exact match."""
from .trainer import *  # noqa: F401,F403
from .trainer import _schedule  # noqa: F401  (benchmarks build the trainer's schedule)
