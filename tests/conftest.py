"""Fixtures shared by every test: the async backend and free loopback ports."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio, the loop guardd runs on in production."""
    return "asyncio"
