"""Fixtures shared by every test: the async backend and free loopback ports."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis's default 200 ms deadline per example is a timing assertion: on a 2-core machine
# running nginx, upstreams and daemons beside the suite, a slow example is load, not a bug.
settings.register_profile("guardd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("guardd")


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio, the loop guardd runs on in production."""
    return "asyncio"
