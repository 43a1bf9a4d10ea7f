"""ImageNet-style folder trees: ``root/train/<class>/*`` and ``root/test/`` (or ``root/val/``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder

from sdq_lightning.data._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorImageDataset,
    check_subset,
    decode_to_tensors,
    make_loader,
    subset_indices,
)
from sdq_lightning.data.device import DeviceImageLoader
from sdq_lightning.data.transforms import SMALL_IMAGE, decode_transform, eval_transform, train_transform


def find_split_dirs(root: str | Path, val_dir: str | None = None) -> tuple[Path, Path]:
    """Returns ``(train_dir, eval_dir)`` of an ImageFolder tree or raises ``FileNotFoundError``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.root '{root}' does not exist; set dataset.root=/path/to/data")
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"dataset.root '{root}' has no train/ folder (expected train/<class>/*.jpg)")
    names = [val_dir] if val_dir else ["test", "val"]
    for name in names:
        if (root / name).is_dir():
            return train, root / name
    raise FileNotFoundError(f"dataset.root '{root}' has no {' or '.join(n + '/' for n in names)} folder")


class ImageFolderDataModule(L.LightningDataModule):
    """Any ImageFolder tree (ImageNet, or CIFAR-10 stored as JPEG folders).

    Test reads the evaluation folder (``test/`` or ``val/``). Validation reads it too, unless ``val_size`` holds out
    a class-balanced part of ``train/`` for validation (fixed by ``split_seed``, the same for every run seed), so
    that choices (model selection, the guard, plan comparisons) never see the test images. Images of side
    <= 32 get CIFAR augmentation (4-pixel padded random crop, flip); larger ones ImageNet
    augmentation (RandomResizedCrop, flip; eval: resize to size/0.875 and centre crop).

    Args:
        root: Folder holding ``train/`` and ``test/`` or ``val/``.
        image_size: Training/eval side length.
        batch_size: Samples per batch.
        num_workers: DataLoader workers (also used to decode when ``in_memory``).
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        subset: Keep only this many (class-balanced) training samples.
        val_subset: Keep only this many evaluation samples; ``None`` uses ``subset``.
        in_memory: Decode every image once into a uint8 tensor and augment from memory.
        on_device: Also move the decoded uint8 tensors once to the trainer's device and build every batch there
            (batched crop/flip/normalise, see ``sdq_lightning.data.device``); implies ``in_memory``. Training
            augmentation on the device exists for images of side <= 32 (CIFAR-style) only.
        augment: Random training augmentation on/off.
        val_dir: Name of the evaluation folder; ``None`` picks ``test`` then ``val``.
        num_classes: Expected class count; ``None`` takes it from the folder.
        in_chans: Must be 3 (RGB).
        seed: Seed of the subsets (and, with ``on_device``, of the per-epoch shuffle and augmentation).
        val_size: Training images held out for validation (class-balanced); 0 validates on the test folder.
        split_seed: Seed of the held-out validation split (independent of ``seed``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        mean: list[float] | tuple[float, ...] = IMAGENET_MEAN,
        std: list[float] | tuple[float, ...] = IMAGENET_STD,
        subset: int | None = None,
        val_subset: int | None = None,
        in_memory: bool = False,
        augment: bool = True,
        on_device: bool = False,
        val_dir: str | None = None,
        num_classes: int | None = None,
        in_chans: int = 3,
        seed: int = 0,
        val_size: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if root is None or str(root) in ("", "???"):
            raise FileNotFoundError("dataset.root is not set; pass dataset.root=/path/to/data")
        if in_chans != 3:
            raise ValueError(f"dataset.in_chans must be 3 for RGB image folders, got {in_chans!r}")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"dataset.image_size must be a positive int, got {image_size!r}")
        if batch_size <= 0:
            raise ValueError(f"dataset.batch_size must be positive, got {batch_size!r}")
        self.root = str(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.subset = check_subset("dataset.subset", subset)
        self.val_subset = check_subset("dataset.val_subset", val_subset) if val_subset is not None else self.subset
        if on_device and augment and image_size > SMALL_IMAGE:
            raise ValueError(f"dataset.on_device augments on the device only for image_size <= {SMALL_IMAGE} "
                             f"(got {image_size}); use on_device=false or augment=false")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"dataset.val_size must be 0 or a positive number of training images, got {val_size!r}")
        self.val_size = val_size
        self.split_seed = int(split_seed)
        self.on_device = bool(on_device)
        self.in_memory = bool(in_memory) or self.on_device
        self.augment = augment
        self.val_dir = val_dir
        self.in_chans = 3
        self.seed = seed
        self._expected_classes = num_classes
        self._num_classes: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._device_loaders: dict[str, DeviceImageLoader] = {}

    @property
    def num_classes(self) -> int:
        """Class count read from ``train/`` (checked against the configured one)."""
        if self._num_classes is None:
            self._num_classes = self._count_classes()
            if self._expected_classes is not None and self._expected_classes != self._num_classes:
                raise ValueError(
                    f"dataset.num_classes={self._expected_classes} but '{self.root}' has {self._num_classes} classes"
                )
        return self._num_classes

    def _count_classes(self) -> int:
        train, _ = find_split_dirs(self.root, self.val_dir)
        return sum(1 for p in train.iterdir() if p.is_dir())

    def prepare_data(self) -> None:
        find_split_dirs(self.root, self.val_dir)

    def _raw_splits(self) -> tuple[Dataset, list[int], Dataset, list[int]]:
        """(train dataset without transform, its targets, eval dataset, its targets)."""
        train_dir, eval_dir = find_split_dirs(self.root, self.val_dir)
        train, test = ImageFolder(str(train_dir)), ImageFolder(str(eval_dir))
        return train, list(train.targets), test, list(test.targets)

    def _split(self, ds: Dataset, idx: list[int] | None, train: bool) -> Dataset:
        """``ds`` restricted to ``idx`` (``None``: all of it) with the training or evaluation transform."""
        if self.in_memory:
            ds.transform = decode_transform(self.image_size)
            images, labels = decode_to_tensors(ds if idx is None else Subset(ds, idx), self.num_workers)
            tf = (train_transform(self.image_size, self.mean, self.std, self.augment, decoded=True) if train
                  else eval_transform(self.image_size, self.mean, self.std, decoded=True))
            return TensorImageDataset(images, labels, tf)
        ds.transform = (train_transform(self.image_size, self.mean, self.std, self.augment) if train
                        else eval_transform(self.image_size, self.mean, self.std))
        return ds if idx is None else Subset(ds, idx)

    def _holdout(self, targets: list[int]) -> tuple[list[int] | None, list[int]]:
        """(training indices, held-out validation indices) of ``train/``; ``(None, [])`` without ``val_size``."""
        if not self.val_size:
            return None, []
        if self.val_size > len(targets) - 10:
            raise ValueError(f"dataset.val_size={self.val_size} leaves fewer than 10 of the {len(targets)} training "
                             f"images; use a smaller val_size or 0 (validate on the test split)")
        held = subset_indices(targets, self.val_size, self.split_seed)
        held_set = set(held)
        return [i for i in range(len(targets)) if i not in held_set], held

    @staticmethod
    def _pick(base: list[int] | None, targets: list[int], limit: int | None, seed: int) -> list[int] | None:
        """A class-balanced ``limit`` of the indices ``base`` (``None``: all) of a split with ``targets``."""
        if base is None:
            return subset_indices(targets, limit, seed)
        sub = subset_indices([targets[i] for i in base], limit, seed)
        return base if sub is None else [base[i] for i in sub]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            if self.on_device:
                for loader in self._device_loaders.values():
                    loader.to(self.target_device())
            return
        _ = self.num_classes
        train, train_targets, test, test_targets = self._raw_splits()
        train_idx, held = self._holdout(train_targets)
        self.train_set = self._split(train, self._pick(train_idx, train_targets, self.subset, self.seed), train=True)
        self.test_set = self._split(test, subset_indices(test_targets, self.val_subset, self.seed), train=False)
        if held:
            # A second view of train/ without augmentation: the training set keeps its own transform.
            held_view, _, _, _ = self._raw_splits()
            self.val_set = self._split(held_view, self._pick(held, train_targets, self.val_subset, self.seed),
                                       train=False)
        else:
            self.val_set = self.test_set

    def target_device(self) -> torch.device:
        """Where ``on_device`` keeps the data: the trainer's root device, else the CPU."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def device_loader(self, split: str) -> DeviceImageLoader:
        """The on-device loader of ``split`` (``train`` or ``val``), made once and moved to ``target_device()``."""
        if split not in self._device_loaders:
            train = split == "train"
            ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
            trainer = self.trainer
            self._device_loaders[split] = DeviceImageLoader(
                ds.images, ds.targets, self.batch_size, self.mean, self.std, image_size=self.image_size,
                shuffle=train, augment=train and self.augment, drop_last=train, seed=self.seed,
                epoch_fn=(lambda: self.trainer.current_epoch if self.trainer is not None else None) if train else None,
                num_replicas=trainer.world_size if trainer is not None else 1,
                rank=trainer.global_rank if trainer is not None else 0)
        return self._device_loaders[split].to(self.target_device())

    def train_dataloader(self) -> DataLoader | DeviceImageLoader:
        if self.on_device:
            return self.device_loader("train")
        return make_loader(self.train_set, self.batch_size, self.num_workers, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader | DeviceImageLoader:
        if self.on_device:
            return self.device_loader("val")
        return make_loader(self.val_set, self.batch_size, self.num_workers, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceImageLoader:
        if self.val_set is self.test_set:
            return self.val_dataloader()
        if self.on_device:
            return self.device_loader("test")
        return make_loader(self.test_set, self.batch_size, self.num_workers, shuffle=False)
