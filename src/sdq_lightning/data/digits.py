"""scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, embedded, no download)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from sdq_lightning.data._common import TensorImageDataset, check_subset, make_loader, maybe_subset


class DigitsDataModule(L.LightningDataModule):
    """Digits with a fixed stratified train/test split (``seed`` 0, 25 % test) and an optional validation split.

    Images are scaled to [0, 1] and normalised with the training split's mean and std (or the
    given ``mean``/``std``). With ``image_size`` (e.g. 32) and ``in_chans`` 3 they are resized
    bilinearly and repeated over channels so that CIFAR-style timm backbones accept them.
    With ``val_size`` > 0 a stratified part of the training split (same seed) is held out for validation, so
    validation accuracy (model selection, the divergence guard, Optuna) never sees the test split; with
    ``val_size`` 0 validation and test both use the test split.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader workers (0 is fastest for this tiny in-memory set).
        image_size: Output side length; 8 keeps the native resolution.
        in_chans: 1 or 3 output channels.
        mean: Normalisation mean (one value, or one per channel); ``None`` uses the train split's.
        std: Normalisation std; ``None`` uses the train split's.
        subset: Keep only this many (class-balanced) training samples.
        val_subset: Keep only this many validation/test samples; ``None`` uses ``subset``.
        test_size: Fraction of the data held out for test.
        val_size: Part of the training split held out for validation: a fraction in (0, 1) or a sample count;
            0 (default) validates on the test split.
        seed: Seed of the split and subsets.
        num_classes: Must be 10 (accepted so configs can state it).
        in_memory: Accepted for interface parity; digits always live in memory.
        augment: Accepted for interface parity; digits are not augmented.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 8,
        in_chans: int = 1,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        subset: int | None = None,
        val_subset: int | None = None,
        test_size: float = 0.25,
        val_size: float | int = 0,
        seed: int = 0,
        num_classes: int = 10,
        in_memory: bool = True,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"dataset.in_chans must be 1 or 3 for digits, got {in_chans!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"dataset.image_size must be an int >= 8 for digits, got {image_size!r}")
        if num_classes != 10:
            raise ValueError(f"dataset.num_classes must be 10 for digits, got {num_classes!r}")
        if batch_size <= 0:
            raise ValueError(f"dataset.batch_size must be positive, got {batch_size!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.in_chans = in_chans
        self.mean, self.std = mean, std
        self.subset = check_subset("dataset.subset", subset)
        self.val_subset = check_subset("dataset.val_subset", val_subset) if val_subset is not None else self.subset
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0 or (
                isinstance(val_size, float) and not val_size < 1):
            raise ValueError(f"dataset.val_size must be 0, a fraction in (0, 1) or a sample count >= 1, got "
                             f"{val_size!r}")
        self.test_size = test_size
        self.val_size = val_size
        self.seed = seed
        self.num_classes = 10
        self.train_set = self.val_set = self.test_set = None

    def _tensors(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x.repeat(1, self.in_chans, 1, 1)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        idx_train, idx_test = train_test_split(
            list(range(len(y))), test_size=self.test_size, random_state=self.seed, stratify=data.target
        )
        idx_val: list[int] = []
        if self.val_size:
            if isinstance(self.val_size, int) and not 10 <= self.val_size <= len(idx_train) - 10:
                raise ValueError(f"dataset.val_size must leave >= 10 samples on each side of the "
                                 f"{len(idx_train)}-sample training split, got {self.val_size}")
            idx_train, idx_val = train_test_split(idx_train, test_size=self.val_size, random_state=self.seed,
                                                  stratify=data.target[idx_train])
        x_train, x_test = self._tensors(x[idx_train]), self._tensors(x[idx_test])
        mean = torch.tensor(x_train.mean().item() if self.mean is None else self.mean, dtype=torch.float32)
        std = torch.tensor(x_train.std().item() if self.std is None else self.std, dtype=torch.float32)
        mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        train = TensorImageDataset(x_train, y[idx_train])
        test = TensorImageDataset(x_test, y[idx_test])
        self.train_set = maybe_subset(train, train.targets.tolist(), self.subset, self.seed)
        self.test_set = maybe_subset(test, test.targets.tolist(), self.val_subset, self.seed)
        if idx_val:
            val = TensorImageDataset((self._tensors(x[idx_val]) - mean) / std, y[idx_val])
            self.val_set = maybe_subset(val, val.targets.tolist(), self.val_subset, self.seed)
        else:
            self.val_set = self.test_set

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.batch_size, self.num_workers, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.test_set, self.batch_size, self.num_workers, shuffle=False)
