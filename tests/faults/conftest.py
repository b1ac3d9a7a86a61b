"""Fault fixtures: labs of real upstreams, nginx and guardd, and a small tmpfs to fill."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.util import FaultLab, MakeFaultLab


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[MakeFaultLab]:
    """A factory of labs; every lab it made is torn down after the test."""
    made: list[FaultLab] = []

    def factory(**overrides: Any) -> FaultLab:
        where = tmp_path / f"lab{len(made)}"
        where.mkdir()
        lab = FaultLab(where, **overrides)
        made.append(lab)
        return lab

    yield factory
    for lab in made:
        lab.close()


@pytest.fixture
def small_tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mount a tmpfs of a given size on a directory (we are root); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(where: Path, size: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(where)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=30)
