"""The harness's reading of /proc holds while the process it reads exits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.procs import is_gone


def test_a_process_that_exits_between_open_and_read_fails_the_read_with_esrch() -> None:
    """The race behind `is_gone`: the open of /proc/PID/stat succeeds, the read does not."""
    child = subprocess.Popen(["sleep", "300"])
    with Path(f"/proc/{child.pid}/stat").open() as stat:
        child.kill()
        child.wait()
        with pytest.raises(ProcessLookupError):
            stat.read()


def test_is_gone_tells_live_zombie_and_reaped_processes_apart() -> None:
    child = subprocess.Popen(["sleep", "300"])
    assert not is_gone(child.pid)
    child.kill()
    # Not reaped yet: a zombie, which counts as gone.
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, "the killed child never became a zombie"
    assert is_gone(child.pid)
    child.wait()
    assert is_gone(child.pid)
