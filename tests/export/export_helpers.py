"""Helpers for the export tests: real images (scikit-learn digits at 3x32x32, CIFAR-10 when available) and
mixed-precision models (1..8-bit weights, 2..8-bit inputs) calibrated and briefly trained on them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

# benchmarks/bench_onnx.py imports this file with only this folder on sys.path
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
import sdq_lightning  # noqa: E402,F401
from helpers.data import digits_images  # noqa: E402  (bench_onnx.py imports it from here)
from sdq_lightning import BitPlan, LayerBits, QuantSpec, quantize_model  # noqa: E402


def cifar_images(n: int = 256) -> tuple[torch.Tensor, torch.Tensor] | None:
    root = os.environ.get("SDQ_CIFAR10_ROOT")
    if not root or not (Path(root) / "test").is_dir():
        return None
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = datasets.ImageFolder(str(Path(root) / "test"), transform=tf)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


def mixed_bits(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Weight bits cycling 1..8 and input bits cycling 8,2..7 over the Conv2d/Linear layers (every width used)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    w = {n: 1 + i % 8 for i, n in enumerate(names)}
    a = {n: (8, 2, 3, 4, 5, 6, 7)[i % 7] for i, n in enumerate(names)}
    return w, a


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, opt: torch.optim.Optimizer,
           seed: int, batch: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_mixed(name: str, per_channel: bool = False, fp_steps: int = 20, qat_steps: int = 3,
                seed: int = 0, batch: int = 64) -> nn.Module:
    """A frozen mixed-precision timm model trained a little on real digits: FP steps (so the logits have margins),
    then the plan applied, every ActQuantizer calibrated by one train-mode forward on real images, then a few QAT
    SGD steps (weights, steps and BN statistics move off their init)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two contending ones
    try:
        return _build_mixed(name, per_channel, fp_steps, qat_steps, seed, batch)
    finally:
        torch.set_num_threads(threads)


def _build_mixed(name: str, per_channel: bool, fp_steps: int, qat_steps: int, seed: int, batch: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x, y = digits_images(768)
    _train(model, x, y, fp_steps, torch.optim.Adam(model.parameters(), lr=2e-3), seed, batch)
    w, a = mixed_bits(model)
    if per_channel:
        quantize_model(model, QuantSpec(layer_bits=w, layer_act_bits=a, per_channel=True))
    else:
        BitPlan({n: LayerBits(w[n], a[n], 0, 0) for n in w}).apply(model)
    model.train()
    with torch.no_grad():
        model(x[:128])  # calibrates every ActQuantizer (sign mode and step) on real images
    _train(model, x, y, qat_steps, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), seed + 1, batch)
    return model.eval()


# ------------------------------------------------------------------------------------- runs of the Hydra app
APP_TINY = [  # 2 epochs (1 search + 1 train), 2 training batches, 1 val/test batch of 16 real digits
    "experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false", "trainer.max_epochs=2",
    "phase.search_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "fp_teacher.epochs=1", "dataset.batch_size=16", "dataset.num_workers=0", "logger=csv", "save_checkpoint=true",
]


def compose_app(overrides: list[str]):
    """The app's composed config (``sdq-train`` without Hydra's run folder)."""
    from hydra import compose, initialize_config_dir

    conf = Path(sdq_lightning.__file__).resolve().parent / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("train", overrides=overrides)


def app_test_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The first test batch of the run's data module (real digits): what the run's test/acc was measured on."""
    from sdq_lightning.utils.instantiate import build_datamodule

    dm = build_datamodule(cfg)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))[:2]
    return x, y
