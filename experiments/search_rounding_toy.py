"""How fractional the search ends, and what the freeze's rounding does about it, on a synthetic task signal.

ResNet20's 20 searched layers (weights 1..8 bits, avg_bits <= 2.0, FP activations, the ``ste`` estimator) run the
default dual controller for ``--steps`` steps (default 1170: three CIFAR-10 epochs at batch 128, as on the GPU in
docs/RESULTS.md section 18) with a synthetic task gradient on each live DBP: a fixed per-layer loss slope (uniform in
[-1, 0]: more bits lower the loss) plus Gaussian noise of ``noise`` times the mean slope. No data, no training: this
isolates the controller and the freeze. For each run it prints the expected bits at the end, how many layers are
undecided (top probability < 0.9), and for both roundings (``argmax``: each live DBP at 0.5; ``budget``: by
decreasing DBP within the budget) the decided plan's bits, the plan after the projection, and how many layers the
projection and the rounding changed.

    python experiments/search_rounding_toy.py [--steps 1170] [--noise 0 3 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

import timm
import torch

import sdq_lightning as sq
from sdq_lightning.core.search import BitSearch


def run(steps: int, noise: float, seed: int, settle: bool) -> str:
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    prof = sq.profile_model(model, torch.randn(1, 3, 32, 32))
    sq.quantize_model(model, sq.QuantSpec(weight_bits=tuple(range(1, 9)), activation_bits=None, estimator="ste"))
    cm = sq.CostModel(model, prof)
    search = BitSearch(cm, sq.Budget("avg_bits", 2.0), settle=settle)
    search.start(steps_per_epoch=steps, search_epochs=1)
    gen = torch.Generator().manual_seed(seed)
    slope = -torch.rand(len(search.quantizers), generator=gen)
    scale = abs(float(slope.mean()))
    for t in range(steps):
        search.begin_step(t, 1.0)
        for i, q in enumerate(search.quantizers):
            grad = torch.zeros_like(q.dbp)
            grad[int(q.level)] = slope[i] + noise * scale * torch.randn((), generator=gen)
            q.dbp.grad = grad
        search.step()
    undecided = sum(int(q.probabilities().detach().max() < 0.9) for q in search.quantizers)
    cells = []
    for rounding in ("argmax", "budget"):
        search.rounding = rounding
        decided, plan, expected = search.freeze_bits()
        changed = sum(int(decided[k] != plan[k]) for k in decided)
        cells += [f"{cm.of_bits(decided, 'avg_bits'):.3f}", f"{cm.of_bits(plan, 'avg_bits'):.3f}",
                  f"{search.argmax_changed} + {changed}"]
    head = f"| {'on' if settle else 'off'} | {noise:g} | {seed} | {expected:.3f} | {undecided} | "
    return head + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1170)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 3.0, 10.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settle", choices=["on", "off", "both"], default="both",
                    help="sequential settling while hardening (the default search: on)")
    args = ap.parse_args()
    print(f"{args.steps} search steps, avg_bits <= 2.0; 'rounding + projection' = layers the rounding moved from the "
          f"per-layer argmax + layers the projection then changed")
    print("| settle | noise | seed | E[avg bits] | undecided layers | argmax: decided | argmax: plan | "
          "argmax: rounding + projection | budget: decided | budget: plan | budget: rounding + projection |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    settles = {"on": [True], "off": [False], "both": [False, True]}[args.settle]
    for settle in settles:
        for noise in args.noise:
            for seed in args.seeds:
                print(run(args.steps, noise, seed, settle), flush=True)


if __name__ == "__main__":
    main()
