"""LightningDataModules: CIFAR-10, ImageFolder trees (ImageNet-style) and scikit-learn digits, and the registry
that names them for the app (``dataset.name``); see :func:`register_dataset` to add one."""

from sdq_lightning.data.registry import DATASETS, dataset_class, register_dataset, registered_datasets
from sdq_lightning.data.cifar10 import CIFAR10DataModule  # noqa: I001  (registry first)
from sdq_lightning.data.digits import DigitsDataModule
from sdq_lightning.data.imagefolder import ImageFolderDataModule

register_dataset("cifar10", CIFAR10DataModule)
register_dataset("imagefolder", ImageFolderDataModule)
register_dataset("digits", DigitsDataModule)

__all__ = ["DATASETS", "CIFAR10DataModule", "DigitsDataModule", "ImageFolderDataModule", "dataset_class",
           "register_dataset", "registered_datasets"]
