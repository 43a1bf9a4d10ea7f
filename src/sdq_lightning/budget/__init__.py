"""Cost model, budget, bit plan (no Lightning)."""

from sdq_lightning.budget.cost import (
    CONVENTION,
    METRICS,
    Budget,
    LayerCost,
    cost_of,
    get_metric,
    register_metric,
    unregister_metric,
)
from sdq_lightning.budget.plan import BitPlan, LayerBits
from sdq_lightning.budget.profile import LayerProfile, profile_model, quantizers_disabled
from sdq_lightning.budget.costmodel import PENALTIES, CostModel, budget_penalty, project_to_budget, quantization_mse

__all__ = [
    "CONVENTION",
    "METRICS",
    "PENALTIES",
    "BitPlan",
    "Budget",
    "CostModel",
    "LayerBits",
    "LayerCost",
    "LayerProfile",
    "budget_penalty",
    "cost_of",
    "get_metric",
    "profile_model",
    "project_to_budget",
    "quantization_mse",
    "quantizers_disabled",
    "register_metric",
    "unregister_metric",
]
