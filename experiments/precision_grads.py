"""Issue 12: first-step quantizer gradients under 16-mixed (with a gradient scaler) and bf16-mixed against 32-true.

Same user module (tests/callbacks/test_precision.py's UserNet), seed, data (digits) and bit draws; prints, per
quantizer parameter, the relative L2 difference of the unscaled first-step gradient to the 32-bit one and the
32-bit gradient's norm. Run from the repository root:

    python experiments/precision_grads.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "callbacks"))

from conftest import Loaders, quiet_trainer  # noqa: E402
from test_precision import FirstGrads, UserNet  # noqa: E402


def first_grads(precision: str, digits: Loaders) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    sdq = FirstGrads(activation_bits=4, budget={"metric": "avg_bits", "target": 3.0}, search_epochs=1,
                     ebr={"weight": 0.1})
    kw = dict(max_epochs=2, callbacks=[sdq], limit_train_batches=1, default_root_dir=str(ROOT / "outputs" / "prec"))
    if precision == "16-mixed":
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    else:
        kw["precision"] = precision
    quiet_trainer(**kw).fit(UserNet(), digits.train())
    return sdq.first


def main() -> None:
    digits = Loaders()
    res = {p: first_grads(p, digits) for p in ("32-true", "16-mixed", "bf16-mixed")}
    print("| parameter | 16-mixed + scaler vs 32-true | bf16-mixed vs 32-true | 32-bit gradient norm |")
    print("|---|---:|---:|---:|")
    for key, g in res["32-true"].items():
        rel = [float((res[p][key] - g).norm() / g.norm()) for p in ("16-mixed", "bf16-mixed")]
        print(f"| {key} | {rel[0]:.4f} | {rel[1]:.4f} | {float(g.norm()):.3g} |")


if __name__ == "__main__":
    main()
