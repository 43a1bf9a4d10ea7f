"""OpenVINO against onnxruntime on the integer-only ONNX file of ResNet20: agreement and CPU latency.

Models (``checkpoints/resnet20_cifar10_fp.pt``; the first ``--calib`` real CIFAR-10 test images calibrate, the next
``--images`` are compared), built and exported as in ``bench_integer_only.py``:

* ``FP``: the float model (``export_float_onnx``), the latency baseline (onnxruntime);
* ``int-<plan>``: the integer-only model under ``<plan>`` (``w8a8``, ``mixed``; see ``tests/export/integer_helpers.py``),
  written by ``export_integer_onnx`` (QLinearConv / QLinearAdd / QLinearGlobalAveragePool / QGemm, uint8);
* ``int-qdq-<plan>``: the same model in the QDQ form (``export_integer_onnx(form="qdq")``: the same codes and scales
  as QuantizeLinear / DequantizeLinear around float Conv / Add / GlobalAveragePool / Gemm); its ``ORT`` row is
  onnxruntime on that file (``ORT_ENABLE_ALL`` fuses it back into the integer kernels: the same logits as
  ``int-<plan>``), and its ``OV`` row is compared with onnxruntime on the ``int-<plan>`` file (the exact reference);
* with ``--refs``: ``ort-ptq`` (onnxruntime's ``quantize_static`` of the FP model, QOperator, per-channel int8
  weights: the same operator set) and ``ort-ptq-qdq`` (the same in QDQ format), to tell what OpenVINO reads.

Each file runs in onnxruntime (the reference: ``ORT_ENABLE_ALL``, ``--threads`` intra-op threads) and in OpenVINO CPU
(``Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})``, its
default inference precision, which is bf16 on a CPU with AMX / AVX-512 bf16; ``OV-f32`` rows add
``INFERENCE_PRECISION_HINT=f32`` for the float model). Agreement: OpenVINO (dynamic batch, chunks of ``--batch``)
against onnxruntime on the same images: top-1 agreement of the argmax, fraction of logits exactly equal, max abs logit
difference, top-1 accuracy of each against the labels. Latency: ``bench_onnx.time_interleaved`` over every
(model, runtime) pair that loaded (OpenVINO compiled with a static shape per batch size), round robin per repeat,
medians, ratios to onnxruntime's FP in the same run. onnxruntime's intra-op threads do not spin here
(``session.intra_op.allow_spinning=0``; ``--ort-spinning`` restores its default): with both runtimes in one process
on 2 cores, the FP model at batch 1, alternating, took 1.6 ms in onnxruntime and 0.55-0.79 ms in OpenVINO with
spinning, 0.79 and 0.35-0.39 ms without (one run on the shared 2-core VM). A file OpenVINO cannot read gets its error (the frontend's
summary) in place of the figures.

    SDQ_CIFAR10_ROOT=/path/to/cifar10 python benchmarks/openvino_compare.py [--plans w8a8,mixed] [--images 1000] \
        [--threads 2] [--repeats 21] [--iters 40] [--batch 128] [--refs] [--ort-spinning] [--quick] \
        [--json out.json] [--out table.md]

Needs the ``openvino`` extra (``pip install openvino``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))

PLANS = ("w8a8", "mixed")


def ov_error_summary(err: BaseException) -> str:
    """One line from OpenVINO's frontend error: its ``Summary`` lines, else the first line naming a failure."""
    text = str(err)
    if "Summary:" in text:
        lines = [s.strip("- ").strip() for s in text.split("Summary:", 1)[1].splitlines() if s.strip()]
        return "; ".join(lines)
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    return next((s for s in lines if re.search(r"fail|error|not supported", s, re.IGNORECASE)), lines[0] if lines else repr(err))


