"""How each searched layer's weight step compares with the weights it quantizes while a user network is trained from
scratch with the README's SDQ line (issue 26): at every level change, and every 40 steps, the step of the lower width
of the live pair (the frozen width after the search) against LSQ's rule and the least-squares rule on the layer's
current weight, and mean|w|. Shows how far the weights move from the ones a width's step was set from.

    OMP_NUM_THREADS=1 python experiments/step_trace.py --cifar10 <root> [--body rgb_vgg] [--seed 0]
        [--step-init lsq|mse|mse_all] [--step-follow] [--lookahead N]

Prints one row per record and the test accuracy and plan at the end (the run of experiments/user_networks.py with
the same options and seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
import user_networks as un  # noqa: E402  (also puts tests/ on the path)

from sdq_lightning.quantizers.functional import weight_step_init, weight_step_mse  # noqa: E402
from sdq_lightning.surgery import quant_layers  # noqa: E402


class StepTrace(L.Callback):
    def __init__(self, every: int = 40) -> None:
        self.every, self.last, self.rows = every, {}, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step
        for name, layer in quant_layers(pl_module).items():
            q = layer.weight_quant
            if q is None or len(q.candidates) == 1:
                continue
            state = (q.current_level, q.frozen_at)
            if self.last.get(name) == state and step % self.every:
                continue
            self.last[name] = state
            w = layer.weight.detach()
            i = q.frozen_at if q.frozen else max(q.current_level - 1, 0)
            b = q.candidates[i]
            self.rows.append((step, name, "frozen" if q.frozen else f"{q.candidates[q.current_level]}/{b}", b,
                              float(q.steps[i]), float(weight_step_init(w, b)), float(weight_step_mse(w, b)),
                              float(w.abs().mean())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar10", help="a CIFAR-10 ImageFolder root (train/, test/); without it: digits")
    ap.add_argument("--body", help="the network (default: rgb_vgg with --cifar10, else cnn_bn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lookahead", type=int, help="search.lookahead_levels (default: the library's)")
    ap.add_argument("--step-init", choices=["lsq", "mse", "mse_all"], help="layers.step_init (default: the library's)")
    ap.add_argument("--step-follow", action="store_true", help="layers.step_follow")
    args = ap.parse_args()
    body = args.body or ("rgb_vgg" if args.cifar10 else "cnn_bn")
    loaders = un.CifarLoaders(args.cifar10, 5000) if args.cifar10 else un.Loaders()
    trace = StepTrace()
    acc, bits, plan = un.fit(body, args.seed, args.epochs, False, loaders, args.lookahead, args.step_init,
                             args.step_follow, callbacks=[trace])
    print("| step | layer | live pair (bits) | width | its step | LSQ rule now | least-squares now | mean abs w |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for step, name, pair, b, s, lsq, mse, wabs in trace.rows:
        print(f"| {step} | {name} | {pair} | {b} | {s:.4f} | {lsq:.4f} | {mse:.4f} | {wabs:.4f} |")
    print(f"\ntest accuracy {100 * acc:.2f} %, avg bits {bits:.3f}, plan {plan}")


if __name__ == "__main__":
    main()
