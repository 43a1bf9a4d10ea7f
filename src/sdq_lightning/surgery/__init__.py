"""Model surgery: select Conv2d/Linear layers (or other registered layer types) and swap them for quantized ones
(no Lightning)."""

from sdq_lightning.surgery.layer_types import (
    QUANT_LAYER_TYPES,
    QuantBuilder,
    register_quant_layer,
    unregister_quant_layer,
)
from sdq_lightning.surgery.quantize import (
    FIRST_LAST_POLICIES,
    QuantReport,
    QuantSpec,
    dequantize_model,
    find_first_last,
    quant_layers,
    quantize_model,
    validate_activation_bits,
)

__all__ = [
    "FIRST_LAST_POLICIES",
    "QUANT_LAYER_TYPES",
    "QuantBuilder",
    "QuantReport",
    "QuantSpec",
    "dequantize_model",
    "find_first_last",
    "quant_layers",
    "quantize_model",
    "register_quant_layer",
    "unregister_quant_layer",
    "validate_activation_bits",
]
