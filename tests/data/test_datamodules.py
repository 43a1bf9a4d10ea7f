"""Data modules: shapes, labels, splits, transforms, real CIFAR-10 copy, offline error."""

from __future__ import annotations

import os

import pytest
import torch

from helpers.data import digits_tree
from sdq_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule

CIFAR_ROOT = os.environ.get("SDQ_CIFAR10_ROOT")


def test_digits_split_shapes_and_normalisation():
    dm = DigitsDataModule()
    dm.setup()
    assert len(dm.train_set) == 1347 and len(dm.val_set) == 450  # 25 % stratified test split
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long
    train_x = dm.train_set.images
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-2
    counts = torch.bincount(dm.val_set.targets, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # stratified
    assert dm.num_classes == 10 and dm.in_chans == 1


def test_digits_split_is_fixed():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert torch.equal(a.val_set.targets, b.val_set.targets)
    assert torch.equal(a.val_set.images, b.val_set.images)


def test_digits_resized_rgb_and_subset():
    dm = DigitsDataModule(image_size=32, in_chans=3, subset=100, val_subset=50, batch_size=128)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 3, 32, 32)
    assert torch.bincount(y, minlength=10).min() == 10  # class-balanced subset
    assert len(dm.val_set) == 50


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="in_chans"):
        DigitsDataModule(in_chans=2)
    with pytest.raises(ValueError, match="subset"):
        DigitsDataModule(subset=0)


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("image_size", [32, 64])
def test_imagefolder_tree(tmp_path, in_memory, image_size):
    root = digits_tree(tmp_path / "tree")
    dm = ImageFolderDataModule(str(root), image_size=image_size, batch_size=8, num_workers=0, in_memory=in_memory)
    assert dm.num_classes == 10
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.val_set) == 30  # val/ used when there is no test/
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, image_size, image_size) and x.dtype == torch.float32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (8, 3, image_size, image_size)
    assert yv.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope")).prepare_data()
    (tmp_path / "t" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test/ or val/"):
        ImageFolderDataModule(str(tmp_path / "t")).prepare_data()
    root = digits_tree(tmp_path / "tree", per_class=1)
    with pytest.raises(ValueError, match="num_classes"):
        _ = ImageFolderDataModule(str(root), num_classes=5).num_classes


def test_cifar10_offline_error_names_local_data(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path / "none"), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "dataset.root=" in msg and "dataset=imagefolder" in msg and "\n" not in msg


@pytest.mark.skipif(not CIFAR_ROOT, reason="SDQ_CIFAR10_ROOT not set")
@pytest.mark.parametrize("module", [ImageFolderDataModule, CIFAR10DataModule])
def test_real_cifar10_copy(module):
    kwargs = dict(image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    dm = module(CIFAR_ROOT, batch_size=200, num_workers=0, subset=200, val_subset=400, in_memory=True, **kwargs)
    assert dm.num_classes == 10
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (200, 3, 32, 32)
    assert torch.bincount(dm.val_set.targets, minlength=10).tolist() == [40] * 10
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3  # normalised with CIFAR statistics
    xt, yt = next(iter(dm.train_dataloader()))
    assert xt.shape == (200, 3, 32, 32) and set(yt.tolist()) == set(range(10))
