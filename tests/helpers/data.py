"""scikit-learn digits (1,797 real 8x8 images, values 0..16) in the forms the tests use."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


@lru_cache(maxsize=1)
def _load():
    from sklearn.datasets import load_digits

    return load_digits()


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw images (N, 8, 8, values 0..16) and labels; shared, do not modify."""
    d = _load()
    return d.images, d.target


def digits_unit() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as 1x8x8 in [0, 1], with int64 labels."""
    images, target = digits_arrays()
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(target)


def digits_signed(n: int = 512, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits from ``offset`` as 1x8x8 in [-1, 1], with labels."""
    images, target = digits_arrays()
    x = torch.tensor(images[offset:offset + n], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(target[offset:offset + n], dtype=torch.long)


def digits_signed_loader(batch_size: int = 64) -> DataLoader:
    """The first 512 signed digits, shuffled by a fixed generator."""
    return DataLoader(TensorDataset(*digits_signed(512)), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def digits_images(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits as 3x32x32 in [-1, 1] (bilinear resize), with labels."""
    images, target = digits_arrays()
    x = torch.tensor(images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(target[:n], dtype=torch.long)


def digits_split() -> tuple[TensorDataset, TensorDataset]:
    """Digits in [0, 1], 75/25 stratified split with a fixed seed: (train, test)."""
    from sklearn.model_selection import train_test_split

    x, y = digits_unit()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)


class Loaders:
    """Loaders over :func:`digits_split`: the training order is seeded per epoch (``EpochSeededSampler``)."""

    def __init__(self) -> None:
        self.train_set, self.test_set = digits_split()

    def train(self, batch_size: int = 64, seed: int = 0) -> DataLoader:
        from sdq_lightning.lit import EpochSeededSampler

        return DataLoader(self.train_set, batch_size=batch_size, sampler=EpochSeededSampler(self.train_set, seed))

    def test(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


def _coloured(g: np.ndarray) -> np.ndarray:
    return np.stack([g, 255 - g, (g // 2 + 60)], axis=-1).astype(np.uint8)


def digits_tree(root: Path, splits: tuple[str, str] = ("train", "val"), per_class: int = 3, size: int = 32,
                class_name: str = "c{}", coloured: bool = False) -> Path:
    """An ImageFolder tree of real digits (RGB PNGs, ``size`` x ``size``): ``per_class`` images per class in the
    first split, the next ``per_class`` in the second. ``coloured``: the three channels differ (grey otherwise)."""
    images, target = digits_arrays()
    for split, offset in zip(splits, (0, per_class)):
        for cls in range(10):
            folder = root / split / class_name.format(cls)
            folder.mkdir(parents=True)
            for i in np.flatnonzero(target == cls)[offset:offset + per_class]:
                g = (images[i] * 255 / 16).astype(np.uint8)
                if coloured:
                    img = Image.fromarray(_coloured(g)).resize((size, size))
                else:
                    img = Image.fromarray(g).resize((size, size)).convert("RGB")
                img.save(folder / f"{i}.png")
    return root
