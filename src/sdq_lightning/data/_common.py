"""Shared pieces of the data modules: subsets, in-memory tensor datasets, loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_subset(name: str, value: int | None) -> int | None:
    """Validates a subset size: ``None`` (full split) or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be null or a positive integer, got {value!r}")
    return value


def subset_indices(targets: Sequence[int], limit: int | None, seed: int) -> list[int] | None:
    """Picks a fixed, class-balanced (round-robin over classes) subset of ``limit`` indices.

    Returns ``None`` when no limit applies, so callers keep the full dataset.
    """
    if limit is None or limit >= len(targets):
        return None
    gen = torch.Generator().manual_seed(seed)
    per_class: dict[int, list[int]] = {}
    for idx in torch.randperm(len(targets), generator=gen).tolist():
        per_class.setdefault(int(targets[idx]), []).append(idx)
    queues = [per_class[c] for c in sorted(per_class)]
    picked: list[int] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return sorted(picked)


def maybe_subset(dataset: Dataset, targets: Sequence[int], limit: int | None, seed: int) -> Dataset:
    idx = subset_indices(targets, limit, seed)
    return dataset if idx is None else Subset(dataset, idx)


class TensorImageDataset(Dataset):
    """Images held as one tensor (uint8 or float) with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None) -> None:
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        img = self.images[idx]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[idx])


def decode_to_tensors(dataset: Dataset, num_workers: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes every sample of ``dataset`` (whose transform yields uint8 CHW tensors) into two tensors."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    images, targets = [], []
    for x, y in loader:
        images.append(x)
        targets.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(targets).long()


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last and len(dataset) > batch_size,
    )
