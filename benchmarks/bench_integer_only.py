"""onnxruntime CPU latency of the integer-only ResNet20 against the float model and onnxruntime's own int8 PTQ.

Models (``checkpoints/resnet20_cifar10_fp.pt``; ``--calib`` real CIFAR-10 test images calibrate everything):

* ``FP``: the float model (``export_float_onnx``);
* ``int-<plan>``: the integer-only model under ``<plan>`` (``w8a8``; ``sdq2``: the SDQ plan at 1.998 average
  weight bits, 8-bit inputs; ``mixed``: weights 1..8 and inputs 2..8 bits with Clip; see
  ``tests/export/integer_helpers.py``), written by ``export_integer_onnx``;
* ``ort-ptq``: ``quantize_static`` of the FP model, QOperator, uint8 activations, int8 weights per tensor (MinMax);
  ``ort-ptq-pc``: the same with per-channel weights.

All sessions ``ORT_ENABLE_ALL`` with ``--threads`` intra-op threads, created in one process. Timing is interleaved
round robin per repeat (every model at batch 1, then every model at ``--batch``); each repeat times ``--iters`` runs
(``--batch``: ``iters // 8``, at least 2) after a warm-up; the table gives the median over ``--repeats``, the ratio
to FP and to ``ort-ptq``; a second table gives the median of the per-repeat ratios with a distribution-free 95 %
interval (the models of one repeat run within seconds of each other, so drift of the machine cancels in the
ratio). Each model's kernels are counted from one profiled run (``enable_profiling``).

    SDQ_CIFAR10_ROOT=/path/to/cifar10 python benchmarks/bench_integer_only.py [--plans w8a8,sdq2,mixed] \
        [--threads 2] [--repeats 21] [--iters 40] [--batch 128] [--no-spinning] [--out table.md]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from bench_onnx import emit_table, ort_ptq, paired_ratio, time_interleaved  # noqa: E402
from integer_helpers import PLANS, float_model, integer_model, real_images  # noqa: E402

from sdq_lightning.export import export_float_onnx  # noqa: E402
from sdq_lightning.export.integer_only import export_integer_onnx  # noqa: E402

COMPUTE = ("Conv", "FusedConv", "NhwcFusedConv", "ConvInteger", "QLinearConv", "QLinearAdd", "Add", "Gemm",
           "QGemm", "MatMulInteger", "QLinearGlobalAveragePool", "GlobalAveragePool")


def kernel_counts(path: Path, threads: int) -> dict[str, int]:
    """How many times each compute kernel ran in one profiled batch-1 run."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        so.profile_file_prefix = os.path.join(d, "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})
        events = json.loads(Path(sess.end_profiling()).read_text())
    ops = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return dict(sorted(collections.Counter(o for o in ops if o in COMPUTE).items()))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("--plans", default="w8a8,sdq2,mixed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--out", default=None)
    p.add_argument("--no-spinning", action="store_true",
                   help="intra-op threads do not spin while waiting (session.intra_op.allow_spinning=0)")
    args = p.parse_args(argv)
    plans = [s.strip() for s in args.plans.split(",") if s.strip()]
    if not plans or any(s not in PLANS for s in plans):
        raise SystemExit(f"bench_integer_only: --plans must be a subset of {PLANS}, got {args.plans!r}")
    x, _, source = real_images(args.calib + args.batch)
    if source != "CIFAR-10":
        raise SystemExit("bench_integer_only: set SDQ_CIFAR10_ROOT to the CIFAR-10 ImageFolder tree")
    calib = x[:args.calib]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths = {"FP": export_float_onnx(float_model(), d / "fp.onnx", x[:1])}
        for plan in plans:
            paths[f"int-{plan}"] = export_integer_onnx(integer_model(plan, calib), d / f"int_{plan}.onnx")
        paths["ort-ptq"] = ort_ptq(paths["FP"], d / "ort_ptq.onnx", "qop", calib.numpy())
        paths["ort-ptq-pc"] = ort_ptq(paths["FP"], d / "ort_ptq_pc.onnx", "qop", calib.numpy(), per_channel=True)
        kernels = {k: kernel_counts(v, args.threads) for k, v in paths.items()}
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        if args.no_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = {k: ort.InferenceSession(str(v), so, providers=["CPUExecutionProvider"]) for k, v in paths.items()}
    inputs = {1: x[-1:].numpy(), args.batch: x[-args.batch:].numpy()}
    samples: dict = {}
    med = time_interleaved(sess, inputs, args.repeats, args.iters, samples)
    b = args.batch
    spin = " (not spinning)" if args.no_spinning else ""
    lines = [f"onnxruntime {ort.__version__} CPU ({platform.machine()}, {os.cpu_count()} cores), intra-op threads="
             f"{args.threads}{spin}, torch {torch.__version__}, repeats={args.repeats}, iters={args.iters} (batch {b}: "
             f"{max(2, args.iters // 8)}), {datetime.date.today().isoformat()}", "",
             f"| model | b1 ms | b1 / FP | b1 / ort-ptq | b{b} ms | b{b} / FP | b{b} / ort-ptq | compute kernels "
             f"(one batch-1 run) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for k in sess:
        ks = ", ".join(f"{n} x{c}" for n, c in kernels[k].items())
        lines.append(f"| {k} | {med[(k, 1)]:.3f} | {med[(k, 1)] / med[('FP', 1)]:.2f} | "
                     f"{med[(k, 1)] / med[('ort-ptq', 1)]:.2f} | {med[(k, b)]:.2f} | "
                     f"{med[(k, b)] / med[('FP', b)]:.2f} | {med[(k, b)] / med[('ort-ptq', b)]:.2f} | {ks} |")
    lines += ["", "Per-repeat ratios (each repeat times every model back to back): median [95 % interval]", "",
              f"| model | b1 / FP | b1 / ort-ptq | b{b} / FP | b{b} / ort-ptq |", "|---|---:|---:|---:|---:|"]
    for k in sess:
        if k != "FP":
            cells = [paired_ratio(samples, k, ref, n) for n in (1, b) for ref in ("FP", "ort-ptq")]
            lines.append(f"| {k} | " + " | ".join(f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in cells) + " |")
    return emit_table(lines, args.out)


if __name__ == "__main__":
    main()
