"""Bit plans without a search: per-layer sensitivities (oracle, HAWQ, a search's own), exact and control planners.

Lightning-free. ``sdq-plan`` (:mod:`sdq_lightning.cli.plan`) is its command line::

    from sdq_lightning.planning import PlanProblem, hawq, exact_plan
    problem = PlanProblem.from_model(model, example_input, weight_bits=range(1, 9))
    sens = hawq(model, batches, problem.names, bits=range(1, 9))
    plan = problem.plan(exact_plan(problem, sens.values, Budget("avg_bits", 2.0)), method="hawq")
    plan.save("plan.yaml")        # SDQ(plan="plan.yaml") or sdq-train phase=train phase.plan=plan.yaml
"""

from sdq_lightning.planning.planners import PLANNERS, exact_plan, random_plan, size_greedy_plan, uniform_plan
from sdq_lightning.planning.problem import PlanProblem
from sdq_lightning.planning.sensitivity import (
    STEP_MODES,
    Sensitivity,
    finite_difference,
    from_search,
    hawq,
    level_table,
    quantize_alone,
    spearman,
)

__all__ = [
    "PLANNERS",
    "STEP_MODES",
    "PlanProblem",
    "Sensitivity",
    "exact_plan",
    "finite_difference",
    "from_search",
    "hawq",
    "level_table",
    "quantize_alone",
    "random_plan",
    "size_greedy_plan",
    "spearman",
    "uniform_plan",
]
