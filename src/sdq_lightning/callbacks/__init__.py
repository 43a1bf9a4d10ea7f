"""Lightning callbacks: ``SDQ`` (the one-line plugin) and the parts it composes."""

from sdq_lightning.callbacks.guard import DivergenceError, DivergenceGuard
from sdq_lightning.callbacks.losses import AddedLosses
from sdq_lightning.callbacks.schedule import resolve_schedule
from sdq_lightning.callbacks.sdq import SDQ, Phase
from sdq_lightning.callbacks.search import BitSearch

__all__ = ["SDQ", "AddedLosses", "BitSearch", "DivergenceError", "DivergenceGuard", "Phase", "resolve_schedule"]
