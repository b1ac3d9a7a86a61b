"""Fault points: armed by a file, and cheap on the hot path, where they run every tick."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from guardd import faults
from guardd.faults import FaultPoints, InjectedFault

LOOPS = ("probe_blue", "probe_green", "front_door")


def test_an_armed_point_raises_and_says_it_was_reached(tmp_path: Path) -> None:
    points = FaultPoints(str(tmp_path))
    (tmp_path / "raise_in_probe_blue").touch()
    with pytest.raises(InjectedFault, match="raise_in_probe_blue"):
        anyio.run(points.fail, f"raise_in_{LOOPS[0]}")
    assert (tmp_path / "raise_in_probe_blue.reached").read_text() == str(os.getpid())
    anyio.run(points.fail, f"raise_in_{LOOPS[1]}")  # not armed: returns
    assert not (tmp_path / "raise_in_probe_green.reached").exists()


def test_without_a_directory_no_point_is_armed() -> None:
    points = FaultPoints("")
    assert points.dir is None
    assert not points.armed("raise_in_probe_blue")
    anyio.run(points.fail, "raise_in_probe_blue")


def test_an_unarmed_check_interns_no_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name built afresh on every check (as the probe loops do) must not be interned on
    every check: CPython's interned-string table then churns and is reallocated (1-2 MiB)
    every few minutes at a 50 ms interval, each time leaving a hole in the heap."""
    points = FaultPoints(str(tmp_path))

    async def checks(rounds: int) -> None:
        for _ in range(rounds):
            for loop in LOOPS:
                await points.fail(f"raise_in_{loop}")

    anyio.run(checks, 1)  # the first check of a name may build its path
    interned: list[str] = []
    real = sys.intern

    def counting(s: str) -> str:
        interned.append(s)
        return real(s)

    monkeypatch.setattr(sys, "intern", counting)
    anyio.run(checks, 1000)
    assert interned == []


def test_the_kept_paths_are_bounded(tmp_path: Path) -> None:
    points = FaultPoints(str(tmp_path))
    for n in range(faults._MAX_POINTS * 4):
        assert not points.armed(f"made_up_{n}")
    assert len(points._paths) == faults._MAX_POINTS
    (tmp_path / "made_up_1000").touch()
    assert points.armed("made_up_1000")  # past the cap, a point still works
