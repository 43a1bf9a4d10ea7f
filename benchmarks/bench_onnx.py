"""onnxruntime CPU latency: the exported QDQ ResNet20 vs the FP ONNX ResNet20, batch 1 and 128.

Models: timm ``resnet20`` (10 classes) in FP, and the same network with a BitPlan applied (``--plan mixed``: weight
bits cycling 1..8 and input bits cycling 8,2..7 over the 22 layers, as in the export tests; ``--plan w8a8``; or
``--plan w4a4``), activation quantizers calibrated by one train-mode forward on real digits images, exported with
``sdq_lightning.export.export_onnx`` (opset 25, int2/int4/int8 QDQ). Both run in one process with default
``ORT_ENABLE_ALL`` optimisation, interleaved round robin (FP b1, QDQ b1, FP b128, QDQ b128, ...); each repeat times
``--iters`` runs after warm-up, the median over ``--repeats`` repeats is reported with the ratio QDQ / FP.

    python benchmarks/bench_onnx.py [--repeats 15] [--iters 20] [--threads N] [--plan mixed|w8a8|w4a4]
"""

from __future__ import annotations

import argparse
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


def build(plan_kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fp = timm.create_model("resnet20", pretrained=False, num_classes=10).eval()
    q = timm.create_model("resnet20", pretrained=False, num_classes=10)
    q.load_state_dict(fp.state_dict())
    if plan_kind == "mixed":
        w, a = mixed_bits(q)
    else:
        b = {"w8a8": 8, "w4a4": 4}[plan_kind]
        names = [n for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        w = a = {n: b for n in names}
    BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}).apply(q)
    x, _ = digits_images(256)
    q.train()
    with torch.no_grad():
        q(x[:128])
    return fp, q.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    p.add_argument("--plan", default="mixed", choices=["mixed", "w8a8", "w4a4"])
    args = p.parse_args()
    fp, q = build(args.plan)
    x1 = torch.randn(1, 3, 32, 32)
    with tempfile.TemporaryDirectory() as d:
        paths = {"FP": export_float_onnx(fp, Path(d) / "fp.onnx", x1),
                 "QDQ": export_onnx(q, Path(d) / "q.onnx", x1)}
        sizes = {k: v.stat().st_size for k, v in paths.items()}
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sess = {k: ort.InferenceSession(str(v), opts, providers=["CPUExecutionProvider"]) for k, v in paths.items()}
        xd, _ = digits_images(128)
        with torch.no_grad():
            agree = float((run_onnx(paths["QDQ"], xd).argmax(1) == q(xd).numpy().argmax(1)).mean())
    inputs = {1: np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32),
              128: np.random.default_rng(1).standard_normal((128, 3, 32, 32), dtype=np.float32)}
    cells = [(k, b) for b in (1, 128) for k in ("FP", "QDQ")]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for k, b in cells:  # warm-up
        for _ in range(3):
            sess[k].run(None, {"input": inputs[b]})
    for _ in range(args.repeats):
        for k, b in cells:
            iters = args.iters if b == 1 else max(2, args.iters // 8)
            t0 = time.perf_counter()
            for _ in range(iters):
                sess[k].run(None, {"input": inputs[b]})
            times[(k, b)].append((time.perf_counter() - t0) / iters * 1e3)
    print(f"onnxruntime {ort.__version__} CPU, threads={args.threads or 'default'}, resnet20 plan={args.plan}, "
          f"repeats={args.repeats}; ONNX file sizes: FP {sizes['FP']:,} B, QDQ {sizes['QDQ']:,} B; "
          f"QDQ vs PyTorch top-1 agreement on 128 digits: {agree:.2%}")
    print("| batch | FP ms (median) | QDQ ms (median) | QDQ / FP | FP ms (min) | QDQ ms (min) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in (1, 128):
        f, qd = statistics.median(times[("FP", b)]), statistics.median(times[("QDQ", b)])
        print(f"| {b} | {f:.3f} | {qd:.3f} | {qd / f:.2f} | {min(times[('FP', b)]):.3f} | "
              f"{min(times[('QDQ', b)]):.3f} |")


if __name__ == "__main__":
    main()
