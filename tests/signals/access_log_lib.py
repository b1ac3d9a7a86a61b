"""Helpers for the access-log signal's tests: log lines, a running signal, waiting."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from guardd.clock import Clock, SystemClock
from guardd.signals.access_log import AccessLogSignal, AccessLogSpec

BLUE = "127.0.0.1:8001"
GREEN = "127.0.0.1:8002"
ADDRESSES = {"blue": (BLUE,), "green": (GREEN,)}


def line(
    addr: str = BLUE,
    status: str = "200",
    *,
    upstream_status: str | None = None,
    msec: float | None = None,
    urt: str = "0.004",
    rt: str = "0.005",
) -> str:
    """One line in guardd's log_format, newline included."""
    return (
        json.dumps(
            {
                "msec": f"{time.time() if msec is None else msec:.3f}",
                "status": status,
                "upstream_addr": addr,
                "upstream_status": status if upstream_status is None else upstream_status,
                "request_time": rt,
                "upstream_response_time": urt,
            }
        )
        + "\n"
    )


class FixedClock:
    """A clock that says what the test sets."""

    def __init__(self, mono: float = 1000.0, wall: float | None = None) -> None:
        self.mono = mono
        # Now by default: a line's own time (`line`'s `msec`, now unless given) is then of
        # the window, not older than it (`late`).
        self.wall_s = time.time() if wall is None else wall

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_s


@asynccontextmanager
async def running(
    spec: AccessLogSpec, clock: Clock | None = None
) -> AsyncIterator[AccessLogSignal]:
    """The signal, started and following its source; cancelled on exit. `clock`: the
    system's unless given (a `FixedClock` the test moves)."""
    signal = AccessLogSignal("web", spec, clock or SystemClock())
    async with anyio.create_task_group() as tg:
        await tg.start(signal.run)
        yield signal
        tg.cancel_scope.cancel()


async def until(
    condition: Callable[[], bool],
    what: str,
    within: float = 15.0,
    show: Callable[[], object] | None = None,
) -> None:
    """Poll `condition` until it holds; after `within` s fail with `what` and `show()`."""
    with anyio.move_on_after(within):
        while not condition():  # noqa: ASYNC110 - the condition is a counter, not an event
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}" + (f": {show()}" if show else ""))
