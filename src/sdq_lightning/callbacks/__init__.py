"""Lightning callbacks: ``SDQ`` (the one-line plugin) and the divergence guard. The Lightning-free parts they drive
live in :mod:`sdq_lightning.core`."""

from sdq_lightning.callbacks.guard import DivergenceError, DivergenceGuard
from sdq_lightning.callbacks.sdq import SDQ, Phase

__all__ = ["SDQ", "DivergenceError", "DivergenceGuard", "Phase"]
