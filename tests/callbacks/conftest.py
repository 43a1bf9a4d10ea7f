"""Fixtures for callback tests: real scikit-learn digits with a fixed split (helpers.data), a quiet trainer and a
trained FP teacher."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest

# scripts in experiments/ import this file (and the test modules here) with only this folder on sys.path
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from helpers.data import Loaders  # noqa: E402
from sdq_lightning import SDQClassifier  # noqa: E402


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
