"""Exactness of the integer-only ResNet20 against onnxruntime on real CIFAR-10 test images: every intermediate code
and the logits, for each plan, onnxruntime at batch 1 and ``--batch``, 1 and 2 intra-op threads, graph optimisation
off and on.

The model: ``checkpoints/resnet20_cifar10_fp.pt`` under the plan, input quantizers calibrated by one train-mode
forward on the first ``--calib`` test images (BatchNorm statistics restored), switched to the integer-only mode
(BatchNorm folded), the new quantizers calibrated on the same images; the comparison uses the next ``--images``
test images. PyTorch's values come from ``integer_forward`` (float32 where the
accumulator bound proves it exact, float64 otherwise); onnxruntime runs the exported graph with every tensor as an
extra output.

    SDQ_CIFAR10_ROOT=/path/to/cifar10 python benchmarks/integer_only_exactness.py [--images 1000] \
        [--plans w8a8,w4a8,mixed,sdq2] [--batch 128] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from bench_onnx import emit_table  # noqa: E402
from integer_helpers import PLANS, integer_model, ort_codes, real_images, torch_codes  # noqa: E402

from sdq_lightning.export.integer_only import export_integer_onnx  # noqa: E402


def compare(model, path: Path, x: np.ndarray, configs: list[tuple[int, int, bool]], chunk: int) -> dict:
    """Per onnxruntime configuration: codes compared, codes differing, tensors with a difference, logits equal."""
    import torch

    out = {c: {"codes": 0, "differ": 0, "tensors": set(), "logits_equal": True, "images": 0} for c in configs}
    for i in range(0, len(x), chunk):
        xs = x[i:i + chunk]
        logits, codes = torch_codes(model, torch.from_numpy(xs))
        for c in configs:
            batch, threads, optimize = c
            got = ort_codes(path, xs, batch, threads, optimize)
            r = out[c]
            r["images"] += len(xs)
            for k, v in codes.items():
                d = int((got[k] != v).sum())
                r["codes"] += v.size
                r["differ"] += d
                if d:
                    r["tensors"].add(k)
            r["logits_equal"] &= bool(np.array_equal(got["logits"], logits))
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000, help="test images compared")
    p.add_argument("--calib", type=int, default=256, help="test images used to calibrate (not compared)")
    p.add_argument("--plans", default="w8a8,w4a8,mixed,sdq2")
    p.add_argument("--batch", type=int, default=128, help="onnxruntime's batch besides 1")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    plans = [s.strip() for s in args.plans.split(",") if s.strip()]
    bad = [s for s in plans if s not in PLANS]
    if bad or not plans:
        raise SystemExit(f"integer_only_exactness: --plans must be a subset of {PLANS}, got {args.plans!r}")
    x, _, source = real_images(args.calib + args.images)
    if source != "CIFAR-10":
        raise SystemExit("integer_only_exactness: set SDQ_CIFAR10_ROOT to the CIFAR-10 ImageFolder tree")
    calib, test = x[:args.calib], x[args.calib:].numpy()
    configs = [(b, t, o) for b in (1, args.batch) for t in (1, 2) for o in (False, True)]
    lines = [f"onnxruntime {ort.__version__}, {len(test)} CIFAR-10 test images (after {len(calib)} calibration "
             f"images), {datetime.date.today().isoformat()}", "",
             "| plan | ORT batch | threads | graph opt | codes compared | codes differing | logits identical |",
             "|---|---:|---:|---|---:|---:|---|"]
    for plan in plans:
        t0 = time.perf_counter()
        model = integer_model(plan, calib)
        with tempfile.TemporaryDirectory() as d:
            path = export_integer_onnx(model, Path(d) / f"{plan}.onnx", intermediates=True)
            res = compare(model, path, test, configs, args.batch)
        for (b, t, o), r in res.items():
            lines.append(f"| {plan} | {b} | {t} | {'on' if o else 'off'} | {r['codes']:,} | {r['differ']:,}"
                         f"{' (' + ', '.join(sorted(r['tensors'])[:3]) + ')' if r['tensors'] else ''} | "
                         f"{'yes' if r['logits_equal'] else 'NO'} |")
        print(f"{plan}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return emit_table(lines, args.out)


if __name__ == "__main__":
    main()
