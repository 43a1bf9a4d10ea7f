"""DigitsDataModule(val_size=...): a deterministic, stratified validation split held out of the training split."""

from __future__ import annotations

import pytest
import torch

from sdq_lightning.data import DigitsDataModule


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _rows(ds) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.images}


def test_held_out_validation_is_disjoint_from_train_and_test() -> None:
    dm = _setup(val_size=0.2)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1077, 270, 450)
    assert dm.val_set is not dm.test_set
    train, val, test = _rows(dm.train_set), _rows(dm.val_set), _rows(dm.test_set)
    # digits holds a few exact duplicate images; the splits are by sample, so only those may repeat
    assert len(val & test) <= 3 and len(val & train) <= 3
    counts = torch.bincount(dm.val_set.targets, minlength=10)
    assert counts.min() >= 26 and counts.max() <= 28  # stratified
    batch = next(iter(dm.test_dataloader()))[1]
    assert torch.equal(batch, dm.test_set.targets[: len(batch)])


def test_val_size_as_count_and_determinism() -> None:
    a, b = _setup(val_size=300), _setup(val_size=300)
    assert len(a.val_set) == 300 and len(a.train_set) == 1047
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(_setup(val_size=300, seed=1).val_set.targets, a.val_set.targets)


def test_test_split_does_not_depend_on_val_size() -> None:
    assert torch.equal(_setup(val_size=0.2).test_set.targets, _setup().test_set.targets)


def test_val_size_zero_keeps_validation_on_the_test_split() -> None:
    dm = _setup()
    assert dm.val_set is dm.test_set and len(dm.train_set) == 1347


def test_normalisation_uses_the_reduced_training_split() -> None:
    dm = _setup(val_size=0.2)
    assert abs(float(dm.train_set.images.mean())) < 1e-5
    assert abs(float(dm.val_set.images.mean())) > 1e-4


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5, True, "0.2"])
def test_bad_val_size(bad) -> None:
    with pytest.raises(ValueError, match=r"dataset.val_size must be 0, a fraction in \(0, 1\) or a sample count"):
        DigitsDataModule(val_size=bad)


def test_val_size_count_too_large() -> None:
    with pytest.raises(ValueError, match="dataset.val_size must leave >= 10 samples on each side of the 1347-sample"):
        _setup(val_size=1340)
