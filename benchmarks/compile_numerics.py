"""Whole-model ``torch.compile`` (inductor, ``fullgraph=True``) against eager: one training step's loss and gradients
for the benchmark's fp / search / frozen ResNet20 (benchmarks/bench_step.py builds them), same weights and draws.

The unit tests check that the compiled graph equals eager exactly through AOT autograd (``aot_eager``); this checks
the real backend, whose fused kernels reassociate float arithmetic: the loss should agree to rounding, while
gradients that are sums of cancelling terms (LSQ step sizes, DBPs) can differ by their own size. The fp row is the
reference for what compilation alone does to a gradient. Compiling the searched model takes minutes on a small CPU.

    python benchmarks/compile_numerics.py [--modes fp,frozen,search] [--batch 16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="fp,frozen,search")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    args = ap.parse_args()
    bench_step.BATCH, bench_step.DEVICE = args.batch, args.device
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    print(f"torch {torch.__version__}, {args.device}, batch {args.batch}, torch.compile(mode={args.mode!r}, "
          "fullgraph=True) vs eager\n")
    print("| model | eager loss | compiled loss | rel. loss diff | worst rel. grad diff (parameter) | median rel. grad "
          "diff | compile s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for mode in args.modes.split(","):
        model = bench_step.build(mode)
        twin = copy.deepcopy(model)
        t0 = time.perf_counter()
        comp = torch.compile(twin, mode=None if args.mode == "default" else args.mode, fullgraph=True)
        lc = F.cross_entropy(comp(x), y)
        lc.backward()
        took = time.perf_counter() - t0
        le = F.cross_entropy(model(x), y)
        le.backward()
        rows = []
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            if a.grad is not None and b.grad is not None:
                rows.append((float((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)), name))
        rows.sort()
        worst, median = rows[-1], rows[len(rows) // 2][0]
        rel = abs(float(le) - float(lc)) / abs(float(le))
        print(f"| {mode} | {float(le):.6f} | {float(lc):.6f} | {rel:.1e} | {worst[0]:.2e} ({worst[1]}) | "
              f"{median:.1e} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
