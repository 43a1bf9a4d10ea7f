"""CIFAR-10 through torchvision (download for users online), or from a local ImageFolder copy."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from sdq_lightning.data._common import CIFAR10_MEAN, CIFAR10_STD
from sdq_lightning.data.imagefolder import ImageFolderDataModule

OFFLINE_HINT = (
    "point at local data: dataset.root=/dir/holding/cifar-10-batches-py, "
    "or for a folder tree with train/ and test/: dataset=imagefolder dataset.root=/path/to/cifar10"
)


def _is_folder_tree(root: str) -> bool:
    return (Path(root) / "train").is_dir() and any((Path(root) / d).is_dir() for d in ("test", "val"))


class CIFAR10DataModule(ImageFolderDataModule):
    """CIFAR-10 with standard augmentation (4-pixel padded random crop, flip) and normalisation.

    Reads torchvision's binary release under ``root`` (downloading it when ``download`` is true),
    or, when ``root`` is an ImageFolder tree (``train/``, ``test/``), that tree. Validation and
    test both use the 10,000 test images (CIFAR-10 has no separate validation split).

    Args:
        root: Folder holding ``cifar-10-batches-py`` (or an ImageFolder tree).
        download: Download the binary release when it is missing.
        image_size: Side length (32 unless a backbone needs otherwise).
        **kwargs: Everything else of ``ImageFolderDataModule``.
    """

    def __init__(self, root: str, download: bool = True, image_size: int = 32,
                 mean: list[float] | tuple[float, ...] = CIFAR10_MEAN,
                 std: list[float] | tuple[float, ...] = CIFAR10_STD,
                 num_classes: int | None = 10, **kwargs) -> None:
        super().__init__(root=root, image_size=image_size, mean=mean, std=std, num_classes=num_classes, **kwargs)
        self.download = download

    def _count_classes(self) -> int:
        return super()._count_classes() if _is_folder_tree(self.root) else 10

    def _torchvision(self, train: bool) -> CIFAR10:
        try:
            return CIFAR10(self.root, train=train, download=self.download)
        except Exception as err:  # torchvision raises RuntimeError / URLError / OSError here
            how = "could not be downloaded" if self.download else "is missing and download=false"
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FileNotFoundError(
                f"CIFAR-10 not found under dataset.root='{self.root}' and {how} ({reason}); {OFFLINE_HINT}"
            ) from None

    def prepare_data(self) -> None:
        if not _is_folder_tree(self.root):
            self._torchvision(train=True)
            self._torchvision(train=False)

    def _raw_splits(self) -> tuple[Dataset, list[int], Dataset, list[int]]:
        if _is_folder_tree(self.root):
            return super()._raw_splits()
        train, test = self._torchvision(True), self._torchvision(False)
        return train, list(train.targets), test, list(test.targets)
