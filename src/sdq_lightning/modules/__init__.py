"""Quantized layers that subclass the torch layers (no Lightning)."""

from sdq_lightning.modules.batched import BatchedWeights, batch_weights
from sdq_lightning.modules.fused import get_kernels, set_kernels
from sdq_lightning.modules.layers import QuantConv2d, QuantLinear, QuantModule, is_quant_layer

__all__ = ["BatchedWeights", "QuantConv2d", "QuantLinear", "QuantModule", "batch_weights", "get_kernels",
           "is_quant_layer", "set_kernels"]
