"""Data held on the training device: batched augmentation and a loader that never leaves the device.

``dataset.on_device=true`` decodes every image once (as ``in_memory`` does), moves the uint8 tensors to the
trainer's device once, and then builds each batch there: index with a shuffled permutation, 4-pixel zero-padded
random crop and horizontal flip as one gather, normalise. No per-sample Python, no worker processes, no host to
device copies per step. Works the same on CPU (``device=cpu``), which is what the tests use.

Random numbers (permutation, crop offsets, flips) come from a CPU ``torch.Generator`` seeded with
``seed + epoch``, so an epoch's batches are the same on any device and for any number of iterations over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, scaled to [0, 1] and normalised; the same operations (and bits) as
    torchvision's ``v2.ToDtype(float32, scale=True)`` followed by ``v2.Normalize``."""
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of a batch to ``size`` x ``size`` (same rounding as torchvision's ``center_crop``)."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def crop_flip(images: torch.Tensor, size: int, padding: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop of a zero-padded batch plus horizontal flip, as one gather.

    Args:
        images: (B, C, H, W), any dtype, with H, W >= size.
        size: Output side.
        padding: Zero padding added on every side before cropping (torchvision's ``RandomCrop(padding=...)``).
        offsets: (B, 2) integer (top, left) of each crop in the padded image, in [0, H + 2p - size] x [0, W + 2p - size].
        flips: (B,) bool, flip this sample left-right.
    """
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    b, c = padded.shape[:2]
    ar = torch.arange(size, device=images.device)
    rows = offsets[:, 0:1] + ar                                   # (B, size)
    cols = torch.where(flips[:, None], offsets[:, 1:2] + (size - 1 - ar), offsets[:, 1:2] + ar)
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceImageLoader:
    """Iterates over (images, targets) batches built on the device the tensors live on.

    Args:
        images: uint8 (N, C, H, W), already decoded (see ``decode_transform``).
        targets: (N,) int64 labels.
        batch_size: Samples per batch.
        mean: Per-channel normalisation mean (in [0, 1] units).
        std: Per-channel normalisation std.
        image_size: Output side; larger decoded images are centre-cropped (eval) first.
        shuffle: Shuffle every epoch (permutation from ``seed + epoch``).
        augment: 4-pixel padded random crop + horizontal flip (only for images of side <= 32).
        drop_last: Drop the last incomplete batch (kept when the set is smaller than one batch).
        padding: Crop padding when ``augment``.
        seed: Base seed of the per-epoch generator.
        epoch_fn: Returns the current epoch (e.g. the trainer's); ``None``: count the passes over the loader.
        num_replicas: Data-parallel world size: each rank takes every ``num_replicas``-th sample of the epoch's order.
        rank: This process's rank in ``num_replicas``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], image_size: int | None = None, shuffle: bool = False, augment: bool = False,
                 drop_last: bool = False, padding: int = 4, seed: int = 0, epoch_fn: Callable[[], int | None] | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.images, self.targets = images, targets.long()
        self.batch_size = int(batch_size)
        self.image_size = int(image_size or images.shape[-1])
        self.shuffle, self.augment, self.padding = shuffle, augment, int(padding)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.drop_last = drop_last and self._local_len() > self.batch_size
        self.seed = int(seed)
        self.epoch_fn = epoch_fn
        self._passes = 0
        self._mean_list, self._std_list = [float(m) for m in mean], [float(s) for s in std]
        self._stats(images.device)

    def _stats(self, device: torch.device) -> None:
        self.mean = torch.tensor(self._mean_list, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(self._std_list, dtype=torch.float32, device=device).view(-1, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> DeviceImageLoader:
        """Moves the images, targets and statistics to ``device`` (once; a no-op when already there)."""
        device = torch.device(device)
        if self.images.device != device:
            self.images = self.images.to(device)
            self.targets = self.targets.to(device)
            self._stats(device)
        return self

    def _local_len(self) -> int:
        n = int(self.targets.shape[0])
        return (n - self.rank + self.num_replicas - 1) // self.num_replicas if self.num_replicas > 1 else n

    def __len__(self) -> int:
        n = self._local_len()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def current_epoch(self) -> int:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        return self._passes if epoch is None else int(epoch)

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order, crop offsets, flips) of ``epoch`` for this rank, made on the CPU from ``seed + epoch``."""
        n = int(self.targets.shape[0])
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:
            span = self.images.shape[-1] + 2 * self.padding - self.image_size
            offsets = torch.randint(0, span + 1, (n, 2), generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
        if self.num_replicas > 1:
            order = order[self.rank::self.num_replicas]
            if offsets is not None:
                offsets, flips = offsets[self.rank::self.num_replicas], flips[self.rank::self.num_replicas]
        return order, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.current_epoch()
        self._passes += 1
        order, offsets, flips = self.epoch_plan(epoch)
        dev = self.device
        order = order.to(dev, non_blocking=True)
        if offsets is not None:
            offsets, flips = offsets.to(dev, non_blocking=True), flips.to(dev, non_blocking=True)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            x = self.images.index_select(0, idx)
            if offsets is not None:
                x = crop_flip(x, self.image_size, self.padding, offsets[sl], flips[sl])
            else:
                x = center_crop(x, self.image_size)
            yield normalize_uint8(x, self.mean, self.std), self.targets.index_select(0, idx)
