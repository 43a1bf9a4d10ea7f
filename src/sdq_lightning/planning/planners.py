"""Plans of a :class:`~sdq_lightning.planning.problem.PlanProblem` under a budget, never above it.

* :func:`exact_plan`: the plan of least summed sensitivity under the budget, solved exactly as an integer program
  (one binary per layer and candidate; scipy's HiGHS with a zero optimality gap). With HAWQ sensitivities this is
  HAWQ-V3's ILP; with the oracle's it is the oracle plan.
* :func:`random_plan`: a plan drawn uniformly from all plans whose cost lies within ``band`` (1 %) under the
  target: "size-neutral", no ranking of any kind (counted and sampled exactly by a dynamic programme over a fine
  cost grid, then checked on the exact cost).
* :func:`size_greedy_plan`: the greedy projection from the top candidates ranking drops by a per-level slope divided
  by the cost saved, so the largest layers fall first (equal slopes, or seeded random ones).
* :func:`uniform_plan`: every searched layer at the same width (the highest that fits, or the one asked for).
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping

import numpy as np

from sdq_lightning.budget import Budget, project_to_budget
from sdq_lightning.planning.problem import PlanProblem

__all__ = ["PLANNERS", "exact_plan", "random_plan", "size_greedy_plan", "uniform_plan"]

PLANNERS = ("exact", "random", "size_greedy", "uniform")


def _check_sensitivity(problem: PlanProblem, sensitivity: Mapping[str, Mapping[int, float]]) -> None:
    missing = [n for n in problem.names if n not in sensitivity]
    if missing:
        raise ValueError(f"the sensitivities do not cover the searched layers {missing[:5]} (measured for another "
                         "model or first/last policy?)")
    for n in problem.names:
        lacking = [b for b in problem.candidates[n] if b not in sensitivity[n]]
        if lacking:
            raise ValueError(f"the sensitivities of {n!r} lack the candidate bits {lacking}; measure every candidate "
                             f"{list(problem.candidates[n])}")


def exact_plan(problem: PlanProblem, sensitivity: Mapping[str, Mapping[int, float]], budget: Budget) -> dict[str, int]:
    """The plan minimising ``sum_l sensitivity[l][b_l]`` with cost <= ``budget.target`` (exact; ``ValueError`` when
    even the lowest candidates exceed the budget or the metric is not linear)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    problem.check_budget(budget)
    _check_sensitivity(problem, sensitivity)
    c0, coef = problem.linear_costs(budget.metric)
    index = [(n, b) for n in problem.names for b in problem.candidates[n]]
    sens = np.array([float(sensitivity[n][b]) for n, b in index])
    scale = max(float(np.abs(sens).max()), 1e-30)
    cost = np.array([coef[n] * b for n, b in index])
    room = budget.target - c0
    one_each = np.zeros((len(problem.names), len(index)))
    for j, (n, _) in enumerate(index):
        one_each[problem.names.index(n), j] = 1.0
    slack = 0.0
    for _ in range(8):  # tighten the right-hand side if float rounding let the solution exceed the target
        res = milp(sens / scale, integrality=np.ones(len(index)), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1),
                                LinearConstraint(cost[None, :] / room, -np.inf, 1.0 - slack)],
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise ValueError(f"the integer program found no plan under {budget.metric} <= {budget.target:g} "
                             f"({res.message})")
        bits = {n: b for (n, b), x in zip(index, res.x) if x > 0.5}
        if problem.cost(bits, budget.metric) <= budget.target:
            return bits
        slack = slack * 2 if slack else 1e-9
    raise ValueError("the integer program's plan stayed above the target after tightening (numerical trouble)")


