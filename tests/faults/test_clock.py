"""Wall-clock jumps of an hour either way change nothing but the labels on events.

The daemon runs in-process here, with a `Clock` whose wall time the test jumps while
its monotonic time flows on; upstreams, nginx and the control socket are real. Probe
cadence, windows, the QoS guard window, an operator's lock and the rollback budget all
follow monotonic time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from guardd import config
from guardd.control import client
from guardd.guard import Guard
from guardd.supervisor import Supervisor
from guardd.systemd import SystemdNotifier
from tests.faults.util import FaultLab, MakeFaultLab, figure

pytestmark = [pytest.mark.nginx, pytest.mark.anyio]
HOUR = 3600.0


class JumpingClock:
    """Real monotonic time; wall time a test can move by hand, as an NTP step or a VM would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        """`time.monotonic()`, untouched."""
        return time.monotonic()

    def wall(self) -> float:
        """`time.time()` plus the jumps so far."""
        return time.time() + self.offset

    def jump(self, seconds: float) -> None:
        """Step the wall clock."""
        self.offset += seconds


@asynccontextmanager
async def guarding(lab: FaultLab, clock: JumpingClock) -> AsyncIterator[Guard]:
    """Run a Supervisor on the lab's config in this process until the block ends."""
    settings = config.load(lab.config_path)
    sup = Supervisor(settings, clock=clock, sd=SystemdNotifier({}))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        guard = await until(
            lambda: sup.guard if sup.guard and sup.guard.ticks else None,
            30,
            "the first decision tick",
        )
        await until(lab.socket_path.exists, 10, "the control socket")
        yield guard
        tg.cancel_scope.cancel()


async def until(predicate: Callable[[], Any], within: float, what: str) -> Any:
    """Poll `predicate` on the event loop until truthy; fail naming `what`."""
    with anyio.move_on_after(within):
        # Polling, not an Event: the conditions live in guardd's objects and files.
        while not (value := predicate()):  # noqa: ASYNC110
            await anyio.sleep(0.02)
        return value
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def event(guard: Guard, name: str, after: int = 0) -> dict[str, Any] | None:
    """The first event `name` the guard journaled at index >= `after`."""
    return next((e for e in list(guard.journal.recent)[after:] if e["event"] == name), None)


async def call(lab: FaultLab, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A control request from a worker thread, so the in-process daemon keeps running."""
    return await anyio.to_thread.run_sync(lambda: client.call(lab.socket_path, cmd, args))


async def probes_over(guard: Guard, seconds: float) -> int:
    """How many probes of green landed in its window over `seconds` of real time."""
    before = guard.machine.windows["green"].stats(time.monotonic()).samples
    await anyio.sleep(seconds)  # a measuring period, not a wait for an event
    return guard.machine.windows["green"].stats(time.monotonic()).samples - before


async def test_cadence_and_windows_ignore_wall_clock_jumps(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab(probe__interval="200ms", policy__window="10m")
    clock = JumpingClock()
    async with guarding(lab, clock) as guard:
        steady = await probes_over(guard, 2.0)
        clock.jump(+HOUR)
        forward = await probes_over(guard, 2.0)
        clock.jump(-2 * HOUR)
        backward = await probes_over(guard, 2.0)
        expected = 2.0 / 0.2
        for got in (steady, forward, backward):
            assert abs(got - expected) <= 0.1 * expected + 1, (steady, forward, backward)
        figure("clock_cadence", probes_per_2s={"steady": steady, "+1h": forward, "-1h": backward})
        samples = guard.machine.windows["green"].stats(time.monotonic()).samples
        assert samples >= steady + forward + backward, "no sample was expired by the jumps"
        assert guard.machine.is_stale("green", time.monotonic()) is False
        assert guard.state.value == "steady"


async def test_guard_window_and_operator_lock_expire_on_monotonic_time(
    make_lab: MakeFaultLab,
) -> None:
    lab: FaultLab = make_lab(qos__window="3s")
    clock = JumpingClock()
    async with guarding(lab, clock) as guard:
        lab.green.set_mode("http_503")
        await until(lambda: event(guard, "qos_locked"), 30, "the lock after a rollback")
        own = guard.qos.own_lock
        assert own is not None and own.window is not None
        # From the window's own start: the test's poll runs only once the guard yields,
        # after the journal and state fsyncs that follow the lock (long on a busy disk).
        locked_at = own.window.ends_at - 3.0
        clock.jump(+HOUR)  # wall time says the 3 s window is long over
        mark = len(guard.journal.recent)
        await anyio.sleep(1.0)  # a measuring period: the window must still be running
        assert lab.lock_file.exists() and event(guard, "qos_released", mark) is None
        await until(lambda: event(guard, "qos_released", mark), 10, "the guard window release")
        held = time.monotonic() - locked_at
        assert 3.0 - 0.1 <= held <= 3.0 + 2.0, held
        figure("clock_guard_window", wall_jump_s=HOUR, window_s=3.0, held_s=round(held, 2))
        assert not lab.lock_file.exists()

        # An operator's 2 s lock, then the wall clock steps back an hour.
        await call(lab, "qos_lock", {"for_s": 2.0, "reason": "clock test"})
        own = guard.qos.own_lock
        assert own is not None and own.expires_at is not None
        taken = own.expires_at - 2.0  # the lock's own start, as above
        clock.jump(-HOUR)
        mark = len(guard.journal.recent)
        await until(lambda: event(guard, "qos_released", mark), 10, "the operator lock expiry")
        held = time.monotonic() - taken
        assert 2.0 - 0.1 <= held <= 2.0 + 2.0, held
        figure("clock_operator_lock", wall_jump_s=-HOUR, lock_s=2.0, held_s=round(held, 2))


async def test_rollback_budget_is_not_reset_by_a_wall_clock_jump(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab(policy__max_rollbacks=1, policy__budget_window="1h", qos__window="1s")
    clock = JumpingClock()
    async with guarding(lab, clock) as guard:
        lab.green.set_mode("http_503")
        await until(lambda: event(guard, "rollback_completed"), 30, "the first rollback")
        await until(lambda: event(guard, "qos_released"), 30, "the guard window to pass")
        # An hour and a minute "pass" on the wall clock only; then green is deployed again.
        clock.jump(HOUR + 60)
        mark = len(guard.journal.recent)
        lab.nginx.active_link.unlink()
        lab.nginx.active_link.symlink_to(lab.nginx.targets["green"])
        await anyio.to_thread.run_sync(lab.nginx.reload)
        await until(lambda: event(guard, "external_switch", mark), 10, "green adopted")
        first = await until(
            lambda: event(guard, "hold", mark) or event(guard, "rollback_started", mark),
            30,
            "a decision on green",
        )
        assert first["event"] == "hold", "the wall-clock jump reset the rollback budget"
        assert "budget" in first["reason"], first
        assert guard.active == "green"
