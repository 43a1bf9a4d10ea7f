"""Fixtures of the app tests (helpers live in app_helpers.py)."""

import pytest

from app_helpers import TINY


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
