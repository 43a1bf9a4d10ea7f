"""Costs of a bit assignment: average bits, size and BitOPs.

Counting convention (also in the README and in every BitPlan's metadata):

* ``avg_bits``: parameter-weighted average weight bitwidth over the weights of ALL Conv2d/Linear layers,
  ``sum_l N_l b_l / sum_l N_l``; a layer kept in floating point counts at 32 bits.
* ``size`` (bytes): quantized weights at their bitwidth, ``sum_l N_l b_l / 8``, plus every other parameter
  (biases, BatchNorm, FP layers) at 32 bits. Step sizes and DBPs are not counted.
* ``bitops``: ``sum_l MACs_l * b_w,l * b_a,l`` for one sample over ALL Conv2d/Linear layers, the first conv
  (stem) and the classifier included, FP weights or activations counted at 32 bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CONVENTION", "FP_BITS", "METRICS", "Budget", "LayerCost", "cost_of"]

METRICS = ("avg_bits", "size", "bitops")
FP_BITS = 32
CONVENTION = ("avg_bits: param-weighted over all conv/linear weights (FP=32); size: quantized weights at b bits + "
              "other params at 32 bits, in bytes; bitops: per-sample MACs*b_w*b_a over all conv/linear incl. "
              "stem and classifier (FP=32)")


@dataclass(frozen=True)
class Budget:
    """A hardware budget: ``metric`` in ``avg_bits | size | bitops`` and its ``target`` (never exceeded)."""

    metric: str = "avg_bits"
    target: float = 2.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"budget metric must be one of {METRICS}, got {self.metric!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not self.target > 0:
            raise ValueError(f"budget target must be a positive number, got {self.target!r}")

    @classmethod
    def coerce(cls, value: Budget | dict | None) -> Budget:
        if value is None:
            return cls()
        if isinstance(value, Budget):
            return value
        if hasattr(value, "items"):
            unknown = set(value) - {"metric", "target"}
            if unknown:
                raise ValueError(f"budget accepts the keys 'metric' and 'target', got unknown {sorted(unknown)}")
            return cls(**dict(value))
        raise ValueError(f"budget must be a dict like {{'metric': 'avg_bits', 'target': 2.0}}, got {value!r}")


@dataclass
class LayerCost:
    """What the cost of one layer depends on. ``w_bits`` may be a tensor (differentiable expected bits)."""

    params: int
    macs: int
    w_bits: float | Tensor | None
    a_bits: float | None


def _b(bits: float | Tensor | None) -> float | Tensor:
    return FP_BITS if bits is None else bits


def cost_of(metric: str, layers: Iterable[LayerCost], other_params: int = 0) -> float | Tensor:
    """Cost of layers under ``metric`` (a tensor when any ``w_bits`` is a tensor, so it can be differentiated)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    layers = list(layers)
    if metric == "avg_bits":
        total = sum(lc.params for lc in layers)
        return sum(lc.params * _b(lc.w_bits) for lc in layers) / max(total, 1)
    if metric == "size":
        return sum(lc.params * _b(lc.w_bits) for lc in layers) / 8 + other_params * 4
    return sum(lc.macs * _b(lc.w_bits) * _b(lc.a_bits) for lc in layers)


def as_float(x: float | Tensor) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
