"""Fixtures that boot a real systemd 252 with guardd installed; see tests.harness.nspawn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.nspawn import Container, remove_stale_cgroups, unique_name
from tests.harness.rootfs import build_image, ensure_host_tools
from tests.harness.wheelhouse import build_wheelhouse

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def systemd_image() -> Path:
    """Return the cached bookworm image, installing host tools and building it if needed."""
    ensure_host_tools()
    remove_stale_cgroups()
    return build_image()


@pytest.fixture(scope="session")
def guardd_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder of wheels for guardd from this checkout and its runtime dependencies."""
    return build_wheelhouse(PROJECT, tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture
def container(systemd_image: Path, guardd_wheelhouse: Path) -> Iterator[Container]:
    """Yield a booted container with guardd installed; it is torn down even if the test fails."""
    with Container(systemd_image, unique_name()) as booted:
        booted.install_guardd(guardd_wheelhouse)
        booted.boot()
        yield booted
