"""Time sources: monotonic time rules decisions; wall time only labels events."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where guardd reads the time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for journal timestamps and lock files."""
        ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()

    def wall(self) -> float:
        """`time.time()`."""
        return time.time()
