"""End-to-end fixtures: a lab of real upstreams behind a real nginx, guarded by real guardd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import Lab, MakeLab


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[MakeLab]:
    """A factory of labs; every lab it made is torn down after the test."""
    made: list[Lab] = []

    def factory(**overrides: Any) -> Lab:
        lab = Lab(tmp_path / f"lab{len(made)}", **overrides)
        made.append(lab)
        return lab

    (tmp_path / "lab0").mkdir()
    for i in range(1, 4):
        (tmp_path / f"lab{i}").mkdir()
    yield factory
    for lab in made:
        lab.close()
