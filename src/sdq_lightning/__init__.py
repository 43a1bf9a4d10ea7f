"""sdq_lightning: SDQ (Stochastic Differentiable Quantization with Mixed Precision) for PyTorch Lightning.

Importing the package registers resnet20/32/56 and digits_cnn in timm's model registry.
"""

from sdq_lightning import models  # noqa: F401  (registers timm models)
from sdq_lightning.budget import (
    BitPlan,
    Budget,
    CostModel,
    LayerBits,
    profile_model,
    project_to_budget,
    register_metric,
)
from sdq_lightning.checkpoint import load_quantized
from sdq_lightning.modules import QuantConv2d, QuantLinear, batch_weights, get_kernels, set_kernels
from sdq_lightning.options import (
    EBROptions,
    FreezeOptions,
    KDOptions,
    LayerOptions,
    RuntimeOptions,
    SearchOptions,
    register_schema,
)
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer
from sdq_lightning.surgery import QuantReport, QuantSpec, dequantize_model, quant_layers, quantize_model

__version__ = "0.1.0"

register_schema()  # the Hydra app's sdq node is typed by the option classes (sdq_lightning.options)

__all__ = [
    "ActQuantizer",
    "BitPlan",
    "Budget",
    "CostModel",
    "EBROptions",
    "FreezeOptions",
    "KDOptions",
    "LayerBits",
    "LayerOptions",
    "QuantConv2d",
    "QuantLinear",
    "QuantReport",
    "QuantSpec",
    "RuntimeOptions",
    "SDQ",
    "SDQClassifier",
    "SDQWeightQuantizer",
    "SearchOptions",
    "batch_weights",
    "dequantize_model",
    "get_kernels",
    "load_quantized",
    "profile_model",
    "project_to_budget",
    "quant_layers",
    "quantize_model",
    "register_metric",
    "set_kernels",
]


def __getattr__(name: str):
    # Lightning-dependent names load lazily so the core stays importable and testable without a Trainer.
    if name == "SDQ":
        from sdq_lightning.callbacks import SDQ

        return SDQ
    if name == "SDQClassifier":
        from sdq_lightning.lit import SDQClassifier

        return SDQClassifier
    raise AttributeError(f"module 'sdq_lightning' has no attribute {name!r}")
