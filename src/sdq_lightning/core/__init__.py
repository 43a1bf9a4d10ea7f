"""The search and training parts of SDQ that need no Lightning: a plain PyTorch loop can drive them.

- :class:`BitSearch`: the DBP search (task and budget signals, the dual multiplier, settling, the plan at the freeze);
- :func:`freeze_searched`: freezes the searched layers at the phase boundary;
- :func:`resolve_schedule`: the temperature schedules;
- :class:`AddedLosses`: the losses SDQ adds to the task loss (EBR, knowledge distillation);
- :func:`load_teacher`: the KD teacher from a file, a class path or a factory;
- :func:`quantizer_params`: the DBPs and step sizes, which the search and its step-size optimizer own;
- :class:`LogStepAdam`: the step sizes' optimizer (Adam on their logarithm).

:class:`~sdq_lightning.SDQ` is the Lightning callback over these parts; the README's "Plain PyTorch" section
runs the search in a plain loop.
"""

from sdq_lightning.core.freeze import freeze_searched
from sdq_lightning.core.losses import AddedLosses
from sdq_lightning.core.params import quantizer_params, take_from_optimizers
from sdq_lightning.core.schedule import resolve_schedule
from sdq_lightning.core.search import BitSearch
from sdq_lightning.core.teacher import load_teacher
from sdq_lightning.quantizers.optim import LogStepAdam

__all__ = ["AddedLosses", "BitSearch", "LogStepAdam", "freeze_searched", "load_teacher", "quantizer_params",
           "resolve_schedule", "take_from_optimizers"]
