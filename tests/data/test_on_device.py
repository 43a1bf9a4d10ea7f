"""dataset.on_device: batches built on the device (here the CPU) from uint8 tensors, checked against the
per-sample torchvision path."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from helpers.data import digits_tree
from sdq_lightning.data import CIFAR10DataModule, ImageFolderDataModule
from sdq_lightning.data.device import DeviceImageLoader, crop_flip

CIFAR_ROOT = os.environ.get("SDQ_CIFAR10_ROOT")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    # coloured RGB PNGs (the channels differ), 4 per class under train/ and test/
    return digits_tree(tmp_path_factory.mktemp("on_device") / "tree", ("train", "test"), per_class=4, coloured=True)


def _dm(root: Path, **kw) -> ImageFolderDataModule:
    args = dict(image_size=32, batch_size=8, num_workers=0, mean=MEAN, std=STD, seed=3)
    args.update(kw)
    dm = ImageFolderDataModule(str(root), **args)
    dm.setup()
    return dm


def test_val_batches_equal_per_sample_path(tree):
    ref, dev = _dm(tree, in_memory=True), _dm(tree, on_device=True)
    assert dev.in_memory and isinstance(dev.val_dataloader(), DeviceImageLoader)
    got = list(dev.val_dataloader())
    want = list(ref.val_dataloader())
    assert len(got) == len(want) == len(dev.val_dataloader()) == 5
    for (x, y), (xr, yr) in zip(got, want):
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_unaugmented_train_batches_equal_per_sample_path(tree):
    ref, dev = _dm(tree, in_memory=True, augment=False), _dm(tree, on_device=True, augment=False)
    loader = dev.train_dataloader()
    order, offsets, flips = loader.epoch_plan(0)
    assert offsets is None and flips is None and sorted(order.tolist()) == list(range(40))
    assert len(loader) == 5  # 40 samples, batch 8, drop_last
    for i, (x, y) in enumerate(loader):
        idx = order[i * 8:(i + 1) * 8].tolist()
        xr = torch.stack([ref.train_set[j][0] for j in idx])
        yr = torch.tensor([ref.train_set[j][1] for j in idx])
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_augmented_batches_are_crops_and_flips_of_the_right_images(tree):
    dev = _dm(tree, on_device=True)
    loader = dev.train_dataloader()
    order, offsets, flips = loader.epoch_plan(0)
    assert offsets.min() >= 0 and offsets.max() <= 8 and 0 < int(flips.sum()) < 40
    images, targets = dev.train_set.images, dev.train_set.targets
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i, (x, y) in enumerate(loader):
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        for k in range(8):
            j = int(order[i * 8 + k])
            assert int(y[k]) == int(targets[j])
            top, left = offsets[i * 8 + k].tolist()
            want = F.pad(images[j], (4, 4, 4, 4))[:, top:top + 32, left:left + 32]
            if flips[i * 8 + k]:
                want = want.flip(-1)
            want = (want.float() / 255 - mean) / std
            torch.testing.assert_close(x[k], want, rtol=0, atol=1e-6)
    # denormalised pixels are multiples of 1/255 in [0, 1]: normalised exactly once
    raw = x * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    torch.testing.assert_close(raw * 255, (raw * 255).round(), rtol=0, atol=1e-3)


def test_crop_flip_matches_torchvision_functional():
    from torchvision.transforms.v2 import functional as TF

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen)
    offsets = torch.randint(0, 9, (6, 2), generator=gen)
    flips = torch.tensor([True, False, True, False, False, True])
    got = crop_flip(x, 32, 4, offsets, flips)
    for k in range(6):
        want = TF.crop(TF.pad(x[k], [4]), int(offsets[k, 0]), int(offsets[k, 1]), 32, 32)
        assert torch.equal(got[k], TF.horizontal_flip(want) if flips[k] else want)


def test_deterministic_per_epoch(tree):
    epoch = {"e": 0}
    dm = _dm(tree, on_device=True)
    ds = dm.train_set
    loader = DeviceImageLoader(ds.images, ds.targets, 8, MEAN, STD, shuffle=True, augment=True, drop_last=True,
                               seed=3, epoch_fn=lambda: epoch["e"])
    a, b = list(loader), list(loader)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    epoch["e"] = 1
    c = list(loader)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    # a second data module with the same seed gives the same epoch; without epoch_fn, passes count the epochs
    other = DeviceImageLoader(ds.images, ds.targets, 8, MEAN, STD, shuffle=True, augment=True, drop_last=True, seed=3)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, list(other)))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(c, list(other)))


def test_ranks_split_the_epoch(tree):
    ds = _dm(tree, on_device=True).train_set
    parts = [DeviceImageLoader(ds.images, ds.targets, 4, MEAN, STD, shuffle=True, seed=1, num_replicas=2, rank=r)
             for r in (0, 1)]
    orders = [p.epoch_plan(0)[0].tolist() for p in parts]
    assert len(parts[0]) == len(parts[1]) == 5
    assert not set(orders[0]) & set(orders[1]) and sorted(orders[0] + orders[1]) == list(range(40))


def test_on_device_large_images_and_errors(tree):
    dm = _dm(tree, image_size=24, on_device=True, augment=False)  # centre crop of the 24-px decode: a no-op
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 24, 24)
    with pytest.raises(ValueError, match="on_device"):
        ImageFolderDataModule(str(tree), image_size=64, on_device=True)
    big = _dm(tree, image_size=64, on_device=True, augment=False)  # decoded at 73 px, centre-cropped to 64
    ref = _dm(tree, image_size=64, in_memory=True)
    (x, y), (xr, yr) = next(iter(big.val_dataloader())), next(iter(ref.val_dataloader()))
    assert torch.equal(x, xr) and torch.equal(y, yr)
    with pytest.raises(ValueError, match="uint8"):
        DeviceImageLoader(torch.zeros(2, 3, 4, 4), torch.zeros(2), 1, MEAN, STD)


def test_fit_with_on_device_data_on_cpu(tree):
    """Lightning takes the loader as it is, moves it to the trainer's device, epochs reach the epoch_fn."""
    from sdq_lightning.lit import SDQClassifier

    dm = ImageFolderDataModule(str(tree), image_size=32, batch_size=8, num_workers=0, mean=MEAN, std=STD,
                               on_device=True, num_classes=10)
    model = SDQClassifier(backbone="resnet20", num_classes=10, in_chans=3)
    seen: list[int] = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.datamodule.device_loader("train").current_epoch())

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Spy()])
    trainer.fit(model, datamodule=dm)
    assert seen == [0, 1] and dm.target_device() == torch.device("cpu")
    assert "val/acc" in trainer.callback_metrics


@pytest.mark.skipif(not CIFAR_ROOT, reason="SDQ_CIFAR10_ROOT not set")
def test_cifar10_on_device_matches_in_memory():
    kw = dict(batch_size=100, num_workers=0, subset=200, val_subset=200, download=False)
    ref = CIFAR10DataModule(CIFAR_ROOT, in_memory=True, **kw)
    dev = CIFAR10DataModule(CIFAR_ROOT, on_device=True, **kw)
    ref.setup(), dev.setup()
    for (x, y), (xr, yr) in zip(dev.val_dataloader(), ref.val_dataloader()):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    x, y = next(iter(dev.train_dataloader()))
    assert x.shape == (100, 3, 32, 32) and torch.bincount(y, minlength=10).sum() == 100
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3  # CIFAR statistics normalise it
