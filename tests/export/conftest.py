"""Session fixtures for the export tests (models built once, shared by every test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export_helpers import build_mixed
from helpers.data import digits_images

@pytest.fixture(scope="session")
def resnet20_mixed() -> nn.Module:
    return build_mixed("resnet20")


@pytest.fixture(scope="session")
def mobilenetv2_mixed() -> nn.Module:
    return build_mixed("mobilenetv2_100", fp_steps=2, qat_steps=2, batch=16)  # its CPU backward is slow


@pytest.fixture(scope="session")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_images(1024)
    return x[-256:], y[-256:]  # images not used for training
