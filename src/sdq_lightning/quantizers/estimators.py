"""Bitwidth estimators of the SDQ weight quantizer: how a training forward turns the DBPs and the step's uniforms into
a hard choice (the bitwidth used) and a soft, differentiable stand-in for it (what the DBP gradient goes through).

An estimator is a pair of functions, one per DBP reading (see :class:`~sdq_lightning.quantizers.SDQWeightQuantizer`):

* ``progressive(beta, mixed, u, temperature) -> (hard, soft)``: ``beta`` the live DBP (the probability of the higher
  of the two bitwidths), ``mixed`` = ``eps + (1 - 2 eps) beta`` (nonzero gradient at beta = 0 and 1), ``u`` one
  uniform in (0, 1), ``temperature`` a 0-dim tensor. ``hard``: 1.0 to take the higher bitwidth, else 0.0 (it must be
  1 with probability ``beta``); ``soft``: a differentiable function of ``beta``/``mixed`` in [0, 1]. The quantizer
  uses ``hard + soft - soft.detach()`` as the mask between the two quantized weights.
* ``cascade(p, p_mixed, u, temperature) -> (index, soft)``: ``p`` the probability of each candidate, ``p_mixed`` the
  same from the mixed DBPs, ``u`` one uniform per candidate. ``index``: a 0-dim long tensor (the candidate used,
  drawn from ``p``); ``soft``: a differentiable vector over the candidates.

Everything stays on the device (no ``.item()``, no Python branch on a value): the training step must not wait for the
GPU. Built in: ``gumbel`` (Gumbel-softmax relaxation, the paper's choice) and ``ste`` (hard sample, straight-through
to the probability). Add one with :func:`register_estimator`; its name then works for ``SDQ(search={"estimator": ...})``,
``QuantSpec(estimator=...)`` and the app's ``sdq.search.estimator=...`` (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sdq_lightning.registry import Registry

__all__ = ["Estimator", "estimator_index", "estimator_names", "get_estimator", "register_estimator",
           "unregister_estimator"]

Progressive = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
Cascade = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Estimator:
    name: str
    progressive: Progressive
    cascade: Cascade | None = None
    vectorized: bool = False  # progressive() is elementwise: takes [layers] vectors as well as 0-dim tensors


_REGISTRY: Registry[Estimator] = Registry("estimator", hint=" (register_estimator adds one)")
_ORDER: list[str] = []  # every name ever registered: a quantizer's saved state records its estimator by this index


def register_estimator(name: str, progressive: Progressive, cascade: Cascade | None = None,
                       replace: bool = False, vectorized: bool = False) -> Estimator:
    """Register an estimator under ``name`` (``cascade`` may be None: then only the progressive reading takes it).
    ``vectorized=True`` declares ``progressive`` elementwise (every operation broadcasts, no reduction), so it may be
    called once with one entry per layer: its layers then join the batched weight pass
    (:mod:`sdq_lightning.modules.batched`); otherwise they keep their own per-layer forward."""
    _REGISTRY.check(name, replace)
    if not callable(progressive) or (cascade is not None and not callable(cascade)):
        raise ValueError(f"estimator {name!r}: progressive (and cascade, if given) must be functions")
    est = _REGISTRY.add(name, Estimator(name, progressive, cascade, bool(vectorized)), replace=True)
    if name not in _ORDER:
        _ORDER.append(name)
    return est


def unregister_estimator(name: str) -> None:
    """Remove a registered estimator (the built-in ones stay)."""
    if name in ("gumbel", "ste"):
        raise ValueError(f"{name!r} is built in and cannot be unregistered")
    _REGISTRY.remove(name)


def estimator_names() -> tuple[str, ...]:
    return tuple(n for n in _ORDER if n in _REGISTRY)


def get_estimator(name: str, reading: str = "progressive") -> Estimator:
    """The estimator ``name``; raises a one-line ``ValueError`` naming the allowed ones."""
    est = _REGISTRY.lookup(name)
    if reading == "cascade" and est.cascade is None:
        with_cascade = tuple(n for n in estimator_names() if _REGISTRY[n].cascade is not None)
        raise ValueError(f"estimator {name!r} has no cascade form; with reading='cascade' use one of {with_cascade}")
    return est


def estimator_index(name: str) -> int:
    """The estimator's index in registration order (saved in a quantizer's extra state)."""
    return _ORDER.index(name)


def estimator_name(index: int) -> str:
    """The name saved as ``index``, or ``"unregistered-<index>"`` when this process has not registered it."""
    return _ORDER[index] if 0 <= index < len(_ORDER) else f"unregistered-{index}"


# ----------------------------------------------------------------------------- built in
def _logit(x: Tensor) -> Tensor:
    return torch.log(x) - torch.log1p(-x)


def _gumbel_progressive(beta: Tensor, mixed: Tensor, u: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    # hard: logit(beta) + logit(u) > 0, i.e. u > 1 - beta (probability beta); soft: the same noise on the mixed b,
    # so that beta = 1 still has a gradient
    hard = (u > 1.0 - beta.detach()).to(beta.dtype)
    soft = torch.sigmoid((_logit(mixed) + _logit(u)) / temperature.to(beta.dtype))
    return hard, soft


def _ste_progressive(beta: Tensor, mixed: Tensor, u: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    return (u < beta.detach()).to(beta.dtype), beta


def _gumbel_cascade(p: Tensor, p_mixed: Tensor, u: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    gumbel = -torch.log(-torch.log(u))
    index = (torch.log(p.detach().clamp_min(1e-30)) + gumbel).argmax()
    soft = torch.softmax((torch.log(p_mixed) + gumbel) / temperature.to(p.dtype), dim=0)
    return index, soft


def _ste_cascade(p: Tensor, p_mixed: Tensor, u: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    cdf = torch.cumsum(p.detach(), 0)
    index = (cdf < u[0] * cdf[-1]).sum().clamp_max(p.shape[0] - 1)
    return index, p_mixed


register_estimator("gumbel", _gumbel_progressive, _gumbel_cascade, vectorized=True)
register_estimator("ste", _ste_progressive, _ste_cascade, vectorized=True)
