"""Fixtures for callback tests: real scikit-learn digits with a fixed split, and a trained FP teacher."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from sdq_lightning import SDQClassifier
from sdq_lightning.lit import EpochSeededSampler


def digits_split() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)


class Loaders:
    def __init__(self) -> None:
        self.train_set, self.test_set = digits_split()

    def train(self, batch_size: int = 64, seed: int = 0) -> DataLoader:
        return DataLoader(self.train_set, batch_size=batch_size, sampler=EpochSeededSampler(self.train_set, seed))

    def test(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def make_trainer(tmp_path):
    """quiet_trainer writing into the test's tmp dir unless told otherwise (plan.yaml lands in the root dir)."""

    def make(**kwargs) -> L.Trainer:
        kwargs.setdefault("default_root_dir", tmp_path)
        return quiet_trainer(**kwargs)

    return make


@pytest.fixture(scope="session")
def digits() -> Loaders:
    return Loaders()


@pytest.fixture(scope="session")
def fp_teacher(digits: Loaders) -> SDQClassifier:
    """digits_cnn trained in FP for 6 epochs (a few seconds)."""
    L.seed_everything(0, verbose=False)
    teacher = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    quiet_trainer(max_epochs=6).fit(teacher, digits.train(), digits.test())
    return teacher
