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


# leaf ops that launch no kernel on a GPU: allocation, views and metadata, a ``to`` that is a no-op (a real
# conversion shows up as its ``copy_`` child), a CPU scalar
NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::as_strided", "aten::as_strided_", "aten::view",
             "aten::resize_", "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias", "aten::detach",
             "aten::alias", "aten::t", "aten::transpose", "aten::expand", "aten::unsqueeze", "aten::squeeze",
             "aten::select", "aten::slice", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::permute",
             "aten::_unsafe_view", "aten::lift_fresh", "aten::scalar_tensor", "aten::to", "aten::reshape",
             "aten::narrow", "aten::view_as", "aten::unflatten", "aten::flatten", "aten::contiguous",
             "aten::set_", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided"}
COMPUTE = "compute"  # report the leaf ops that launch work (the default), or every leaf op ("all")


def _works(e) -> bool:
    return (e.name.startswith("aten::") and e.name not in NO_LAUNCH) or any(_works(c) for c in e.cpu_children)


def _launching(e, out: list) -> None:
    """The ops under ``e`` that launch work themselves: not in NO_LAUNCH and no callee that works (a convolution
    whose only callees allocate its output counts; ``to`` counts through its ``copy_``). A ``_foreach_*`` op counts
    once, as on CUDA, where it is one multi-tensor kernel per chunk of tensors (the CPU runs it per tensor)."""
    if e.name.startswith("aten::_foreach_"):
        out.append(e)
        return
    children = [c for c in e.cpu_children if _works(c)]
    if not children:
        if e.name.startswith("aten::") and e.name not in NO_LAUNCH:
            out.append(e)
        return
    for c in children:
        _launching(c, out)


def count(fn) -> tuple[int, Counter]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    if COMPUTE == "compute":
        ops: list = []
        for e in prof.events():
            if e.cpu_parent is None:
                _launching(e, ops)
    else:
        ops = [e for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children]
    return len(ops), Counter(e.name for e in ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="under CPU bf16 autocast (as the bf16-mixed precision)")
    ap.add_argument("--top", type=int, default=0, help="also print the N most frequent ops of each part")
    ap.add_argument("--ops", choices=("compute", "all"), default="compute",
                    help="count the ops that launch work, a _foreach_ op once (default: allocations, views and "
                         "no-op conversions left out), or every leaf op (the count of docs/RESULTS.md sections "
                         "17-18)")
    ap.add_argument("--act-bits", type=int, default=4, help="activation bits of the quantized models (0: FP)")
    ap.add_argument("--model", default="resnet20", help="timm model (32x32 inputs, 10 classes)")
    args = ap.parse_args()
    global COMPUTE
    COMPUTE = args.ops
    torch.set_num_threads(1)
    bench_step.BATCH = args.batch
    bench_step.ACT_BITS = args.act_bits or None
    bench_step.MODEL = args.model
    print(f"torch {torch.__version__}, {args.model}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.act_bits or 'FP'} activation bits, {args.ops} leaf ops\n")
    print("| mode | forward | backward | SGD | draw set-up + DBP step | step-size optimizer | total | x fp | "
          "EBR + its gradient (app, phase 2; not in total) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fp_total = None
    tops = []
    for mode in bench_step.modes_for("eager", "both"):
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
        if r.search is not None:
            n_dbp += count(lambda: r.search.begin_step(r.step_idx, 0.5))[0]
        n_stp, _ = count(r.step_opt.step) if r.step_opt is not None else (0, Counter())
        total = n_fwd + n_bwd + n_sgd + n_dbp + n_stp
        fp_total = fp_total or total
        ebr = "-"
        if mode.startswith("frozen"):  # the app adds EBR's gradient eagerly every phase-2 step (ebr_weight > 0)
            import sdq_lightning as sq
            from sdq_lightning.losses import EntropyBinRegularizer

            layers = [m for m in sq.quant_layers(r.model).values() if m.weight_quant is not None]
            reg = EntropyBinRegularizer()
            fn = reg.per_layer if bench_step.PL in mode else reg
            ebr = str(count(lambda: torch.autograd.grad(fn(layers), [m.weight for m in layers]))[0])
        print(f"| {mode} | {n_fwd} | {n_bwd} | {n_sgd} | {n_dbp} | {n_stp} | {total} | {total / fp_total:.1f} | "
              f"{ebr} |")
        tops.append((mode, c_fwd, c_bwd))
    for mode, c_fwd, c_bwd in tops if args.top else ():
        print(f"\n{mode} forward: {c_fwd.most_common(args.top)}\n{mode} backward: {c_bwd.most_common(args.top)}")


if __name__ == "__main__":
    main()
