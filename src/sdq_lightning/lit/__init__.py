"""Reference LightningModule and data helpers."""

from sdq_lightning.lit.classifier import SDQClassifier
from sdq_lightning.lit.sampler import EpochSeededSampler

__all__ = ["EpochSeededSampler", "SDQClassifier"]
