"""Every interop test parses gins into gin's global configuration: start and end clean."""

import gin
import pytest


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
