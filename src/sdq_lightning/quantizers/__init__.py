"""Quantizers: pure functions and the LSQ / SDQ modules (no Lightning)."""

from sdq_lightning.quantizers.functional import (
    binary_quantize,
    grad_scale,
    int_range,
    lsq_grad_factor,
    lsq_quantize,
    quantize_weight,
    round_ste,
    weight_step_init,
)
from sdq_lightning.quantizers.estimators import (
    Estimator,
    estimator_names,
    get_estimator,
    register_estimator,
    unregister_estimator,
)
from sdq_lightning.quantizers.lsq import ActQuantizer
from sdq_lightning.quantizers.sdq import ESTIMATORS, READINGS, SDQWeightQuantizer, validate_candidates

__all__ = [
    "ActQuantizer",
    "ESTIMATORS",
    "Estimator",
    "READINGS",
    "SDQWeightQuantizer",
    "binary_quantize",
    "estimator_names",
    "get_estimator",
    "grad_scale",
    "int_range",
    "lsq_grad_factor",
    "lsq_quantize",
    "quantize_weight",
    "register_estimator",
    "round_ste",
    "unregister_estimator",
    "validate_candidates",
    "weight_step_init",
]
