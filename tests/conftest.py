"""Shared by every test: the async backend, the order of the run, and room to run it in."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis's default 200 ms deadline per example is a timing assertion: on a 2-core machine
# running nginx, upstreams and daemons beside the suite, a slow example is load, not a bug.
settings.register_profile("guardd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("guardd")


# What a run holds under its temporary directory at once: about 1.5 GB at the peak, early
# on, while the fleet tests run side by side, each with three etcd members that preallocate
# 64 MB WAL files (sampled every 5 s over a whole run on 2 cores). A passing test's folder
# is removed as it ends (`tmp_path_retention_policy` in pyproject.toml). A part of the
# suite may need far less: `GUARDD_TEST_TMP_MIB` says how much to ask for instead.
TMP_NEEDED_MIB = 2048
MIB = 1024**2


def tmp_space_problem(where: Path, free: int, need_mib: int = TMP_NEEDED_MIB) -> str | None:
    """Why a run cannot start with `free` bytes under `where`, or None when it can."""
    if free >= need_mib * MIB:
        return None
    return (
        f"{where}: {free // MIB:,} MiB free, and the test suite needs {need_mib:,} MiB there "
        "at its peak. Free some space, point TMPDIR at a file system with room, or set "
        "GUARDD_TEST_TMP_MIB to what a part of the suite needs (0: no check)."
    )


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to start with too little room for the run's temporary files: one clear line
    rather than a thousand errors once the disk fills under etcd, nginx and the daemons.

    Raises `pytest.UsageError` (exit status 4) before any test is collected.
    """
    if hasattr(config, "workerinput"):
        return  # a pytest-xdist worker: the controller checked for every one
    raw = os.environ.get("GUARDD_TEST_TMP_MIB", str(TMP_NEEDED_MIB))
    if not raw.isdigit():
        raise pytest.UsageError(f"GUARDD_TEST_TMP_MIB={raw!r}: not a whole number of MiB")
    where = Path(config.option.basetemp or tempfile.gettempdir()).absolute()
    while not where.exists():
        where = where.parent
    problem = tmp_space_problem(where, shutil.disk_usage(where).free, int(raw))
    if problem is not None:
        raise pytest.UsageError(problem)


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
