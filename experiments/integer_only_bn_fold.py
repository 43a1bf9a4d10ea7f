"""Integer-only phase 2: when to fold BatchNorm. Plain PyTorch through the library's integer-only API (what a user
without Lightning calls), so the fold step is the only difference between the rows.

For each seed, ResNet20 from the FP checkpoint under a plan (tests/export/integer_helpers.py: sdq2, w4a8, ...),
input quantizers calibrated on 256 training images, then phase 2 (SGD Nesterov, cosine LR, weight decay 5e-4,
batch 128, random crop + flip) on a seeded SUBSET of the training images, three ways:
  fakequant     the fake-quantized model, BatchNorm live throughout;
  fold@0        integer-only, BatchNorm folded before the first step (its statistics the FP model's);
  fold@K        integer-only, BatchNorm live for K steps, then folded (the callback's ``freeze.bn_fold_steps``).
Top-1 on TEST_IMAGES seeded test images; paired differences over seeds with 95 % t intervals.

  python experiments/integer_only_bn_fold.py --cifar10 <root> [--plan sdq2] [--fold-steps 20] [--seeds 0 1 2 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "export")]

from integer_helpers import float_model, plan_bits  # noqa: E402

from sdq_lightning import BitPlan, LayerBits  # noqa: E402
from sdq_lightning.integer import activate_integer_only, attach_integer_only  # noqa: E402

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load(root: str, subset: int, test_images: int) -> tuple[torch.Tensor, ...]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    g = torch.Generator().manual_seed(1)
    out = []
    for split, n in (("train", subset), ("test", test_images)):
        ds = datasets.ImageFolder(str(Path(root) / split), transform=tf)
        idx = torch.randperm(len(ds), generator=g)[:n].tolist()
        xs, ys = zip(*(ds[i] for i in idx))
        out += [torch.stack(xs), torch.tensor(ys)]
    return tuple(out)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = F.pad(x, (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2,), generator=g).tolist()
    x = x[:, :, i:i + 32, j:j + 32]
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def phase_2(data, plan: str, fold_at: int | None, seed: int, epochs: int, lr: float) -> float:
    """Test top-1 (%) after phase 2; ``fold_at`` None: fake-quant, else the step at which BatchNorm is folded."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = float_model()
    w, a = plan_bits(model, plan)
    BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}).apply(model)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    with torch.no_grad():  # initialise the input quantizers; BatchNorm statistics restored
        model(x[:256])
    model.load_state_dict(stats, strict=False)
    if fold_at is not None:
        attach_integer_only(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    per_epoch = len(x) // 128
    steps, step = epochs * per_epoch, 0
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for b in range(per_epoch):
            if fold_at is not None and step == fold_at:
                activate_integer_only(model)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            i = perm[b * 128:(b + 1) * 128]
            loss = F.cross_entropy(model(augment(x[i], g)), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad():
        right = sum((model(xt[i:i + 250]).argmax(1) == yt[i:i + 250]).sum().item() for i in range(0, len(xt), 250))
    return 100.0 * right / len(xt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar10", required=True, help="CIFAR-10 ImageFolder root (train/, test/)")
    ap.add_argument("--plan", default="sdq2")
    ap.add_argument("--fold-steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=0.005)
    args = ap.parse_args()
    steps = args.epochs * (args.subset // 128)
    if not 0 < args.fold_steps < steps:
        ap.error(f"--fold-steps must be in 1..{steps - 1} (phase 2 has {steps} steps), got {args.fold_steps}")
    data = load(args.cifar10, args.subset, args.test_images)
    rows = {"fakequant": None, "fold@0": 0, f"fold@{args.fold_steps}": args.fold_steps}
    acc: dict[str, list[float]] = {r: [] for r in rows}
    for seed in args.seeds:
        for name, fold in rows.items():
            t0 = time.time()
            acc[name].append(phase_2(data, args.plan, fold, seed, args.epochs, args.lr))
            print(f"seed {seed} {name:>10}: {acc[name][-1]:.2f} %  ({time.time() - t0:.0f} s)", flush=True)
    print(f"\n{args.plan}, {args.epochs} epochs on {args.subset} images, {args.test_images} test images")
    for name in rows:
        print(f"{name:>10}: mean {statistics.mean(acc[name]):.2f} %  ({', '.join(f'{v:.2f}' for v in acc[name])})")
    k = f"fold@{args.fold_steps}"
    for a, b in ((k, "fold@0"), ("fakequant", k), ("fakequant", "fold@0")):
        d = [p - q for p, q in zip(acc[a], acc[b])]
        m = statistics.mean(d)
        h = T975.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"{a} - {b}: {m:+.2f} [{m - h:+.2f}, {m + h:+.2f}] ({len(d)} seeds)")


if __name__ == "__main__":
    main()
