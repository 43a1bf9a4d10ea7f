"""onnxruntime CPU latency of ResNet20: FP ONNX vs our exports vs onnxruntime's own int8 PTQ, batch 1 and 128.

Models: timm ``resnet20`` (10 classes) in FP, and the same network with a BitPlan applied (``--plan mixed``: weight
bits cycling 1..8 and input bits cycling 8,2..7 over the 22 layers, as in the export tests; ``w8a8``; ``w4a4``;
``wonly``: the mixed weight bits with FP activations), activation quantizers calibrated by one train-mode forward on
real digits images. In one process, all with ``ORT_ENABLE_ALL`` and ``--threads`` intra-op threads:

* ``FP``: the float model (``export_float_onnx``);
* ``int8``: ``export_onnx(form="int8")``, the default (integer kernels, exact);
* ``int8-fused``: ``export_onnx(form="int8", fuse_tolerance=inf, float_output_kernel="float")`` (QLinearConv chains,
  float kernels for float outputs; not bit-exact at low bits);
* ``qdq``: ``export_onnx(form="qdq")`` (int2/int4/int8 QDQ, what the export wrote before);
* ``ort-qdq`` / ``ort-qop``: onnxruntime's ``quantize_static`` of the FP model (int8 weights, uint8 activations,
  per-tensor, MinMax calibration on 128 digits images), QDQ and QOperator formats.

Runs are interleaved round robin per repeat (every model at batch 1, then every model at batch 128); each repeat
times ``--iters`` runs (batch 128: ``iters // 8``) after warm-up. The table gives the median over ``--repeats`` and the
ratio to FP; it is printed and written to ``--out`` (markdown) if given. Top-1 agreement of each export with the
PyTorch fake-quantized model is measured on 256 digits images.

    python benchmarks/bench_onnx.py [--plan mixed|w8a8|w4a4|wonly] [--threads 2] [--repeats 15] [--iters 20]
        [--out table.md] [--models FP,int8,...]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn

import sdq_lightning  # noqa: F401
from sdq_lightning import BitPlan, LayerBits
from sdq_lightning.export import export_float_onnx, export_onnx, run_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from export_helpers import digits_images, mixed_bits  # noqa: E402

MODELS = ("FP", "int8", "int8-fused", "qdq", "ort-qdq", "ort-qop")


def build(plan_kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fp = timm.create_model("resnet20", pretrained=False, num_classes=10).eval()
    q = timm.create_model("resnet20", pretrained=False, num_classes=10)
    q.load_state_dict(fp.state_dict())
    names = [n for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if plan_kind in ("mixed", "wonly"):
        w, a = mixed_bits(q)
        if plan_kind == "wonly":
            a = {n: None for n in names}
    else:
        b = {"w8a8": 8, "w4a4": 4}[plan_kind]
        w = a = {n: b for n in names}
    BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}).apply(q)
    x, _ = digits_images(256)
    q.train()
    with torch.no_grad():
        q(x[:128])
    return fp, q.eval()


def ort_ptq(fp_path: Path, out: Path, fmt: str, calib: np.ndarray, per_channel: bool = False) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    pre = out.with_name(out.stem + "_pre.onnx")
    if not pre.exists():
        quant_pre_process(str(fp_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def time_interleaved(sessions: dict, inputs: dict[int, np.ndarray], repeats: int, iters: int,
                     samples: dict | None = None) -> dict[tuple[str, int], float]:
    """Median ms per run of every session at every batch size, timed round robin per repeat (every session at the
    smallest batch, then every session at the next); each repeat times ``iters`` runs at batch 1 (``iters // 8``, at
    least 2, at larger batches) after a warm-up of 3. ``samples``: filled with the per-repeat times of every cell."""
    cells = [(k, b) for b in sorted(inputs) for k in sessions]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for k, b in cells:  # warm-up
        for _ in range(3):
            sessions[k].run(None, {"input": inputs[b]})
    for _ in range(repeats):
        for k, b in cells:
            n = iters if b == 1 else max(2, iters // 8)
            t0 = time.perf_counter()
            for _ in range(n):
                sessions[k].run(None, {"input": inputs[b]})
            times[(k, b)].append((time.perf_counter() - t0) / n * 1e3)
    if samples is not None:
        samples.update(times)
    return {c: statistics.median(v) for c, v in times.items()}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median and a distribution-free ``level`` interval for it (order statistics of the binomial(n, 1/2)
    ranks; the whole range when n is too small for that level)."""
    v, n = sorted(values), len(values)
    cdf, j = 0.0, 0
    while j < n and cdf + math.comb(n, j) / 2 ** n <= (1 - level) / 2:
        cdf += math.comb(n, j) / 2 ** n
        j += 1
    lo, hi = (v[j - 1], v[n - j]) if j > 0 else (v[0], v[-1])
    return statistics.median(v), lo, hi


