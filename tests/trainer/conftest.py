"""Fixtures shared by the trainer's tests."""

import gin
import pytest


@pytest.fixture
def clean_gin():
    """Start and end with an empty gin configuration (for tests that parse gin files)."""
    gin.clear_config()
    yield
    gin.clear_config()
