"""Users' own networks trained from scratch with the README's SDQ line: SDQ (avg_bits <= 2.0) against uniform 2-bit
weights at the same schedule, 4-bit activations, per network shape and seed, on scikit-learn's digits (the test
suite's user module and split). Lightning's default trainer settings apart from the device, logging and the bar.

    OMP_NUM_THREADS=2 python experiments/user_networks.py [--bodies cnn_fc cnn_bn] [--seeds 0 1 2] [--epochs 6]
    OMP_NUM_THREADS=2 python experiments/user_networks.py --cifar10 <root> [--subset 5000] [--bodies rgb_vgg rgb_fc]
    ... [--lookahead 0] [--step-init lsq] [--step-follow]   (the SDQ runs only: search.lookahead_levels,
        layers.step_init, layers.step_follow; without them the library's defaults, as the uniform runs)
    ... [--sdq-only]   (no uniform runs: they do not depend on the SDQ options)

``--cifar10``: a harder task, a class-balanced subset of the CIFAR-10 training images (ImageFolder tree, decoded once
into memory) and 2,000 test images, with two 3-channel user networks (``rgb_vgg``, ``rgb_fc``).

Prints each run's test accuracy, plan bits and plan (every quantized layer's weight bits, in model order), then
per shape the mean paired difference SDQ - uniform with a 95 % t-interval and the seed spread of each row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixed_plan_table import t_interval  # noqa: E402
from helpers.data import Loaders  # noqa: E402
from helpers.user_module import BODIES, USER_CNN, UserNet  # noqa: E402

from sdq_lightning import SDQ  # noqa: E402


def _rgb_vgg(width: int = 32):
    from torch import nn

    w2 = 2 * width
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(w2, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, 10))


def _rgb_fc(width: int = 32):
    from torch import nn

    w2 = 2 * width
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.Conv2d(w2, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.Conv2d(w2, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(w2 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


RGB = {"rgb_vgg": _rgb_vgg, "rgb_fc": _rgb_fc}


class CifarLoaders:
    """A class-balanced subset of an ImageFolder CIFAR-10 tree's train/ split and 2,000 test/ images, in memory."""

    def __init__(self, root: str, subset: int, test: int = 2000) -> None:
        import torch
        from torch.utils.data import TensorDataset
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])

        def load(split: str, n: int) -> TensorDataset:
            ds = datasets.ImageFolder(str(Path(root) / split), transform=tf)
            targets = torch.tensor(ds.targets)
            g = torch.Generator().manual_seed(0)
            idx = torch.cat([torch.nonzero(targets == c).view(-1)[torch.randperm(int((targets == c).sum()),
                                                                                  generator=g)[:n // 10]]
                             for c in range(10)])
            x = torch.stack([ds[i][0] for i in idx.tolist()])
            return TensorDataset(x, targets[idx])

        self.train_set, self.test_set = load("train", subset), load("test", test)

    def train(self, batch_size: int = 64, seed: int = 0):
        from torch.utils.data import DataLoader

        from sdq_lightning.lit import EpochSeededSampler

        return DataLoader(self.train_set, batch_size=batch_size, sampler=EpochSeededSampler(self.train_set, seed))

    def test(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.test_set, batch_size=512)


def fit(body: str, seed: int, epochs: int, uniform: bool, loaders, lookahead: int | None = None,
        step_init: str | None = None, step_follow: bool = False, callbacks: list | None = None
        ) -> tuple[float, float, str]:
    L.seed_everything(seed, verbose=False)
    model = UserNet(**{**USER_CNN, "body": "cnn_fc" if body in RGB else body})
    if body in RGB:
        model.net = RGB[body]()
    if uniform:
        sdq = SDQ(weight_bits=(2,), activation_bits=4)
    else:
        search = {} if lookahead is None else {"lookahead_levels": lookahead}
        layers = {"step_follow": step_follow, **({} if step_init is None else {"step_init": step_init})}
        sdq = SDQ(weight_bits=(1, 2, 3, 4, 5, 6, 7, 8), activation_bits=4,
                  budget={"metric": "avg_bits", "target": 2.0}, search_epochs=epochs // 2, search=search, layers=layers)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[sdq, *(callbacks or [])])
    trainer.fit(model, loaders.train(seed=seed))
    acc = trainer.test(model, loaders.test(), verbose=False)[0]["test_acc"]
    plan = "/".join("fp" if b is None else str(b) for b in sdq.plan.values())  # every quantized layer, model order
    return float(acc), float(sdq.plan.average_bits), plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bodies", nargs="+", default=["cnn_fc", "cnn_bn"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--cifar10", help="a CIFAR-10 ImageFolder root (train/, test/): the harder task")
    ap.add_argument("--subset", type=int, default=5000, help="--cifar10: training images (class-balanced)")
    ap.add_argument("--lookahead", type=int, help="the SDQ runs' search.lookahead_levels (default: the library's)")
    ap.add_argument("--step-init", choices=["lsq", "mse", "mse_all"],
                    help="the SDQ runs' layers.step_init (default: the library's)")
    ap.add_argument("--step-follow", action="store_true", help="the SDQ runs' layers.step_follow")
    ap.add_argument("--sdq-only", action="store_true",
                    help="skip the uniform runs (they do not depend on the SDQ options): SDQ rows only, no summary")
    args = ap.parse_args()
    if args.cifar10 and args.bodies == ["cnn_fc", "cnn_bn"]:
        args.bodies = list(RGB)
    digits_bodies = tuple(b for b in BODIES if not b.startswith("rgb"))  # 1-channel bodies
    bad = [b for b in args.bodies if b not in (RGB if args.cifar10 else digits_bodies)]
    if bad:
        raise SystemExit(f"error: network {bad[0]!r} does not fit this data; digits: {' '.join(digits_bodies)}; "
                         f"--cifar10: {' '.join(RGB)}")
    loaders = CifarLoaders(args.cifar10, args.subset) if args.cifar10 else Loaders()
    print("| network | seed | SDQ test acc (%) | SDQ avg bits | SDQ plan | uniform 2-bit test acc (%) "
          "| uniform avg bits |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for body in args.bodies:
        for seed in args.seeds:
            s_acc, s_bits, s_plan = fit(body, seed, args.epochs, False, loaders, args.lookahead, args.step_init,
                                          args.step_follow)
            if args.sdq_only:
                print(f"| {body} | {seed} | {100 * s_acc:.2f} | {s_bits:.3f} | {s_plan} | - | - |", flush=True)
                continue
            u_acc, u_bits, _ = fit(body, seed, args.epochs, True, loaders)
            results.setdefault(body, []).append((s_acc, u_acc))
            print(f"| {body} | {seed} | {100 * s_acc:.2f} | {s_bits:.3f} | {s_plan} | {100 * u_acc:.2f} "
                  f"| {u_bits:.3f} |", flush=True)
    if not results:
        return
    print("\n| network | seeds | SDQ mean (sd) | uniform mean (sd) | SDQ - uniform (points) | 95 % interval |")
    print("|---|---|---|---|---|---|")
    for body, rows in results.items():
        s = [100 * a for a, _ in rows]
        u = [100 * b for _, b in rows]
        mean, lo, hi = t_interval([a - b for a, b in zip(s, u)])
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan"))
        print(f"| {body} | {len(rows)} | {statistics.fmean(s):.2f} ({sd(s):.2f}) | {statistics.fmean(u):.2f} "
              f"({sd(u):.2f}) | {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")


if __name__ == "__main__":
    main()
