"""Train/eval transforms: CIFAR-style for images of side <= 32, ImageNet-style above."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

SMALL_IMAGE = 32


def resize_size(image_size: int) -> int:
    """Side length before the centre crop for ImageNet-style evaluation (224 -> 256)."""
    return int(round(image_size / 0.875))


def decode_transform(image_size: int) -> v2.Compose:
    """Deterministic transform used when decoding into memory: uint8 CHW tensors of a fixed size."""
    side = image_size if image_size <= SMALL_IMAGE else resize_size(image_size)
    return v2.Compose([v2.ToImage(), v2.Resize(side, antialias=True), v2.CenterCrop(side)])


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool = True,
                    decoded: bool = False) -> v2.Compose:
    """Training transform. ``decoded``: input already passed through ``decode_transform``."""
    ops: list = [] if decoded else [v2.ToImage()]
    if image_size <= SMALL_IMAGE:
        if not decoded:
            ops += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
        if augment:
            ops += [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]
    elif augment:
        ops += [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops += [v2.Resize(resize_size(image_size), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(ops + _finish(mean, std))


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], decoded: bool = False) -> v2.Compose:
    """Evaluation transform: resize + centre crop (ImageNet-style) or plain resize (small images)."""
    ops: list = [] if decoded else [v2.ToImage()]
    if image_size <= SMALL_IMAGE:
        if not decoded:
            ops += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    else:
        if not decoded:
            ops += [v2.Resize(resize_size(image_size), antialias=True)]
        ops += [v2.CenterCrop(image_size)]
    return v2.Compose(ops + _finish(mean, std))
