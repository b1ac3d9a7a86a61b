"""Test-only fault points: pause guardd at a named step so a test can kill or stall it.

Active only when `GUARDD_FAULT_DIR` names a directory. At a point `NAME`, if the file
`NAME` exists there, guardd writes `NAME.reached` and waits until `NAME` is removed
(`reach`), or raises `InjectedFault` (`fail`), for as long as the file exists.
Production never sets the variable, and then every point is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio


class InjectedFault(RuntimeError):
    """The exception a `fail` point raises: a stand-in for a bug guardd did not foresee."""


class FaultPoints:
    """Named pause points driven by files in a directory."""

    def __init__(self, directory: str | None = None) -> None:
        chosen = directory if directory is not None else os.environ.get("GUARDD_FAULT_DIR")
        self.dir = Path(chosen) if chosen else None

    async def reach(self, name: str) -> None:
        """Pause here while the point is armed."""
        if self.dir is None or not (self.dir / name).exists():
            return
        (self.dir / f"{name}.reached").write_text(str(os.getpid()))
        # Polling a file is the point: the test process controls it from outside.
        while (self.dir / name).exists():  # noqa: ASYNC110
            await anyio.sleep(0.02)

    async def fail(self, name: str) -> None:
        """Raise `InjectedFault` here while the point is armed."""
        if self.dir is None or not (self.dir / name).exists():
            return
        (self.dir / f"{name}.reached").write_text(str(os.getpid()))
        raise InjectedFault(f"injected fault at {name}")
