"""Test-wide settings: Hypothesis profiles; the ``gpu`` marker; importing sdq_lightning registers its timm models.
Shared helpers (digits data, a user module, searched models) live in the ``helpers`` package next to this file."""

from __future__ import annotations

import os

# Eager LSQ kernels unless a test asks for compiled ones (the app's default is compile; compiling costs seconds per
# process, and subprocess tests inherit this).
os.environ.setdefault("SDQ_KERNELS", "eager")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import sdq_lightning  # noqa: E402,F401  (registers resnet20/32/56 and digits_cnn in timm)

# Property tests stay fast and deterministic in CI; `HYPOTHESIS_PROFILE=thorough pytest ...` explores more.
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.gpu`` is the whole GPU gate: without CUDA those tests are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
