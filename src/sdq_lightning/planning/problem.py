"""The planning problem of a model: which layers a plan decides, their candidate bitwidths, and what a plan costs.

A :class:`PlanProblem` is built from a floating-point model with the same layer selection and first/last policy as
the SDQ callback (:class:`~sdq_lightning.surgery.QuantSpec`), on a quantized copy, so plans made here apply to the
callback (``SDQ(plan=...)``) and to the app (``phase=train phase.plan=...``) unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sdq_lightning.budget import BitPlan, Budget, CostModel, profile_model
from sdq_lightning.budget.cost import is_linear
from sdq_lightning.budget.profile import LayerProfile
from sdq_lightning.surgery import QuantSpec, quantize_model

__all__ = ["PlanProblem"]


@dataclass
class PlanProblem:
    """The searched layers of a model (execution order), their candidates, the fixed layers and the cost model."""

    model: nn.Module | None
    profile: dict[str, LayerProfile]
    cost_model: CostModel
    names: list[str]
    candidates: dict[str, tuple[int, ...]]
    spec: QuantSpec | None  # None: built from a cost model (no plan files)

    @classmethod
    def from_model(cls, model: nn.Module, example_input: Tensor, weight_bits: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
                   activation_bits: int | None = None, first_last: str = "8bit") -> PlanProblem:
        """The problem of ``model`` (left unchanged: a quantized copy is made). ``example_input``: one batch (size 1
        is enough) for the layer profile (MACs)."""
        spec = QuantSpec(weight_bits=tuple(weight_bits), activation_bits=activation_bits, first_last=first_last)
        quantized = copy.deepcopy(model).cpu()
        quantize_model(quantized, spec)
        return cls._build(quantized, example_input.cpu(), spec)

    @classmethod
    def of_cost_model(cls, cost_model: CostModel) -> PlanProblem:
        """The problem over an existing (quantized) model's cost model, e.g. the search's own at the freeze."""
        names = cost_model.searchable()
        cands = {n: tuple(cost_model.quantizer(n).candidates) for n in names}
        return cls(None, {}, cost_model, names, cands, None)  # enough for costs and the planners, not plan()

    @classmethod
    def _build(cls, quantized: nn.Module, example_input: Tensor, spec: QuantSpec) -> PlanProblem:
        quantized.eval()
        profile = profile_model(quantized, example_input[:1])
        cost_model = CostModel(quantized, profile)
        names = cost_model.searchable()
        if not names:
            raise ValueError("the model has no layer with several candidate bitwidths to plan (check weight_bits and "
                             "the first/last policy)")
        cands = {n: tuple(cost_model.quantizer(n).candidates) for n in names}
        return cls(quantized, profile, cost_model, names, cands, spec)

    # ------------------------------------------------------------------ costs
    def full_bits(self, bits: Mapping[str, int]) -> dict[str, int | None]:
        """Every profiled layer's bits: the searched ones from ``bits``, the fixed ones at their own."""
        missing = [n for n in self.names if n not in bits]
        if missing:
            raise ValueError(f"the plan leaves searched layers without bits: {missing[:5]}")
        out = self.cost_model.current_bits()
        for n in self.names:
            if bits[n] not in self.candidates[n]:
                raise ValueError(f"{bits[n]} bits for {n!r} is not among its candidates {self.candidates[n]}")
            out[n] = int(bits[n])
        return out

    def cost(self, bits: Mapping[str, int], metric: str) -> float:
        """The cost of a plan of the searched layers under ``metric`` (fixed layers included)."""
        return self.cost_model.of_bits(self.full_bits(bits), metric)

    def linear_costs(self, metric: str) -> tuple[float, dict[str, float]]:
        """``(c0, coef)`` with ``cost(bits) = c0 + sum_l coef[l] * bits[l]`` (``ValueError`` for a non-linear
        metric)."""
        if not is_linear(metric):
            raise ValueError(f"metric {metric!r} is not registered as linear in the weight bits; the planners need a "
                             "linear metric (avg_bits, size, bitops, or one registered with linear=True)")
        return self.cost_model.linear_coefficients(self.names, metric)

    def check_budget(self, budget: Budget) -> None:
        """``ValueError`` when even the lowest candidates exceed the budget."""
        self.cost_model.check_feasible(budget)

    def top_bits(self) -> dict[str, int]:
        return {n: self.candidates[n][-1] for n in self.names}

    # ------------------------------------------------------------------ plans
    def plan(self, bits: Mapping[str, int], **metadata: Any) -> BitPlan:
        """A :class:`BitPlan` of every layer (fixed layers at their bits), with ``metadata`` recorded."""
        full = self.full_bits(bits)
        base = BitPlan.from_model(self.model, profile=self.profile,
                                  candidates=list(self.spec.weight_bits), first_last=self.spec.first_last, **metadata)
        return base.with_bits({n: b for n, b in full.items() if n in base.layers})
