"""Small models shared by the unit tests (imported as ``from _nets import ...``; pytest puts tests/unit on the path)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_net() -> nn.Sequential:
    """Three layers on a 1x4x4 input: conv 1->4 (36 weights, 576 MACs), conv 4->8 with bias (288 weights,
    4608 MACs), linear 128->10 with bias (1280 weights, 1280 MACs); 18 bias parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, bias=True), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
