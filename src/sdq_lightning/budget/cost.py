"""Costs of a bit assignment, and the registry of cost metrics (``avg_bits``, ``size``, ``bitops`` built in).

Counting convention of the built-in metrics (also in the README and in every BitPlan's metadata):

* ``avg_bits``: parameter-weighted average weight bitwidth over the weights of ALL Conv2d/Linear layers,
  ``sum_l N_l b_l / sum_l N_l``; a layer kept in floating point counts at 32 bits.
* ``size`` (bytes): quantized weights at their bitwidth, ``sum_l N_l b_l / 8``, plus every other parameter
  (biases, BatchNorm, FP layers) at 32 bits. Step sizes and DBPs are not counted.
* ``bitops``: ``sum_l MACs_l * b_w,l * b_a,l`` for one sample over ALL Conv2d/Linear layers, the first conv
  (stem) and the classifier included, FP weights or activations counted at 32 bits.

A new metric is one function plus one registration (see ``docs/extending.md``)::

    @register_metric("weight_energy")
    def weight_energy(layers: Sequence[LayerCost], other_params: int) -> float | Tensor:
        return sum(lc.params * bits_or_fp(lc.w_bits) ** 2 for lc in layers)

It must accept ``w_bits`` as a tensor (the differentiable expected bits during the search) and grow with the bits
(the budget projection lowers bits until the cost fits). A metric that is linear in every layer's weight bits (as the
three built-in ones are) may say so, ``@register_metric("name", linear=True)``: the search then computes its expected
cost in one vectorised pass over the layers instead of one term per layer (a few kernels per step on a GPU instead
of a few hundred).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from sdq_lightning.registry import Registry, RegistryNames

__all__ = ["CONVENTION", "FP_BITS", "METRICS", "Budget", "LayerCost", "MetricFn", "bits_or_fp", "cost_of",
           "get_metric", "is_linear", "register_metric", "unregister_metric"]

FP_BITS = 32
CONVENTION = ("avg_bits: param-weighted over all conv/linear weights (FP=32); size: quantized weights at b bits + "
              "other params at 32 bits, in bytes; bitops: per-sample MACs*b_w*b_a over all conv/linear incl. "
              "stem and classifier (FP=32)")


@dataclass
class LayerCost:
    """What the cost of one layer depends on. ``w_bits`` may be a tensor (differentiable expected bits)."""

    params: int
    macs: int
    w_bits: float | Tensor | None
    a_bits: float | None


MetricFn = Callable[[Sequence[LayerCost], int], "float | Tensor"]
_METRICS: Registry[MetricFn] = Registry("metric",
                                        hint=" (register a new one with sdq_lightning.budget.register_metric)")
_LINEAR: set[str] = set()

METRICS = RegistryNames(_METRICS)
"""Names of the registered cost metrics (live: a metric registered later appears here)."""


def register_metric(name: str, *, replace: bool = False, linear: bool = False) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering ``fn(layers, other_params) -> cost`` under ``name`` (usable in ``Budget``, the SDQ
    callback's ``budget``, ``BitPlan.cost`` and the app's ``hardware.metric``). ``replace=True`` overrides an existing
    metric of that name; otherwise a second registration raises ``ValueError``. ``linear=True``: the cost is
    ``c_0 + sum_l c_l * w_bits_l`` for constants ``c`` (see the module docstring)."""
    _METRICS.check(name, replace)

    def decorate(fn: MetricFn) -> MetricFn:
        if not callable(fn):
            raise ValueError(f"register_metric({name!r}) decorates a function (layers, other_params) -> cost, "
                             f"got {type(fn).__name__}")
        _LINEAR.discard(name)
        if linear:
            _LINEAR.add(name)
        return _METRICS.add(name, fn, replace=True)

    return decorate


def unregister_metric(name: str) -> None:
    """Remove a registered metric (``ValueError`` for an unknown name)."""
    _METRICS.remove(name)
    _LINEAR.discard(name)


def is_linear(name: str) -> bool:
    """Whether the metric ``name`` was registered as linear in the layers' weight bits."""
    return name in _LINEAR


def get_metric(name: str) -> MetricFn:
    """The cost function registered under ``name``; ``ValueError`` naming the registered metrics otherwise."""
    return _METRICS.lookup(name)


def bits_or_fp(bits: float | Tensor | None) -> float | Tensor:
    """``bits``, or :data:`FP_BITS` for a layer kept in floating point (``None``)."""
    return FP_BITS if bits is None else bits


_b = bits_or_fp


@register_metric("avg_bits", linear=True)
def _avg_bits(layers: Sequence[LayerCost], other_params: int) -> float | Tensor:
    total = sum(lc.params for lc in layers)
    return sum(lc.params * _b(lc.w_bits) for lc in layers) / max(total, 1)


@register_metric("size", linear=True)
def _size(layers: Sequence[LayerCost], other_params: int) -> float | Tensor:
    return sum(lc.params * _b(lc.w_bits) for lc in layers) / 8 + other_params * 4


@register_metric("bitops", linear=True)
def _bitops(layers: Sequence[LayerCost], other_params: int) -> float | Tensor:
    return sum(lc.macs * _b(lc.w_bits) * _b(lc.a_bits) for lc in layers)


def cost_of(metric: str, layers: Iterable[LayerCost], other_params: int = 0) -> float | Tensor:
    """Cost of layers under ``metric`` (a tensor when any ``w_bits`` is a tensor, so it can be differentiated)."""
    return get_metric(metric)(list(layers), other_params)


@dataclass(frozen=True)
class Budget:
    """A hardware budget: ``metric`` (a registered metric: ``avg_bits | size | bitops`` or your own) and its
    ``target`` (never exceeded)."""

    metric: str = "avg_bits"
    target: float = 2.0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"budget metric must be one of {tuple(METRICS)}, got {self.metric!r}")
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
