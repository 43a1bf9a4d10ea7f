"""Overhead of the SDQ callback machinery (hooks, draws, penalty, level drops, logging) over the same quantized model
trained without the callback.

Both arms train ResNet20 (weights searched in 1..8, 4-bit activations) with the same Lightning Trainer, batch 128,
on CPU. Arm "plain": the model is quantized by hand (``quantize_model``) and its quantizer parameters simply sit in
the optimizer; sampling still happens inside the quantizers. Arm "callback": the SDQ callback does the surgery, the
private optimizers, the per-step temperature/draw setting, the budget penalty and logging. Phase-2 arms compare a
frozen plan with and without the callback, once with EBR off (the machinery alone) and once with EBR on (EBR is
a loss term of the method, reported for information; no teacher: KD's teacher forward is method cost too).
Arms are interleaved; each repeat times ``--steps`` steps after a warm-up; medians and ratios are printed.
``--kernels`` picks the LSQ kernels of every arm (default ``compile``, the app's default).

    python benchmarks/bench_callback_overhead.py [--steps 12 --repeats 5 --data-root PATH_TO_CIFAR10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import sdq_lightning as sq
from sdq_lightning import SDQ, SDQClassifier


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def load_batch(root: str | None, n: int = 128) -> tuple[torch.Tensor, torch.Tensor, str]:
    if root:
        from torchvision import datasets, transforms

        ds = datasets.ImageFolder(f"{root}/train", transform=transforms.ToTensor())
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
        xs, ys = zip(*(ds[int(i)] for i in idx))
        return torch.stack(xs), torch.tensor(ys), "real CIFAR-10 images"
    return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), "random tensors (no --data-root)"


def run(arm: str, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(x.repeat(steps + warmup, 1, 1, 1), y.repeat(steps + warmup)), batch_size=len(x))
    module = SDQClassifier("resnet20", num_classes=10, lr=0.05, scheduler="none")
    timer = StepTimer(warmup)
    callbacks: list[Callback] = [timer]
    budget = {"metric": "avg_bits", "target": 2.0}
    if arm == "search/callback":
        callbacks.insert(0, SDQ(activation_bits=4, budget=budget, search_epochs=1, ebr={"weight": 0.1}))
    elif arm == "search/plain":
        sq.quantize_model(module, sq.QuantSpec(activation_bits=4))
    else:
        plan_model = timm.create_model("resnet20", num_classes=10)
        prof = sq.profile_model(plan_model, x[:1])
        sq.quantize_model(plan_model, sq.QuantSpec(activation_bits=4))
        cm = sq.CostModel(plan_model, prof)
        bits = sq.project_to_budget(cm, cm.current_bits(), sq.Budget(**budget))
        plan = sq.BitPlan.from_model(plan_model, profile=prof).with_bits(bits)
        if arm.startswith("frozen/callback"):
            callbacks.insert(0, SDQ(activation_bits=4, plan=plan, ebr={"weight": 0.1 if arm.endswith("+ebr") else 0.0}))
        else:
            plan.rebased(module).apply(module)
    trainer = L.Trainer(max_epochs=2 if arm == "search/callback" else 1, limit_train_batches=steps + warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, accelerator="cpu", num_sanity_val_steps=0,
                        default_root_dir=tempfile.mkdtemp(prefix="sdq_bench_"))
    trainer.fit(module, data)
    times = timer.times[-steps:]  # search/callback: the second epoch is phase 2, so time the first epoch only
    if arm == "search/callback":
        times = timer.times[:steps]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--kernels", choices=sq.modules.fused.KERNELS, default="compile")
    args = parser.parse_args()
    sq.set_kernels(args.kernels)
    x, y, what = load_batch(args.data_root)
    arms = ["search/plain", "search/callback", "frozen/plain", "frozen/callback", "frozen/callback+ebr"]
    results: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            results[arm].append(run(arm, x, y, args.steps, args.warmup))
            print(f"repeat {r} {arm}: {results[arm][-1] * 1e3:.1f} ms/step", flush=True)
    med = {a: statistics.median(v) for a, v in results.items()}
    print(f"\nResNet20, batch 128, CPU threads {torch.get_num_threads()}, {args.kernels} LSQ kernels, data: {what}, "
          f"{args.repeats} interleaved repeats x {args.steps} steps (median of medians)")
    print("| arm | ms/step | callback / plain |\n|---|---:|---:|")
    for phase in ("search", "frozen"):
        p, c = med[f"{phase}/plain"], med[f"{phase}/callback"]
        print(f"| {phase}, no callback | {p * 1e3:.1f} | |")
        print(f"| {phase}, SDQ callback | {c * 1e3:.1f} | {c / p:.3f} |")
    e = med["frozen/callback+ebr"]
    print(f"| frozen, SDQ callback with EBR 0.1 (method cost included) | {e * 1e3:.1f} | {e / med['frozen/plain']:.3f} |")


if __name__ == "__main__":
    main()
