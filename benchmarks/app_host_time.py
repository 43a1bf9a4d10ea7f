"""Host time of one Lightning training step, per hook: where the app spends the time that a GPU waits for.

On a GPU a ResNet20 step is bound by the host (docs/RESULTS.md 17-18): what sets the pace is the Python and dispatch
time of every hook, not the arithmetic. This measures that time on the CPU with inputs so small (``--size 8``, batch
2) that the arithmetic is negligible, so the figures are host time. Runs, each timed after ``--skip`` warm-up steps
of its epoch:

* ``loop``: a plain PyTorch loop (forward, cross-entropy, backward, SGD) on the same network: the floor;
* ``fp``: the FP ``SDQClassifier`` through a Lightning Trainer;
* ``sdq search`` / ``sdq frozen``: the SDQ callback (weights 1..8 bits under avg_bits <= 1.93, FP activations, KD from
  an FP teacher and EBR 0.1 in phase 2), as the paper row runs it.

Per step it prints the wall time between consecutive batch starts (median) and the time inside each Lightning hook
(a profiler that times every hook Lightning calls; nested hooks are attributed to the innermost). Under CUDA graphs
the network's ``training_step`` + ``backward`` replay as two launches; the rest stays on the host as measured here.

    python benchmarks/app_host_time.py [--batch 2 --size 8 --steps 30 --skip 5 --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from count_app_ops import HookProfiler, hook_name  # noqa: E402

from sdq_lightning import SDQ, SDQClassifier  # noqa: E402

NETWORK = ("Strategy.training_step", "Strategy.backward")  # what CUDA graphs replay


class _HookTimes(HookProfiler):
    """Times every Lightning action (hook); a nested action's time is taken out of its parent's."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.times: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    @contextmanager
    def profile(self, action_name: str):  # noqa: D102
        frame = [action_name, time.perf_counter(), 0.0]  # name, start, time of nested actions
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            if self._stack:
                self._stack[-1][2] += total
            if self.on:
                self.times[hook_name(action_name)] += total - frame[2]


class _Window(pl.Callback):
    """Opens the profiler's window at step ``skip`` of every epoch and records the wall time between batch starts."""

    def __init__(self, prof: _HookTimes, skip: int) -> None:
        self.prof, self.skip = prof, skip
        self.per_epoch: dict[int, tuple[list[float], dict[str, float]]] = {}
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        now = time.perf_counter()
        walls, _ = self.per_epoch.setdefault(trainer.current_epoch, ([], {}))
        if batch_idx > self.skip and self._last is not None:
            walls.append(now - self._last)
        if batch_idx == self.skip:
            self.prof.times.clear()
            self.prof.on = True
        self._last = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        # the last step's time ends at its batch end; the hooks of the epoch end are not part of a step
        self.prof.on = False
        walls, hooks = self.per_epoch[trainer.current_epoch]
        hooks.update(self.prof.times)
        self._last = None


def _data(batch: int, size: int, steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = batch * steps
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


def run_app(args, sdq: bool) -> dict[int, tuple[list[float], dict[str, float]]]:
    pl.seed_everything(0, verbose=False)
    data = _data(args.batch, args.size, args.skip + args.steps + 1)
    model = SDQClassifier("resnet20", lr=0.05)
    prof = _HookTimes()
    window = _Window(prof, args.skip)
    callbacks: list = [window]
    epochs = 1
    if sdq:
        callbacks.append(SDQ(weight_bits=tuple(range(1, 9)), activation_bits=None, search_epochs=1,
                             budget={"metric": "avg_bits", "target": 1.93}, teacher=copy.deepcopy(model),
                             ebr={"weight": 0.1}, runtime={"guard": False, "kernels": "eager"}))
        epochs = 2
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, precision=args.precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         profiler=prof, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    return window.per_epoch


def run_loop(args) -> list[float]:
    pl.seed_everything(0, verbose=False)
    data = _data(args.batch, args.size, args.skip + args.steps + 1)
    model = SDQClassifier("resnet20", lr=0.05).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    bf16 = args.precision.startswith("bf16")
    walls, last = [], None
    for i, (x, y) in enumerate(DataLoader(data, batch_size=args.batch)):
        now = time.perf_counter()
        if i > args.skip and last is not None:
            walls.append(now - last)
        last = now
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=8, help="image side (small: the arithmetic is negligible)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per epoch")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps per epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bf16-mixed", choices=("32", "bf16-mixed"))
    ap.add_argument("--top", type=int, default=10, help="hooks listed per run (by time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loop = run_loop(args)
    fp = run_app(args, sdq=False)[0]
    sdq = run_app(args, sdq=True)
    runs = {"fp": fp, "sdq search": sdq[0], "sdq frozen (KD + EBR)": sdq[1]}
    base = statistics.median(loop)
    print(f"torch {torch.__version__}, ResNet20, batch {args.batch}, {args.size}x{args.size} inputs, "
          f"precision {args.precision}, {args.threads} thread(s); median over {args.steps} steps after {args.skip}\n")
    print("| run | ms per step (median) | x loop | mean | network: training_step + backward | other hooks | "
          "outside the hooks |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| plain loop | {base * 1e3:.2f} | 1.00 | {statistics.mean(loop) * 1e3:.2f} | - | - | - |")
    for name, (walls, hooks) in runs.items():
        n, steps = max(len(walls), 1), len(walls) + 1  # the hooks of steps skip .. end; the walls between them
        mean = sum(walls) / n
        net = sum(v for k, v in hooks.items() if k in NETWORK) / steps
        other = sum(v for k, v in hooks.items() if k not in NETWORK) / steps
        print(f"| {name} | {statistics.median(walls) * 1e3:.2f} | {statistics.median(walls) / base:.2f} | "
              f"{mean * 1e3:.2f} | {net * 1e3:.2f} | {other * 1e3:.2f} | {(mean - net - other) * 1e3:.2f} |")
    print("\nThe last three columns split the mean step. Weight-sized work (the optimizers, EBR, the batched weight "
          "pass) is real CPU arithmetic at any batch (ResNet20 has 0.27M weights); on a GPU it is a few "
          "microseconds per kernel.")
    for name, (walls, hooks) in runs.items():
        steps = len(walls) + 1
        top = sorted(((k, v) for k, v in hooks.items() if k not in NETWORK), key=lambda kv: -kv[1])[:args.top]
        print(f"\n{name} (ms per step): " + ", ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in top))


if __name__ == "__main__":
    main()
