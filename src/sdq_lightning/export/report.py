"""Capability report: per layer, the bits and the format each export writes, and what is not native."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sdq_lightning.budget.profile import held_bits
from sdq_lightning.checkpoint import network_prefix
from sdq_lightning.export.onnx_export import DEFAULT_OPSET, onnx_int_type
from sdq_lightning.export.packed import check_exportable

__all__ = ["INTEGER_KERNELS", "capability_report", "onnx_kernels", "report_markdown", "write_report"]

# onnxruntime kernels that compute a layer in integer arithmetic (the rest of a layer's kernels are glue)
INTEGER_KERNELS = frozenset({"QLinearConv", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
                             "QLinearMatMul", "DynamicQuantizeMatMul"})
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


def onnx_kernels(path: str | Path, layers: list[str], input_shape: tuple[int, ...] | None = None,
                 threads: int = 1) -> dict[str, list[str]]:
    """The onnxruntime CPU kernels (``op_name`` of the profiled node runs, default ``ORT_ENABLE_ALL`` optimisation)
    that ran for each layer of an exported model, in run order.

    Nodes are attributed to a layer by name: the export names every node it writes ``<layer with . as _>_<role>``;
    nodes renamed by onnxruntime's NCHWc layout pass (``<output tensor>_nchwc``) are traced back through the model
    optimised without the layout passes (``ORT_ENABLE_EXTENDED``), where the fused node keeps the export's name.
    """
    import os
    import tempfile

    import numpy as np
    import onnxruntime as ort

    tags = sorted(((n.replace(".", "_"), n) for n in layers), key=lambda t: -len(t[0]))
    out: dict[str, list[str]] = {n: [] for n in layers}
    with tempfile.TemporaryDirectory() as d:
        ext = os.path.join(d, "ext.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = ext
        so.intra_op_num_threads = threads
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        import onnx

        producer = {o: n.name for n in onnx.load(ext).graph.node for o in n.output}
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "prof")
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = input_shape or tuple(v if isinstance(v, int) else 1 for v in inp.shape)
        sess.run(None, {inp.name: np.zeros(shape, np.float32)})
        events = json.loads(Path(sess.end_profiling()).read_text())
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name.endswith("_nchwc"):
            name = producer.get(name[: -len("_nchwc")], name)
        key = next((k for t, k in tags if name.startswith(t + "_")), None)
        if key is not None:
            out[key].append(e["args"]["op_name"])
    return out


def _layer_entry(name: str, m: nn.Module, opset: int) -> dict[str, Any]:
    wq, aq = getattr(m, "weight_quant", None), getattr(m, "act_quant", None)
    w_bits, a_bits = held_bits(m)
    e: dict[str, Any] = {"layer": name, "type": type(m).__name__, "params": m.weight.numel(),
                         "w_bits": w_bits, "a_bits": a_bits,
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


def _describe_int8(e: dict[str, Any], plan: dict[str, Any]) -> None:
    """ONNX weight/activation columns for the int8 form (b-bit codes in 8-bit containers)."""
    if e["w_bits"] is not None and e["a_bits"] is None:
        e["onnx_weight"] = "FP32 (the fake-quantized weight baked in: weight-only layer)"
    elif e["w_bits"] is not None:
        op = plan.get("op")
        cont = "uint8 codes + 128, zero point 128" if op == "ConvInteger" else "int8 codes, zero point 0"
        e["onnx_weight"] = (f"{e['w_bits']}-bit codes{' (+-1)' if e['w_bits'] == 1 else ''} as {cont}"
                            if op != "float" else "FP32 (dequantized codes)")
    if e["a_bits"] is not None:
        t = "int8" if e["a_signed"] else "uint8"
        e["onnx_act"] = f"{e['a_bits']}-bit codes as {t}, zero point 0"


def _describe_integer_only(e: dict[str, Any], ops: dict[str, dict[str, Any]]) -> None:
    """ONNX weight/activation columns and the non-native precisions for a layer of the integer-only form."""
    op = ops.get(e["layer"], {})
    fold = f", BatchNorm {op['bn']} folded" if op.get("bn") else ""
    e["onnx_weight"] = (f"{e['w_bits']}-bit codes{' (+-1)' if e['w_bits'] == 1 else ''} as int8, fp32 scale per "
                        f"output channel{fold}, zero point 0, int32 bias")
    e["onnx_act"] = f"{e['a_bits']}-bit codes as uint8, zero point {128 if e['a_signed'] else 0}" + \
        (" + Clip" if e["a_bits"] < 8 else "")
    e["not_native"] = ([f"weight {e['w_bits']}-bit codes in int8"] if e["w_bits"] < 8 else []) + \
        ([f"activation {e['a_bits']}-bit codes in uint8 + Clip"] if e["a_bits"] < 8 else [])


def capability_report(model: nn.Module, opset: int = DEFAULT_OPSET, onnx_path: str | Path | None = None,
                      example_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Per-layer bits and export formats of a frozen quantized model (every Conv2d/Linear, FP ones included).

    With ``onnx_path`` (a model written by :func:`~sdq_lightning.export.export_onnx`), each layer also gets the
    onnxruntime CPU kernels that ran for it (profiled, see :func:`onnx_kernels`): ``ort_kernel`` (the compute
    kernel), ``ort_integer`` and, for a layer whose compute ran in float, ``fallback`` (why).
    """
    check_exportable(model)
    import onnx
    import onnxruntime

    layers = [_layer_entry(n, m, opset) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    rep: dict[str, Any] = {
        "onnx": {"opset": opset, "onnx_version": onnx.__version__, "onnxruntime_version": onnxruntime.__version__,
                 "activation_qdq": "Mul(x, fp32(1/step)) [-> Max/Min clip] -> QuantizeLinear(scale=1) -> "
                                   "DequantizeLinear(step), the arithmetic of the PyTorch fake-quantizer",
                 "weight_qdq": "integer initializer -> DequantizeLinear(step[, axis=0])"},
        "packed": {"weights": "bit-packed at the plan's bitwidth (1..8), little-endian bit order",
                   "fp_state": "raw little-endian bytes at native dtype", "integrity": "sha256 over header+payload"},
        "layers": layers,
    }
    if onnx_path is not None:
        proto = onnx.load(str(onnx_path), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        form = meta.get("sdq_form", "qdq")
        plan = json.loads(meta.get("sdq_layers", "{}"))
        # the integer-only graph names its nodes after the network's modules (the model may wrap the network)
        prefix = network_prefix(model) + "." if form == "integer_only" and network_prefix(model) else ""
        ops = {prefix + o["name"]: o for o in json.loads(meta.get("sdq_ops", "[]"))}
        names = list(dict.fromkeys([e["layer"] for e in layers] + list(ops)))
        found = onnx_kernels(onnx_path, [n.removeprefix(prefix) for n in names], example_shape)
        kernels = {n: found[n.removeprefix(prefix)] for n in names}
        rep["onnx"]["form"] = form
        if form == "integer_only":
            rep["onnx"]["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
            rep["onnx"]["activation_qdq"] = ("uint8 codes (zero point 0, or 128 for a signed tensor) written by the "
                                             "integer kernels; QuantizeLinear on the float input only")
            rep["onnx"]["weight_qdq"] = "int8 codes of the BatchNorm-folded weight, per-channel fp32 scale, int32 bias"
            rep["ops"] = [{"op": n, "kind": o["kind"], **({"act": o["act"]} if "act" in o else {}),
                           "ort_kernels": kernels[n]} for n, o in ops.items()]
        if form == "int8":
            rep["onnx"]["activation_qdq"] = ("Mul(x, fp32(1/step)) [-> Max/Min clip] -> QuantizeLinear(scale=1) to "
                                             "uint8/int8 codes (or the codes a QLinearConv wrote)")
            rep["onnx"]["weight_qdq"] = "b-bit codes in 8-bit containers, zero point 0 (ConvInteger: uint8 +128)"
            rep["onnx"]["fuse_tolerance"] = meta.get("sdq_fuse_tolerance")
            rep["onnx"]["float_output_kernel"] = meta.get("sdq_float_output_kernel")
        for e in layers:
            ks = kernels[e["layer"]]
            compute = [k for k in ks if k in INTEGER_KERNELS or k in FLOAT_KERNELS]
            e["ort_kernels"] = ks
            e["ort_kernel"] = compute[0] if compute else None
            e["ort_integer"] = bool(compute) and all(k in INTEGER_KERNELS for k in compute)
            p = plan.get(e["layer"], {})
            if form == "integer_only":
                _describe_integer_only(e, ops)
            if form == "int8":
                _describe_int8(e, p)
                e["not_native"] = ([f"weight {e['w_bits']}-bit codes in 8-bit containers"]
                                   if e["w_bits"] is not None and e["w_bits"] < 8 and e["a_bits"] is not None else [])
                e["not_native"] += ([f"activation {e['a_bits']}-bit codes in {'int8' if e['a_signed'] else 'uint8'}"
                                     + (" + clip" if e["a_bits"] < 8 else "")]
                                    if e["a_bits"] is not None and e["a_bits"] < 8 else [])
            if not e["ort_integer"]:
                if e["w_bits"] is None and e["a_bits"] is None:
                    why = "layer kept in floating point by the plan"
                elif form != "int8":
                    why = ("form='qdq': onnxruntime has no int2/int4 kernels and does not fuse this QDQ pattern; it "
                           "dequantizes and runs the float kernel (export with form='int8' for integer kernels)")
                else:
                    why = p.get("reason") or "onnxruntime did not run an integer kernel for this layer"
                e["fallback"] = why
            if p.get("bias_rounding_steps") is not None:
                e["bias_rounding_steps"] = p["bias_rounding_steps"]
    rep["not_native"] = [f"{e['layer']}: {x}" for e in layers for x in e["not_native"]]
    return rep


def report_markdown(report: dict[str, Any]) -> str:
    o = report["onnx"]
    kern = any("ort_kernel" in e for e in report["layers"])
    lines = ["# SDQ export capability report", "",
             f"ONNX opset {o['opset']} (onnx {o['onnx_version']}, onnxruntime {o['onnxruntime_version']})"
             + (f", form {o['form']}" if "form" in o else "") + ".",
             f"Activations: {o['activation_qdq']}.", f"Weights: {o['weight_qdq']}.", "",
             "| layer | type | W bits | A bits | packed weight | ONNX weight | ONNX input activation |"
             + (" onnxruntime kernel | integer |" if kern else ""),
             "|---|---|---:|---:|---|---|---|" + ("---|---|" if kern else "")]
    for e in report["layers"]:
        a = "FP" if e["a_bits"] is None else f"{e['a_bits']}{'s' if e['a_signed'] else 'u'}"
        row = (f"| {e['layer']} | {e['type']} | {e['w_bits'] or 'FP'} | {a} | {e['packed_weight']} | "
               f"{e['onnx_weight']} | {e['onnx_act']} |")
        if kern:
            row += f" {e.get('ort_kernel') or '-'} | {'yes' if e.get('ort_integer') else 'no'} |"
        lines.append(row)
    if kern:
        lines += ["", "## Layers whose compute ran in float in onnxruntime, and why", ""]
        lines += [f"- {e['layer']} ({e.get('ort_kernel') or 'no kernel found'}): {e['fallback']}"
                  for e in report["layers"] if "fallback" in e] or ["- none: every layer ran an integer kernel"]
    if report.get("ops"):
        lines += ["", "## Every op of the integer graph and the onnxruntime kernels it ran", "",
                  "| op | kind | fused activation | onnxruntime kernels |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['kind']} | {o.get('act') or '-'} | {', '.join(o['ort_kernels']) or '-'} |"
                  for o in report["ops"]]
    lines += ["", "## Precisions not represented natively in ONNX", ""]
    lines += [f"- {x}" for x in report["not_native"]] or ["- none"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capability.json").write_text(json.dumps(report, indent=2))
    (out / "capability.md").write_text(report_markdown(report))
    return out / "capability.json", out / "capability.md"
