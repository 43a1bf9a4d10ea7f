"""Training-batch cost of the in-memory CIFAR-10 loaders on CPU: per-sample torchvision transforms in a DataLoader
vs ``dataset.on_device`` (batched crop/flip/normalise where the tensors live; here the CPU).

    SDQ_CIFAR10_ROOT=/path/to/cifar10 .venv/bin/python benchmarks/bench_loader.py [--subset 5120] [--batches 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sdq_lightning.data import CIFAR10DataModule


def median_ms(loader, batches: int, warmup: int = 3) -> float:
    times, it = [], iter(loader)
    for i in range(warmup + batches):
        t0 = time.perf_counter()
        next(it)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.environ.get("SDQ_CIFAR10_ROOT"))
    ap.add_argument("--subset", type=int, default=5120)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(batch_size=args.batch_size, subset=args.subset, val_subset=args.batch_size, download=False)
    rows = []
    for label, extra in (("per-sample, num_workers=0", dict(in_memory=True, num_workers=0)),
                         ("per-sample, num_workers=2", dict(in_memory=True, num_workers=2)),
                         ("on_device (cpu)", dict(on_device=True, num_workers=0))):
        dm = CIFAR10DataModule(args.root, **kw, **extra)
        dm.setup()
        rows.append((label, median_ms(dm.train_dataloader(), args.batches)))
    print(f"CIFAR-10 train batches of {args.batch_size}, augment on, {args.threads} torch thread(s), "
          f"median of {args.batches}:")
    for label, ms in rows:
        print(f"  {label:28s} {ms:8.2f} ms/batch  ({args.batch_size / ms * 1e3:9.0f} images/s)")


if __name__ == "__main__":
    main()
