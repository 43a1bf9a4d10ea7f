"""Lightning callbacks."""

from sdq_lightning.callbacks.schedule import resolve_schedule
from sdq_lightning.callbacks.sdq import SDQ, Phase

__all__ = ["SDQ", "Phase", "resolve_schedule"]
