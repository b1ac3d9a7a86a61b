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


# The modules whose tests run longest (tens of seconds each: real fleets, packages, booted
# systemd), measured with `--durations=0` on a 2-core machine. pytest-xdist hands tests out
# in collection order: started first, they no longer leave one worker finishing a long test
# while the others sit idle at the end of the run.
_LONGEST_FIRST = (
    "tests/e2e/test_fleet.py",
    "tests/packaging/",
    "tests/systemd/",
    "tests/replay/test_fail_closed.py",
    "tests/e2e/",
)


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    for rank, prefix in enumerate(_LONGEST_FIRST):
        if path.startswith(prefix):
            return rank
    return len(_LONGEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest modules first (a stable sort: each keeps its own order)."""
    items.sort(key=_rank)
