"""The test suite refuses to start without room for its temporary files, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MIB, TMP_NEEDED_MIB, tmp_space_problem

REPO = Path(__file__).resolve().parents[2]


def test_the_problem_names_the_place_the_room_and_the_ways_out(tmp_path: Path) -> None:
    assert tmp_space_problem(tmp_path, TMP_NEEDED_MIB * MIB) is None
    assert tmp_space_problem(tmp_path, 2**40) is None
    assert tmp_space_problem(tmp_path, 0, need_mib=0) is None
    # Whole MiB, rounded down: never "2.0 GiB free" beside "needs 2 GiB".
    assert tmp_space_problem(tmp_path, TMP_NEEDED_MIB * MIB - 1) == (
        f"{tmp_path}: 2,047 MiB free, and the test suite needs 2,048 MiB there at its peak. "
        "Free some space, point TMPDIR at a file system with room, or set "
        "GUARDD_TEST_TMP_MIB to what a part of the suite needs (0: no check)."
    )


def _pytest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", *args, "tests/test_fsutil.py"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("how", ["TMPDIR", "--basetemp"])
def test_a_run_on_a_full_disk_stops_before_any_test_with_one_line(
    tmp_path: Path, small_tmpfs: Callable[[Path, str], Path], how: str
) -> None:
    small = small_tmpfs(tmp_path / "small", "1m")
    env = {"TMPDIR": str(small) if how == "TMPDIR" else str(tmp_path)}
    args = ["--basetemp", str(small / "run")] if how == "--basetemp" else []
    run = _pytest({**env, "GUARDD_TEST_TMP_MIB": str(TMP_NEEDED_MIB)}, *args)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    out = run.stdout + run.stderr
    line = f"ERROR: {small}: 1 MiB free, and the test suite needs 2,048 MiB there at its peak."
    assert out.count(line) == 1, out  # said once
    assert "collected" not in out  # stopped before collecting a test, let alone running one


def test_a_part_of_the_suite_runs_on_less_room_when_asked(
    tmp_path: Path, small_tmpfs: Callable[[Path, str], Path]
) -> None:
    small = small_tmpfs(tmp_path / "small", "50m")
    run = _pytest({"TMPDIR": str(small), "GUARDD_TEST_TMP_MIB": "20"}, "-q")
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout
    bad = _pytest({"TMPDIR": str(small), "GUARDD_TEST_TMP_MIB": "2G"})
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: GUARDD_TEST_TMP_MIB='2G': not a whole number of MiB" in bad.stderr
