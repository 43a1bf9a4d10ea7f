"""Does Lightning's sanity check change what a user's module learns under SDQ? Test accuracy of the user CNN of the
tests (tests/callbacks/test_sanity_check.py: digits, AdamW 1e-2, 4-bit activations, a validation loop) with
Lightning's default ``num_sanity_val_steps=2`` and with ``0``, for uniform W2/A4 and SDQ (avg_bits <= 2.0), per seed.

``--first-forward`` makes the activation quantizers take their state from the first forward of any kind (an
eval-mode sanity batch through the untrained network included), as they did before they waited for the first
training batch: the control that shows what waiting buys.

    OMP_NUM_THREADS=1 python experiments/sanity_check_effect.py --seeds 0 1 2 --epochs 4 [--first-forward]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "callbacks"))

from conftest import Loaders, quiet_trainer  # noqa: E402
from test_sanity_check import fit_and_test  # noqa: E402

from sdq_lightning.quantizers import ActQuantizer  # noqa: E402


def initialise_at_first_forward() -> None:
    prepare = ActQuantizer.prepare

    def first_forward(self: ActQuantizer, x: torch.Tensor):
        if not self._initialized:
            self.initialize(x)
        return prepare(self, x)

    ActQuantizer.prepare = first_forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--first-forward", action="store_true")
    args = ap.parse_args()
    if args.first_forward:
        initialise_at_first_forward()
    digits = Loaders()
    root = str(ROOT / "outputs" / "sanity_check_effect")

    def make(**kwargs):
        return quiet_trainer(default_root_dir=root, **kwargs)

    print("| run | seed | sanity check on (default) | num_sanity_val_steps=0 |\n|---|---|---|---|")
    for search in (False, True):
        for seed in args.seeds:
            on, off = (fit_and_test(make, digits, seed, sanity, search, args.epochs) for sanity in (True, False))
            print(f"| {'SDQ avg_bits <= 2, A4' if search else 'uniform W2/A4'} | {seed} | {100 * on:.2f} % | "
                  f"{100 * off:.2f} % |", flush=True)


if __name__ == "__main__":
    main()
