"""Differentiable expected cost of a model under search, the budget penalty, and the projection of a frozen plan
onto the budget (never above the target, filled back up as close to it as the candidates allow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdq_lightning.budget.cost import Budget, LayerCost, cost_of, is_linear
from sdq_lightning.budget.profile import LayerProfile, held_bits, other_params
from sdq_lightning.quantizers.sdq import stackable, stacked_expected_bits, structure_key
from sdq_lightning.surgery import quant_layers

__all__ = ["PENALTIES", "CostModel", "budget_penalty", "project_to_budget", "quantization_mse"]

PENALTIES = ("hinge", "squared_hinge")


@dataclass
class _Entry:
    name: str
    params: int
    macs: int
    layer: nn.Module | None


class CostModel:
    """Costs of a (partly) quantized model from its profile: expected (differentiable) or of given bits."""

    def __init__(self, model: nn.Module, profile: Mapping[str, LayerProfile]) -> None:
        q = quant_layers(model)
        self.entries = [_Entry(n, p.params, p.macs, q.get(n)) for n, p in profile.items()]
        self.other_params = other_params(model, profile)
        self._linear_cache: tuple | None = None  # (key, terms) of the vectorised expected cost (_expected_linear)

    def searchable(self) -> list[str]:
        return [e.name for e in self.entries
                if e.layer is not None and e.layer.weight_quant is not None and len(e.layer.weight_quant.candidates) > 1]

    def expected(self, metric: str) -> Tensor:
        """E[cost] under the DBPs (differentiable w.r.t. them). For a linear metric over progressive searched layers
        with one candidate count (the usual case) in one vectorised pass (:meth:`_expected_linear`)."""
        fast = self._expected_linear(metric)
        if fast is not None:
            return fast
        costs = []
        for e in self.entries:
            wq = None if e.layer is None else e.layer.weight_quant
            bits = None if wq is None else wq.expected_bits()
            costs.append(LayerCost(e.params, e.macs, bits, held_bits(e.layer)[1]))
        out = cost_of(metric, costs, self.other_params)
        return out if isinstance(out, Tensor) else torch.tensor(float(out))

    def _linear_key(self) -> tuple:
        return structure_key(e.layer for e in self.entries if e.layer is not None), \
            tuple(held_bits(e.layer)[1] for e in self.entries)

    def _expected_linear(self, metric: str) -> Tensor | None:
        """``c_0 + sum_l c_l E[bits_l]`` over the searched layers, stacked: equal to the per-layer sum up to float
        rounding. None when the metric is not linear, a searched layer reads its DBPs as a cascade, or the searched
        layers' candidate counts differ. The coefficients (host arithmetic on the metric itself) are cached per
        quantizer state."""
        if not is_linear(metric):
            return None
        key = (metric, self._linear_key())
        cache = self._linear_cache
        if cache is None or cache[0] != key:
            cache = self._linear_cache = (key, self._linear_terms(metric))
        terms = cache[1]
        if terms is None:
            return None
        c0, coef, table, qs = terms
        return c0 + (coef * stacked_expected_bits(qs, table)).sum()

    def _linear_terms(self, metric: str):
        searched = [(e.name, e.layer.weight_quant) for e in self.entries
                    if e.layer is not None and e.layer.weight_quant is not None and not e.layer.weight_quant.frozen]
        names, qs = [n for n, _ in searched], [q for _, q in searched]
        if not stackable(qs):
            return None
        base, coef = self.linear_coefficients(names, metric)
        dev = qs[0].dbp.device
        table = torch.stack([q.bits_table for q in qs]).to(device=dev, dtype=qs[0].dbp.dtype)
        return base, torch.tensor([coef[n] for n in names], device=dev, dtype=table.dtype), table, qs

    def linear_coefficients(self, names: Sequence[str], metric: str) -> tuple[float, dict[str, float]]:
        """``(c0, coef)`` with cost ``c0 + sum_l coef[l] * bits[l]`` over the layers ``names`` (a linear metric), every
        other layer at its current bits; the bits of ``names`` are not read (a searching quantizer's read syncs)."""
        zero = {e.name: 0 if e.name in names else held_bits(e.layer)[0] for e in self.entries}
        c0 = self.of_bits(zero, metric)
        return c0, {n: self.of_bits({**zero, n: 1}, metric) - c0 for n in names}

    def current_bits(self) -> dict[str, int | None]:
        return {e.name: held_bits(e.layer)[0] for e in self.entries}

    def of_bits(self, bits: Mapping[str, int | None], metric: str) -> float:
        costs = [LayerCost(e.params, e.macs, bits.get(e.name), held_bits(e.layer)[1]) for e in self.entries]
        return float(cost_of(metric, costs, self.other_params))

    def lowest_bits(self) -> dict[str, int | None]:
        bits = self.current_bits()
        for n in self.searchable():
            bits[n] = self.quantizer(n).candidates[0]
        return bits

    def quantizer(self, name: str):
        """The weight quantizer of the searchable layer ``name``."""
        return next(e.layer.weight_quant for e in self.entries if e.name == name)

    def check_feasible(self, budget: Budget) -> float:
        """Raise ``ValueError`` if even the lowest candidates exceed the target. Returns the minimum cost."""
        low = self.of_bits(self.lowest_bits(), budget.metric)
        if low > budget.target * (1 + 1e-9):
            raise ValueError(f"budget target {budget.target:g} ({budget.metric}) is below what the candidates and "
                             f"fixed layers allow: the minimum is {low:.6g}")
        return low


def budget_penalty(expected: Tensor, budget: Budget, kind: str = "squared_hinge") -> Tensor:
    """``R(E[cost])``: hinge ``relu(E/target - 1)`` or its square; zero at or under the target."""
    if kind not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {kind!r}")
    excess = torch.relu(expected / budget.target - 1.0)
    return excess if kind == "hinge" else excess**2 + excess * 1e-2


@torch.no_grad()
def quantization_mse(layer: nn.Module) -> dict[int, float]:
    """Sum of squared weight error ``||Q_b(w) - w||^2`` for each candidate of a layer (its sensitivity proxy)."""
    wq, w = layer.weight_quant, layer.weight.detach()
    return {b: float(((wq.quantize_at(w, i) - w) ** 2).sum()) for i, b in enumerate(wq.candidates)}


def project_to_budget(cost_model: CostModel, bits: Mapping[str, int | None], budget: Budget,
                      sensitivity: Mapping[str, Mapping[int, float]] | None = None,
                      max_raise_levels: int | None = None) -> dict[str, int | None]:
    """Greedy projection of a frozen plan onto the budget.

    Above the target: repeatedly lower the searchable layer with the smallest sensitivity increase per unit of cost
    saved; once a single one-level drop reaches the target, among those that free the least room (within 10 %) the
    one with the smallest sensitivity increase (so a small excess costs a small layer one level, not a large layer
    whose freed room the fill then spreads over many others). Then fill: repeatedly raise the layer with the
    largest sensitivity decrease per unit of cost added while the cost stays within the target. ``sensitivity[name][bits]`` defaults to :func:`quantization_mse`.
    The result's cost is <= target, and no single one-level raise fits under it. ``max_raise_levels``: the fill
    first raises layers at most this many levels above ``bits`` (the search's freeze uses 1, spreading the room
    over layers as a correction rather than a re-plan), then, if more than 1 % of the target is still unused,
    fills it without the cap (then the "no single raise fits" guarantee holds; under 1 % it may not).
    """
    cost_model.check_feasible(budget)
    bits = dict(bits)
    names = cost_model.searchable()
    if sensitivity is None:
        layers = {e.name: e.layer for e in cost_model.entries}
        sensitivity = {n: quantization_mse(layers[n]) for n in names}
    cands = {n: cost_model.quantizer(n).candidates for n in names}
    metric, target = budget.metric, budget.target * (1 + 1e-12)

    def moved(n: str, step: int) -> int | None:
        i = cands[n].index(bits[n]) + step
        return cands[n][i] if 0 <= i < len(cands[n]) else None

    start = dict(bits)
    cost = cost_model.of_bits(bits, metric)
    while cost > target:
        best, best_score, enough = None, None, []
        for n in names:
            lo = moved(n, -1)
            if lo is None:
                continue
            new_cost = cost_model.of_bits({**bits, n: lo}, metric)
            increase = sensitivity[n][lo] - sensitivity[n][bits[n]]
            score = increase / max(cost - new_cost, 1e-12)
            if best_score is None or score < best_score:
                best, best_score = (n, lo), score
            if new_cost <= target:
                enough.append((cost - new_cost, increase, n, lo))
        if enough:
            # the last drop: among the single drops that reach the target and free the least room (within 10 %),
            # the one that costs the least loss, so that the fill has little room to spread over other layers
            least = min(e[0] for e in enough)
            _, _, n, lo = min((e for e in enough if e[0] <= 1.1 * least), key=lambda e: e[1])
            best = (n, lo)
        bits[best[0]] = best[1]
        cost = cost_model.of_bits(bits, metric)
    capped = max_raise_levels is not None
    while True:
        best, best_score = None, None
        for n in names:
            hi = moved(n, +1)
            if hi is None:
                continue
            if capped and start[n] is not None and cands[n].index(hi) - cands[n].index(start[n]) > max_raise_levels:
                continue
            new_cost = cost_model.of_bits({**bits, n: hi}, metric)
            if new_cost > target:
                continue
            score = (sensitivity[n][bits[n]] - sensitivity[n][hi]) / max(new_cost - cost, 1e-12)
            if best_score is None or score > best_score:
                best, best_score = (n, hi), score
        if best is None:
            # the capped pass is done: fill the room left without the cap only when it is more than 1 % of the
            # target (a small room is not worth raising a layer several levels above the plan)
            if capped and target - cost > 0.01 * target:
                capped = False
                continue
            return bits
        bits[best[0]] = best[1]
        cost = cost_model.of_bits(bits, metric)
