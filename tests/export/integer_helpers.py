"""Integer-only models for the tests and benchmarks: the repository's FP ResNet20 checkpoint (or an untrained timm
model) under a plan, calibrated on real images, switched to the integer-only mode; and onnxruntime runs that return
every intermediate tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

import sdq_lightning  # noqa: F401
from sdq_lightning import BitPlan, LayerBits
from sdq_lightning.integer import integer_forward, integer_only, trace_integer_graph

from export_helpers import cifar_images
from helpers.data import digits_images

FP_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "resnet20_cifar10_fp.pt"
PLANS = ("w8a8", "w4a8", "mixed", "sdq2")
# the SDQ plan of docs/RESULTS.md section 2b (ResNet20, avg_bits 1.998 <= 2.0), weights per layer in module order
SDQ2_WEIGHT_BITS = (8, 5, 5, 4, 5, 4, 4, 5, 4, 8, 4, 4, 4, 3, 4, 1, 5, 1, 1, 1, 1, 8)


def real_images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` CIFAR-10 test images (``SDQ_CIFAR10_ROOT``), else real digits images at 3x32x32."""
    data = cifar_images(n)
    if data is not None:
        return data[0], data[1], "CIFAR-10"
    x, y = digits_images(max(n, 1024))
    return x[-n:], y[-n:], "digits"


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def plan_bits(model: nn.Module, kind: str) -> tuple[dict[str, int], dict[str, int]]:
    """Weight and input bits per layer: ``wXaY`` (first conv and classifier at 8/8); ``mixed``: weights cycling
    1..8 over the layers, input bits cycling 8, 2..7 over the tensors the layers read (layers reading one tensor
    share its bits); ``sdq2``: ResNet20's SDQ plan at 1.998 average weight bits, 8-bit inputs."""
    names = layer_names(model)
    if kind == "sdq2":
        if len(names) != len(SDQ2_WEIGHT_BITS):
            raise ValueError(f"plan sdq2 is ResNet20's ({len(SDQ2_WEIGHT_BITS)} layers), the model has {len(names)}")
        return dict(zip(names, SDQ2_WEIGHT_BITS)), {n: 8 for n in names}
    if kind != "mixed":
        wb, ab = int(kind[1]), int(kind[3])
        edge = (names[0], names[-1])
        return ({n: 8 if n in edge else wb for n in names}, {n: 8 if n in edge else ab for n in names})
    probe = copy.deepcopy(model)
    BitPlan({n: LayerBits(8, 8, 0, 0) for n in names}).apply(probe)
    graph = trace_integer_graph(probe)
    groups: dict[str, list[str]] = {}
    for op in graph.ops:
        if op.kind in ("conv", "linear"):
            groups.setdefault(graph.tensors[op.inputs[0]].quant, []).append(op.name)
    a = {n: (8, 2, 3, 4, 5, 6, 7)[i % 7] for i, g in enumerate(groups.values()) for n in g}
    return {n: 1 + i % 8 for i, n in enumerate(names)}, a


def float_model(arch: str = "resnet20") -> nn.Module:
    """The FP checkpoint of the repository for ``resnet20``, else an untrained timm model (seed 0)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    if arch == "resnet20":
        model.load_state_dict(torch.load(FP_CHECKPOINT, weights_only=True))
    return model.eval()


def integer_model(kind: str, calib: torch.Tensor, arch: str = "resnet20",
                  model: nn.Module | None = None) -> nn.Module:
    """``model`` (default :func:`float_model`) under plan ``kind``, its input quantizers calibrated by one train-mode
    forward on ``calib`` (BatchNorm statistics restored after it), then integer-only and its new quantizers
    calibrated by one train-mode forward on ``calib`` (the integer forward leaves BatchNorm alone)."""
    model = model if model is not None else float_model(arch)
    w, a = plan_bits(model, kind)
    BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}).apply(model)
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    with torch.no_grad():
        model(calib)
    model.load_state_dict(bn, strict=False)
    model.eval()
    integer_only(model)
    model.train()
    with torch.no_grad():
        model(calib)
    return model.eval()


def torch_codes(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PyTorch's logits and every tensor's uint8 codes, keyed as the ONNX intermediates (``t_<tensor>``)."""
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = integer_forward(model, x, record=rec)
    return logits.numpy(), {"t_" + k.replace(".", "_"): v.numpy() for k, v in rec.items()}


def ort_codes(path: Path, x: np.ndarray, batch: int, threads: int, optimize: bool) -> dict[str, np.ndarray]:
    """Every output of the ONNX model (logits and, exported with ``intermediates``, every tensor's codes) over
    ``x`` in batches of ``batch``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(None, {"input": x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {n: np.concatenate([r[j] for r in runs]) for j, n in enumerate(names)}
