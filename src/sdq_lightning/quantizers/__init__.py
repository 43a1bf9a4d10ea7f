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
from sdq_lightning.quantizers.lsq import ActQuantizer
from sdq_lightning.quantizers.sdq import ESTIMATORS, READINGS, SDQWeightQuantizer, validate_candidates

__all__ = [
    "ActQuantizer",
    "ESTIMATORS",
    "READINGS",
    "SDQWeightQuantizer",
    "binary_quantize",
    "grad_scale",
    "int_range",
    "lsq_grad_factor",
    "lsq_quantize",
    "quantize_weight",
    "round_ste",
    "validate_candidates",
    "weight_step_init",
]
