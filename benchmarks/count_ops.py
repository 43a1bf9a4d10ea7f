"""Operations issued by one training step, per part (forward, backward, SGD, DBP step, step-size optimizer), for the
benchmark's fp / search / frozen ResNet20 (benchmarks/bench_step.py builds them).

On a GPU a small model's step is bound by how many kernels the host launches, not by the arithmetic; this counts the
leaf ``aten::`` operations of each part with ``torch.profiler`` on the CPU, a proxy for those launches that needs no
GPU. Caveats: ``_foreach_*`` operations run one op per tensor on the CPU but a few fused kernels on CUDA, and view or
no-op dtype conversions count here without launching anything, so compare modes and versions with each other, not
with a GPU trace.

    python benchmarks/count_ops.py [--batch 8] [--bf16]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import bench_step  # noqa: E402


def count(fn) -> tuple[int, Counter]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    leaf = [e for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children]
    return len(leaf), Counter(e.name for e in leaf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="under CPU bf16 autocast (as the bf16-mixed precision)")
    ap.add_argument("--top", type=int, default=0, help="also print the N most frequent ops of each part")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench_step.BATCH = args.batch
    print(f"torch {torch.__version__}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}\n")
    print("| mode | forward | backward | SGD | DBP step | step-size optimizer | total | x fp |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    fp_total = None
    tops = []
    for mode in ("fp", "search", "frozen"):
        r = bench_step.make_runner(mode, bf16=args.bf16)
        for _ in range(2):
            r.step()
        r.step_idx += 1
        if r.search is not None:
            r.search.begin_step(r.step_idx, 0.5)
        r.opt.zero_grad(set_to_none=True)
        n_fwd, c_fwd = count(lambda: r.loss(r.fwd))
        loss = r.loss(r.fwd)
        n_bwd, c_bwd = count(loss.backward)
        n_sgd, _ = count(r.opt.step)
        n_dbp, _ = count(r.search.step) if r.search is not None else (0, Counter())
        n_stp, _ = count(r.step_opt.step) if r.step_opt is not None else (0, Counter())
        total = n_fwd + n_bwd + n_sgd + n_dbp + n_stp
        fp_total = fp_total or total
        print(f"| {mode} | {n_fwd} | {n_bwd} | {n_sgd} | {n_dbp} | {n_stp} | {total} | {total / fp_total:.1f} |")
        tops.append((mode, c_fwd, c_bwd))
    for mode, c_fwd, c_bwd in tops if args.top else ():
        print(f"\n{mode} forward: {c_fwd.most_common(args.top)}\n{mode} backward: {c_bwd.most_common(args.top)}")


if __name__ == "__main__":
    main()
