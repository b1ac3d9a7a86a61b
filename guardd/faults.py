"""Test-only fault points: pause guardd at a named step so a test can kill or stall it.

Active only when `GUARDD_FAULT_DIR` names a directory. At a point `NAME`, if the file
`NAME` exists there, guardd writes `NAME.reached` and waits until `NAME` is removed
(`reach`), or raises `InjectedFault` (`fail`, `fail_now`), for as long as the file exists.
Production never sets the variable, and then every point is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio


class InjectedFault(RuntimeError):
    """The exception a `fail` point raises: a stand-in for a bug guardd did not foresee."""


#: Fault points named so far, each with its file's `Path`. The names are a fixed vocabulary
#: (a few dozen, built from loop, color and step names); the cap only guards a caller that
#: would make names up as it goes: past it, paths are built per call and not kept.
_MAX_POINTS = 256


class FaultPoints:
    """Named pause points driven by files in a directory.

    Points are checked on every probe and tick. Each point's `Path` is built once and kept:
    a `Path` interns its parts, and a name built afresh per call (`f"probe_{color}"`) was
    added to CPython's interned-string table and dropped again each time. At a 50 ms
    interval that churn made the table reallocate (1-2 MiB) every few minutes, and each
    reallocation left a hole in the heap that RSS never gave back.
    """

    def __init__(self, directory: str | None = None) -> None:
        chosen = directory if directory is not None else os.environ.get("GUARDD_FAULT_DIR")
        self.dir = Path(chosen) if chosen else None
        self._paths: dict[str, Path] = {}

    def armed(self, name: str) -> bool:
        """Whether point `name`'s file exists (never, without a directory)."""
        if self.dir is None:
            return False
        path = self._paths.get(name)
        if path is None:
            path = self.dir / name
            if len(self._paths) < _MAX_POINTS:
                self._paths[name] = path
        return path.exists()

    async def reach(self, name: str) -> None:
        """Pause here while the point is armed."""
        if self.dir is None or not self.armed(name):
            return
        (self.dir / f"{name}.reached").write_text(str(os.getpid()))
        # Polling a file is the point: the test process controls it from outside.
        while self.armed(name):  # noqa: ASYNC110
            await anyio.sleep(0.02)

    async def fail(self, name: str) -> None:
        """Raise `InjectedFault` here while the point is armed."""
        self.fail_now(name)

    def fail_now(self, name: str) -> None:
        """`fail` for code that does not await (a point between two ticks' awaits)."""
        if self.dir is None or not self.armed(name):
            return
        (self.dir / f"{name}.reached").write_text(str(os.getpid()))
        raise InjectedFault(f"injected fault at {name}")
