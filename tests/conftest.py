"""Shared test helpers: deterministic seeding, tiny models, timm factories (no Lightning needed here)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

import sdq_lightning  # noqa: F401  (registers resnet20/32/56 and digits_cnn in timm)

# Property tests stay fast and deterministic in CI; `HYPOTHESIS_PROFILE=thorough pytest ...` explores more.
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def tiny_net() -> nn.Sequential:
    """Three layers on a 1x4x4 input: conv 1->4 (36 weights, 576 MACs), conv 4->8 with bias (288 weights,
    4608 MACs), linear 128->10 with bias (1280 weights, 1280 MACs); 18 bias parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, bias=True), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


@pytest.fixture
def tiny() -> nn.Sequential:
    return tiny_net()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.randn(1, 1, 4, 4)
