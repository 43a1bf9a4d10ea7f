"""Every export form of a few fixed models, written to a folder, with the SHA-256 of each file: run it before and
after a change of the export code and compare the two lists (equal lists: the change writes the same bytes).

Models (seeded, CPU, one thread, so every run builds the same weights): the digits demo CNN (``digits_cnn``, 1x8x8
digits) and timm ``resnet20`` under the export tests' mixed plan (weight bits 1..8, input bits 8, 2..7), per-tensor
and per-channel, plus weight-only variants (FP activations) and ResNet20 in the integer-only mode. Forms: ``qdq``
(opsets 25, 21, 18), ``int8`` (default; ``float_output_kernel="float"``; ``fuse_tolerance=inf``), the plain float
graph, the integer-only graph (with and without intermediates) and ``export_model``'s folder (packed, onnx, report).

    python benchmarks/export_identity.py OUT_DIR > hashes.txt
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import timm
import torch
from torch import nn

import sdq_lightning  # noqa: F401  (registers resnet20 and digits_cnn in timm)
from sdq_lightning import BitPlan, LayerBits, QuantSpec, quantize_model
from sdq_lightning.export import export_float_onnx, export_model, export_onnx
from sdq_lightning.export.integer_only import export_integer_onnx

_TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(_TESTS), str(_TESTS / "export")]
from export_helpers import digits_images, mixed_bits  # noqa: E402
from helpers.data import digits_unit  # noqa: E402
from integer_helpers import integer_model  # noqa: E402


def quantized(arch: str, x: torch.Tensor, weight_only: bool = False, per_channel: bool = False) -> nn.Module:
    """``arch`` (seed 0) under the mixed plan, its input quantizers calibrated by one train-mode forward on ``x``."""
    torch.manual_seed(0)
    kw = {"in_chans": 1} if arch == "digits_cnn" else {}
    model = timm.create_model(arch, pretrained=False, num_classes=10, **kw)
    w, a = mixed_bits(model)
    if per_channel:
        quantize_model(model, QuantSpec(layer_bits=w, layer_act_bits=a, per_channel=True))
    else:
        BitPlan({n: LayerBits(w[n], None if weight_only else a[n], 0, 0) for n in w}).apply(model)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def exports(out: Path) -> None:
    digits = digits_unit()[0][:64].reshape(-1, 1, 8, 8).float()
    images = digits_images(128)[0]
    models = {
        "digits_cnn": (quantized("digits_cnn", digits), digits[:4]),
        "digits_cnn_wonly": (quantized("digits_cnn", digits, weight_only=True), digits[:4]),
        "resnet20": (quantized("resnet20", images), images[:4]),
        "resnet20_wonly": (quantized("resnet20", images, weight_only=True), images[:4]),
        "resnet20_perchannel": (quantized("resnet20", images, per_channel=True), images[:4]),
    }
    for name, (model, x) in models.items():
        export_onnx(model, out / f"{name}.int8.onnx", x)
        export_onnx(model, out / f"{name}.int8_floatk.onnx", x, float_output_kernel="float")
        export_onnx(model, out / f"{name}.int8_fused.onnx", x, fuse_tolerance=math.inf)
        export_onnx(model, out / f"{name}.int8_fused_floatk.onnx", x, fuse_tolerance=math.inf,
                    float_output_kernel="float")
        for opset in (25, 21, 18):
            export_onnx(model, out / f"{name}.qdq{opset}.onnx", x, opset=opset, form="qdq")
    export_float_onnx(timm.create_model("resnet20", num_classes=10), out / "resnet20.float.onnx", images[:4])
    export_model(models["resnet20"][0], out / "resnet20_export_model", images[:4], model_name="resnet20",
                 model_kwargs={"num_classes": 10})
    integer = integer_model("mixed", images)
    export_integer_onnx(integer, out / "resnet20.integer_only.onnx")
    export_integer_onnx(integer, out / "resnet20.integer_only_intermediates.onnx", intermediates=True)
    export_model(integer, out / "resnet20_integer_export_model", images[:4], model_name="resnet20",
                 model_kwargs={"num_classes": 10}, formats="onnx,report")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "export_identity")
    torch.set_num_threads(1)
    exports(out)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(hashlib.sha256(p.read_bytes()).hexdigest(), p.relative_to(out))


if __name__ == "__main__":
    main()