class OVSession:
    """An OpenVINO compiled model per batch size (static shapes) behind onnxruntime's ``run(None, feed)``."""

    def __init__(self, core, path: Path, config: dict, batches: list[int]) -> None:
        self.requests = {}
        for b in batches:
            model = core.read_model(str(path))
            model.reshape({model.inputs[0].any_name: [b, 3, 32, 32]})
            self.requests[b] = core.compile_model(model, "CPU", config).create_infer_request()

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        x = feed["input"]
        return [self.requests[len(x)].infer({0: x})[0]]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("--plans", default="w8a8,mixed")
    p.add_argument("--images", type=int, default=1000, help="test images compared (after the calibration images)")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ort-spinning", action="store_true",
                   help="let onnxruntime's threads spin between runs (its default; off here, see the docstring)")
    p.add_argument("--refs", action="store_true", help="add onnxruntime's own int8 models (QOperator and QDQ)")
    p.add_argument("--quick", action="store_true", help="smoke run: 128 images, 3 repeats, 4 iters, batch 16")
    p.add_argument("--json", default=None, help="write every figure (and OpenVINO's full errors) here")
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.calib, args.repeats, args.iters, args.batch = 128, 64, 3, 4, 16
    plans = [s.strip() for s in args.plans.split(",") if s.strip()]
    if not plans or any(s not in PLANS for s in plans):
        raise SystemExit(f"openvino_compare: --plans must be a subset of {PLANS}, got {args.plans!r}")
    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("openvino_compare: OpenVINO is not installed: pip install openvino "
                         "(or pip install -e '.[openvino]')") from None
    root = os.environ.get("SDQ_CIFAR10_ROOT")
    if not root or not (Path(root) / "test").is_dir():
        raise SystemExit(f"openvino_compare: set SDQ_CIFAR10_ROOT to the CIFAR-10 ImageFolder tree (with test/), "
                         f"got {root!r}")

    import onnxruntime as ort
    import torch
    from bench_onnx import emit_table, ort_ptq, time_interleaved
    from integer_helpers import float_model, integer_model, real_images

    from sdq_lightning.export import export_float_onnx
    from sdq_lightning.export.integer_only import export_integer_onnx

    x, y, source = real_images(args.calib + args.images)
    if source != "CIFAR-10":
        raise SystemExit("openvino_compare: set SDQ_CIFAR10_ROOT to the CIFAR-10 ImageFolder tree")
    calib, test, labels = x[:args.calib], x[args.calib:].numpy(), y[args.calib:].numpy()
    b = args.batch
    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    if not args.ort_spinning:  # spinning onnxruntime threads take the cores from OpenVINO's, and back
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions: dict[str, object] = {}
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths = {"FP": export_float_onnx(float_model(), d / "fp.onnx", x[:1])}
        for plan in plans:
            net = integer_model(plan, calib)
            paths[f"int-{plan}"] = export_integer_onnx(net, d / f"int_{plan}.onnx")
            paths[f"int-qdq-{plan}"] = export_integer_onnx(net, d / f"int_qdq_{plan}.onnx", form="qdq")
        if args.refs:
            paths["ort-ptq"] = ort_ptq(paths["FP"], d / "ort_ptq.onnx", "qop", calib.numpy(), per_channel=True)
            paths["ort-ptq-qdq"] = ort_ptq(paths["FP"], d / "ort_ptq_qdq.onnx", "qdq", calib.numpy(),
                                           per_channel=True)
        ov_runs = [(k, "OV", cfg) for k in paths]
        ov_runs.insert(1, ("FP", "OV-f32", {**cfg, "INFERENCE_PRECISION_HINT": "f32"}))
        for k, path in paths.items():
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            sessions[f"{k} ORT"] = sess
            ref = np.concatenate([sess.run(None, {"input": test[i:i + b]})[0] for i in range(0, len(test), b)])
            res[k] = {"ORT": {"top1": float((ref.argmax(1) == labels).mean())}, "_ref": ref}
            if k.startswith("int-qdq-"):  # onnxruntime on the QDQ file against onnxruntime on the int8 file
                exact = res[k.replace("int-qdq-", "int-")]["_ref"]
                res[k]["ORT"].update(equal_int8=float((ref == exact).mean()),
                                     agree_int8=float((ref.argmax(1) == exact.argmax(1)).mean()),
                                     max_abs_int8=float(np.abs(ref - exact).max()))
                res[k]["_ref"] = exact
        for k, rt, conf in ov_runs:
            ref = res[k]["_ref"]
            try:
                compiled = core.compile_model(core.read_model(str(paths[k])), "CPU", conf)
                hint = compiled.get_property("INFERENCE_PRECISION_HINT")
                precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
                got = np.concatenate([compiled(test[i:i + b])[0] for i in range(0, len(test), b)])
                sessions[f"{k} {rt}"] = OVSession(core, paths[k], conf, [1, b])
            except Exception as e:  # noqa: BLE001 - any frontend/plugin failure is a result to report
                res[k][rt] = {"error": ov_error_summary(e), "error_full": str(e)}
                print(f"openvino_compare: OpenVINO cannot run {k}: {ov_error_summary(e)}", file=sys.stderr)
                continue
            res[k][rt] = {"precision": precision, "top1": float((got.argmax(1) == labels).mean()),
                          "agree": float((got.argmax(1) == ref.argmax(1)).mean()),
                          "equal": float((got == ref).mean()), "max_abs": float(np.abs(got - ref).max())}
    med = time_interleaved(sessions, {1: test[-1:], b: test[-b:]}, args.repeats, args.iters)

    head = (f"OpenVINO {ov.__version__} CPU against onnxruntime {ort.__version__} CPU ({platform.machine()}, "
            f"{os.cpu_count()} cores), {args.threads} threads each (ORT spinning "
            f"{'on' if args.ort_spinning else 'off'}), torch {torch.__version__}, {len(test)} CIFAR-10 "
            f"test images (after {len(calib)} calibration images), repeats={args.repeats}, iters={args.iters} "
            f"(batch {b}: {max(2, args.iters // 8)}), {datetime.date.today().isoformat()}")
    cols = ("| model | runtime | precision | top-1 | argmax agrees with ORT | logits equal to ORT | max abs diff | "
            f"b1 ms | b1 / ORT FP | b{b} ms | b{b} / ORT FP |")
    lines = [head, "", cols, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in paths:
        for rt in ["ORT", "OV-f32", "OV"] if k == "FP" else ["ORT", "OV"]:
            r = res[k][rt]
            if "error" in r:
                lines.append(f"| {k} | {rt} | - | - | - | - | - | - | - | - | - |")
                continue
            t = [med[(f"{k} {rt}", n)] for n in (1, b)]
            cmp = ("(reference)", "(reference)", "-") if rt == "ORT" else \
                (f"{r['agree']:.2%}", f"{r['equal']:.2%}", f"{r['max_abs']:.3g}")
            if "equal_int8" in r:
                cmp = (f"{r['agree_int8']:.2%} (ORT int-)", f"{r['equal_int8']:.2%} (ORT int-)",
                       f"{r['max_abs_int8']:.3g} (ORT int-)")
            lines.append(f"| {k} | {rt} | {r.get('precision', 'onnxruntime')} | {r['top1']:.2%} | {' | '.join(cmp)} | "
                         f"{t[0]:.3f} | {t[0] / med[('FP ORT', 1)]:.2f} | {t[1]:.2f} | {t[1] / med[('FP ORT', b)]:.2f} |")
    errors = [(k, rt, res[k][rt]["error"]) for k in paths for rt in ("OV", "OV-f32") if "error" in res[k].get(rt, {})]
    if errors:
        lines.append("")
        lines += [f"- OpenVINO cannot read `{k}`: {e}" for k, rt, e in errors]
    table = emit_table(lines, args.out)
    if args.json:
        out = {"openvino": ov.__version__, "onnxruntime": ort.__version__, "args": vars(args),
               "results": {k: {rt: v for rt, v in r.items() if rt != "_ref"} for k, r in res.items()},
               "latency_ms": {f"{k}|{n}": v for (k, n), v in med.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return table


if __name__ == "__main__":
    main()
