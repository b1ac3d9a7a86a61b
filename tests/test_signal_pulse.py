"""New lines of a file signal wake a decision tick as they are counted, at most every 0.25 s.

The daemon's rules over real requests act as the tail reads the lines (`Supervisor.
_signal_pulse`); a flood wakes a tick at most once per `_SIGNAL_PULSE_S`, as the replay's
slots model it (`guardd.replay._sources.PULSE_S`), and a quiet log wakes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from guardd.clock import SystemClock
from guardd.replay._sources import PULSE_S
from guardd.signals.access_log import AccessLogSignal, AccessLogSpec
from guardd.signals.log_match import LogMatchSignal, LogMatchSpec
from guardd.supervisor import _SIGNAL_PULSE_S, Supervisor
from tests.signals.access_log_lib import BLUE, line
from tests.test_runtime import BASE, close, settings, supervisor

pytestmark = pytest.mark.anyio

SIGNALS = """
[signals.traffic]
kind = "access_log"
source = "file:@STATE@/access.log"
addresses = { blue = ["127.0.0.1:9009"], green = ["127.0.0.1:9010"] }
[signals.errors]
kind = "log_match"
paths = { green = "@STATE@/green.log" }
patterns = ["FATAL"]
[signals.app]
kind = "prometheus"
url = "http://127.0.0.1:9090"
query = 'up{color="{color}"}'
"""


class Wakes:
    """Runs the pulse of `sup` and keeps the event-loop time of each wake it gives."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.at: list[float] = []
        self.seen = anyio.Event()

    async def run(self) -> None:
        while True:
            await self.sup._wake.wait()
            self.sup._wake = anyio.Event()
            self.at.append(anyio.current_time())
            self.seen.set()

    async def next(self) -> None:
        self.seen = anyio.Event()
        with anyio.fail_after(10):
            await self.seen.wait()


@asynccontextmanager
async def pulsing(tmp_path: Path) -> AsyncIterator[tuple[Supervisor, Wakes]]:
    """A supervisor's pulse running, with the wakes it gives kept; stopped on leaving."""
    sup = supervisor(tmp_path)
    wakes = Wakes(sup)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup._signal_pulse)
        tg.start_soon(wakes.run)
        yield sup, wakes
        tg.cancel_scope.cancel()


async def test_counted_lines_wake_a_tick_at_once_and_a_quiet_log_none(tmp_path: Path) -> None:
    async with pulsing(tmp_path) as (sup, wakes):
        # Quiet for four pulses: the quiet itself is the condition under test, not a wait.
        await anyio.sleep(4 * _SIGNAL_PULSE_S)
        assert wakes.at == []  # no line counted: nothing woke
        sup._lines_counted()
        # Without sleeping: the first lines after a quiet spell wake a tick at once, not
        # at the next beat of a clock.
        await anyio.wait_all_tasks_blocked()
        assert len(wakes.at) == 1
        # And one batch of lines is one wake, not a pulse that beats from then on.
        await anyio.sleep(4 * _SIGNAL_PULSE_S)
        assert len(wakes.at) == 1


async def test_a_flood_of_lines_wakes_a_tick_at_most_every_pulse(tmp_path: Path) -> None:
    async with pulsing(tmp_path) as (sup, wakes):
        start = anyio.current_time()
        while len(wakes.at) < 5:
            sup._lines_counted()  # a line counted on every turn of the loop
            await anyio.lowlevel.checkpoint()
        # The lines counted while the pulse waited out its 0.25 s are not lost: they wake
        # the tick that ends the wait.
        sup._lines_counted()
        await wakes.next()
    gaps = [b - a for a, b in zip(wakes.at, wakes.at[1:], strict=False)]
    # asyncio runs a timer up to its clock's resolution early: a millisecond of slack.
    assert min(gaps) >= _SIGNAL_PULSE_S - 1e-3, gaps
    assert wakes.at[0] - start < _SIGNAL_PULSE_S  # the first one did not wait a pulse
    assert PULSE_S == _SIGNAL_PULSE_S  # the replay's slots are the daemon's pulse


async def test_the_file_signals_are_wired_to_the_pulse(tmp_path: Path) -> None:
    sup = Supervisor(settings(tmp_path, BASE + SIGNALS))
    r = sup.build_runtime(sup.settings)
    try:
        assert r.signals["traffic"].on_counted == sup._lines_counted  # type: ignore[attr-defined]
        assert r.signals["errors"].on_counted == sup._lines_counted  # type: ignore[attr-defined]
        # A polled signal has no lines: its samples come at its own interval.
        assert not hasattr(r.signals["app"], "on_counted")
    finally:
        await close(r)


def test_an_access_log_tells_each_batch_it_counted_even_one_it_could_not_parse() -> None:
    spec = AccessLogSpec(source="file:/var/log/nginx/lab.log", addresses={"blue": (BLUE,)})
    signal = AccessLogSignal("traffic", spec, SystemClock())
    told: list[int] = []
    signal.on_counted = functools.partial(told.append, 1)
    signal.ingest([])  # nothing read: nothing to tell
    assert told == []
    signal.ingest([line(BLUE, "500").rstrip("\n"), "not json"])
    signal._count_oversize()
    assert len(told) == 2
    assert signal.lines["ok"] == signal.lines["unparsed"] == signal.lines["oversize"] == 1


def test_a_log_match_tells_each_batch_it_counted() -> None:
    spec = LogMatchSpec(paths={"green": "/var/log/lab/green.log"}, patterns=("FATAL",))
    signal = LogMatchSignal("errors", spec, SystemClock())
    told: list[int] = []
    signal.on_counted = functools.partial(told.append, 1)
    signal.ingest("green", [])
    assert told == []
    signal.ingest("green", ["FATAL: out of memory", "fine"])
    signal._oversize("green")
    assert len(told) == 2
    assert signal.color_lines["green"]["matched"] == signal.color_lines["green"]["oversize"] == 1
