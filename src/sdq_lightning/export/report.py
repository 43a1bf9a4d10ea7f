"""Capability report: per layer, the bits and the format each export writes, and what is not native."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sdq_lightning.export.onnx_export import DEFAULT_OPSET, onnx_int_type
from sdq_lightning.export.packed import check_exportable

__all__ = ["capability_report", "report_markdown", "write_report"]


def _layer_entry(name: str, m: nn.Module, opset: int) -> dict[str, Any]:
    wq, aq = getattr(m, "weight_quant", None), getattr(m, "act_quant", None)
    e: dict[str, Any] = {"layer": name, "type": type(m).__name__, "params": m.weight.numel(),
                         "w_bits": wq.bits if wq is not None else None,
                         "a_bits": aq.bits if aq is not None else None,
                         "a_signed": bool(aq.signed) if aq is not None else None,
                         "per_channel": bool(wq.per_channel) if wq is not None else None, "not_native": []}
    if wq is None:
        e["packed_weight"] = "FP32 raw"
        e["onnx_weight"] = "FP"
    else:
        b = wq.bits
        e["packed_weight"] = f"{b}-bit packed" + (" (codes -1/+1 as bits 0/1)" if b == 1 else "")
        tname, _, _, native = onnx_int_type(b, True, opset)
        if b == 1:
            e["onnx_weight"] = f"{tname} QDQ, 1-bit codes +-1 stored as {tname}"
            e["not_native"].append(f"weight 1-bit (binary +-1) stored as {tname}")
        elif native:
            e["onnx_weight"] = f"{tname} QDQ"
        else:
            e["onnx_weight"] = f"{tname} QDQ, values in the {b}-bit range"
            e["not_native"].append(f"weight {b}-bit stored as {tname}")
    if aq is None:
        e["onnx_act"] = "FP"
    else:
        tname, _, _, native = onnx_int_type(aq.bits, bool(aq.signed), opset)
        qn, qp = aq.qrange
        if native:
            e["onnx_act"] = f"{tname} QDQ"
        else:
            e["onnx_act"] = f"{tname} QDQ, clipped to {aq.bits}-bit range [{qn}, {qp}]"
            e["not_native"].append(f"activation {aq.bits}-bit as {tname} + Max/Min clip")
    return e


def capability_report(model: nn.Module, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Per-layer bits and export formats of a frozen quantized model (every Conv2d/Linear, FP ones included)."""
    check_exportable(model)
    import onnx
    import onnxruntime

    layers = [_layer_entry(n, m, opset) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {
        "onnx": {"opset": opset, "onnx_version": onnx.__version__, "onnxruntime_version": onnxruntime.__version__,
                 "activation_qdq": "Mul(x, fp32(1/step)) [-> Max/Min clip] -> QuantizeLinear(scale=1) -> "
                                   "DequantizeLinear(step), the arithmetic of the PyTorch fake-quantizer",
                 "weight_qdq": "integer initializer -> DequantizeLinear(step[, axis=0])"},
        "packed": {"weights": "bit-packed at the plan's bitwidth (1..8), little-endian bit order",
                   "fp_state": "raw little-endian bytes at native dtype", "integrity": "sha256 over header+payload"},
        "layers": layers,
        "not_native": [f"{e['layer']}: {x}" for e in layers for x in e["not_native"]],
    }


def report_markdown(report: dict[str, Any]) -> str:
    o = report["onnx"]
    lines = ["# SDQ export capability report", "",
             f"ONNX opset {o['opset']} (onnx {o['onnx_version']}, onnxruntime {o['onnxruntime_version']}).",
             f"Activations: {o['activation_qdq']}.", f"Weights: {o['weight_qdq']}.", "",
             "| layer | type | W bits | A bits | packed weight | ONNX weight | ONNX input activation |",
             "|---|---|---:|---:|---|---|---|"]
    for e in report["layers"]:
        a = "FP" if e["a_bits"] is None else f"{e['a_bits']}{'s' if e['a_signed'] else 'u'}"
        lines.append(f"| {e['layer']} | {e['type']} | {e['w_bits'] or 'FP'} | {a} | {e['packed_weight']} | "
                     f"{e['onnx_weight']} | {e['onnx_act']} |")
    lines += ["", "## Precisions not represented natively in ONNX", ""]
    lines += [f"- {x}" for x in report["not_native"]] or ["- none"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capability.json").write_text(json.dumps(report, indent=2))
    (out / "capability.md").write_text(report_markdown(report))
    return out / "capability.json", out / "capability.md"
