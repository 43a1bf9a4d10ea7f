"""Model surgery: select Conv2d/Linear layers and swap them for quantized ones (no Lightning)."""

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
    "QuantReport",
    "QuantSpec",
    "dequantize_model",
    "find_first_last",
    "quant_layers",
    "quantize_model",
    "validate_activation_bits",
]