def random_plan(problem: PlanProblem, budget: Budget, seed: int = 0, band: float = 0.01,
                grid: int = 100_000) -> dict[str, int]:
    """A plan drawn uniformly from the plans whose cost is in ``[(1 - band) * target, target]``.

    Costs are counted on a grid of ``grid`` cells over the room the searched layers have; every layer's cost is
    rounded to the grid, so the counted band is widened by the worst rounding and each draw is checked on its exact
    cost (rejected and drawn again when outside): the accepted plans are uniform over the exact band."""
    problem.check_budget(budget)
    if not 0 < band < 1:
        raise ValueError(f"band must be in (0, 1), got {band!r}")
    c0, coef = problem.linear_costs(budget.metric)
    names = problem.names
    room = budget.target - c0
    unit = room / grid
    costs = [[int(round(coef[n] * b / unit)) for b in problem.candidates[n]] for n in names]
    widen = len(names)  # each layer's rounding is at most half a cell
    lo_cell = max(int(np.floor((budget.target * (1 - band) - c0) / unit)) - widen, 0)
    hi_cell = min(int(np.ceil(room / unit)) + widen, grid + widen)
    size = hi_cell + 1
    # ways[l][c]: the number of plans of layers l.. whose grid cost is exactly c (float64 holds 8^20 well)
    ways = [np.zeros(size) for _ in range(len(names) + 1)]
    ways[-1][0] = 1.0
    for i in range(len(names) - 1, -1, -1):
        nxt, cur = ways[i + 1], ways[i]
        for k in costs[i]:
            if k < size:
                cur[k:] += nxt[: size - k]
    prefix = [np.concatenate([[0.0], np.cumsum(w)]) for w in ways]

    def count(level: int, lo: int, hi: int) -> float:
        lo, hi = max(lo, 0), min(hi, size - 1)
        return 0.0 if hi < lo else float(prefix[level][hi + 1] - prefix[level][lo])

    if count(0, lo_cell, hi_cell) == 0:
        raise ValueError(f"no plan costs within {band:.0%} under {budget.metric} <= {budget.target:g}; "
                         "use a wider band or another target")
    rng = _random.Random(seed)
    lower = budget.target * (1 - band)
    for _ in range(1000):
        bits, lo, hi = {}, lo_cell, hi_cell
        for i, n in enumerate(names):
            weights = [count(i + 1, lo - k, hi - k) for k in costs[i]]
            j = rng.choices(range(len(weights)), weights=weights)[0]
            bits[n] = problem.candidates[n][j]
            lo, hi = lo - costs[i][j], hi - costs[i][j]
        exact = problem.cost(bits, budget.metric)
        if lower <= exact <= budget.target:
            return bits
    raise ValueError("random_plan: 1000 draws fell outside the band on their exact cost (grid too coarse?)")


def size_greedy_plan(problem: PlanProblem, budget: Budget, seed: int | None = None) -> dict[str, int]:
    """From the top candidates, drop the layer whose one-level drop costs the least slope per unit of cost saved
    (so the largest layers first), then fill back up (:func:`~sdq_lightning.budget.project_to_budget`). ``seed``
    ``None``: every layer's slope is 1; an int: seeded random slopes in [0, 1) (what the search's control of this
    name draws)."""
    problem.check_budget(budget)
    rng = _random.Random(seed) if seed is not None else None
    sens = {}
    for n in problem.names:
        slope = rng.random() if rng is not None else 1.0
        sens[n] = {b: -slope * i for i, b in enumerate(problem.candidates[n])}
    bits = project_to_budget(problem.cost_model, problem.full_bits(problem.top_bits()), budget, sens)
    return {n: int(bits[n]) for n in problem.names}


def uniform_plan(problem: PlanProblem, budget: Budget, bits: int | None = None) -> dict[str, int]:
    """Every searched layer at ``bits`` (any cost), or at the highest common candidate whose plan fits the budget."""
    common = sorted(set.intersection(*(set(problem.candidates[n]) for n in problem.names)))
    if bits is not None:
        if bits not in common:
            raise ValueError(f"uniform bits {bits} is not a candidate of every searched layer {common}")
        return {n: bits for n in problem.names}
    fitting = [b for b in common if problem.cost({n: b for n in problem.names}, budget.metric) <= budget.target]
    if not fitting:
        raise ValueError(f"no uniform width among {common} fits {budget.metric} <= {budget.target:g}")
    return {n: fitting[-1] for n in problem.names}
