"""LightningDataModules: CIFAR-10, ImageFolder trees (ImageNet-style) and scikit-learn digits."""

from sdq_lightning.data.cifar10 import CIFAR10DataModule
from sdq_lightning.data.digits import DigitsDataModule
from sdq_lightning.data.imagefolder import ImageFolderDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageFolderDataModule"]