def paired_ratio(samples: dict, a: str, b: str, batch: int) -> tuple[float, float, float]:
    """Median and 95 % interval of ``a``'s time over ``b``'s within the same repeat (both timed minutes apart at
    most, so machine drift cancels where it hits both)."""
    return median_interval([x / y for x, y in zip(samples[(a, batch)], samples[(b, batch)])])


def emit_table(lines: list[str], out: str | None) -> str:
    """Print the markdown lines and write them to ``out`` (when given); returns the text."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
    return table


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", default="mixed", choices=["mixed", "w8a8", "w4a4", "wonly"])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (0: onnxruntime's default)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS} (FP first)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models or models[0] != "FP":
        raise SystemExit(f"bench_onnx: --models must start with FP and be a subset of {MODELS}, got {args.models!r}")
    fp, q = build(args.plan)
    x1 = torch.randn(1, 3, 32, 32)
    xd, _ = digits_images(512)
    calib, xagree = xd[:128].numpy(), xd[-256:]
    with torch.no_grad():
        ref = q(xagree).numpy()
        ref_fp = fp(xagree).numpy()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths: dict[str, Path] = {"FP": export_float_onnx(fp, d / "fp.onnx", x1)}
        for m in models:
            if m == "int8":
                paths[m] = export_onnx(q, d / "int8.onnx", x1, form="int8")
            elif m == "int8-fused":
                paths[m] = export_onnx(q, d / "int8f.onnx", x1, form="int8", fuse_tolerance=float("inf"),
                                       float_output_kernel="float")
            elif m == "qdq":
                paths[m] = export_onnx(q, d / "qdq.onnx", x1, form="qdq")
            elif m.startswith("ort-"):
                paths[m] = ort_ptq(paths["FP"], d / f"{m}.onnx", m[4:], calib)
        sizes = {k: v.stat().st_size for k, v in paths.items()}
        agree = {}
        for k, v in paths.items():
            got = run_onnx(v, xagree)
            r = ref_fp if k == "FP" or k.startswith("ort-") else ref
            agree[k] = (float((got.argmax(1) == r.argmax(1)).mean()), float(np.abs(got - r).max()))
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sess = {k: ort.InferenceSession(str(v), opts, providers=["CPUExecutionProvider"]) for k, v in paths.items()}
    inputs = {1: np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32),
              128: np.random.default_rng(1).standard_normal((128, 3, 32, 32), dtype=np.float32)}
    med = time_interleaved({k: sess[k] for k in models}, inputs, args.repeats, args.iters)
    lines = [f"onnxruntime {ort.__version__} CPU ({platform.machine()}), intra-op threads={args.threads or 'default'}, "
             f"resnet20 plan={args.plan}, repeats={args.repeats}, iters={args.iters} (batch 128: "
             f"{max(2, args.iters // 8)}), {datetime.date.today().isoformat()}", "",
             "| model | ONNX bytes | top-1 agree | max abs diff | b1 ms | b1 / FP | b128 ms | b128 / FP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in models:
        lines.append(f"| {k} | {sizes[k]:,} | {agree[k][0]:.2%} | {agree[k][1]:.3g} | {med[(k, 1)]:.3f} | "
                     f"{med[(k, 1)] / med[('FP', 1)]:.2f} | {med[(k, 128)]:.2f} | "
                     f"{med[(k, 128)] / med[('FP', 128)]:.2f} |")
    lines += ["", "top-1 agree / max abs diff: ours vs the PyTorch fake-quantized model, FP and ort-* vs the PyTorch "
              "FP model, on 256 digits images."]
    return emit_table(lines, args.out)


if __name__ == "__main__":
    main()
