"""Schedules given as a value, a ``(start, end)`` pair (annealed geometrically over the search) or a function."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["Schedule", "resolve_schedule"]

Schedule = float | tuple[float, float] | list[float] | Callable[[float], float]


def resolve_schedule(value: Schedule, name: str = "temperature") -> Callable[[float, float], float]:
    """Return ``f(epoch, total_epochs)``. ``epoch`` may be fractional (progress through the search phase).

    * a number: constant;
    * ``(start, end)``: geometric annealing from ``start`` at epoch 0 to ``end`` at ``total_epochs``;
    * a callable: ``value(epoch)``.
    """
    if callable(value):
        return lambda epoch, total: float(value(epoch))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
        return lambda epoch, total: float(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        start, end = float(value[0]), float(value[1])

        def anneal(epoch: float, total: float) -> float:
            t = min(max(epoch / max(total, 1e-9), 0.0), 1.0)
            return math.exp(math.log(start) + t * (math.log(end) - math.log(start)))

        return anneal
    raise ValueError(f"{name} must be a positive number, a (start, end) pair of positive numbers or a function of "
                     f"the epoch, got {value!r}")
