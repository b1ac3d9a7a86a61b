"""When the daemon writes its observations: at the end of a decision tick, at most about
once a second, no record waiting more than a second, and never for nothing.

`Supervisor._record_due` is the writer task's wait. A quiet second in which it must not
return is the condition under test here, not a wait for something to happen.
"""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from guardd import supervisor as supervisor_module
from guardd.clock import SystemClock
from guardd.observations import Recorder
from guardd.supervisor import _RECORD_EVERY_S, _RECORD_GAP_S, Supervisor
from tests.test_runtime import supervisor

pytestmark = pytest.mark.anyio

WAIT_S = 30.0


def recorder(tmp_path: Path, clock: SystemClock) -> Recorder:
    return Recorder(
        tmp_path / "observations",
        "lab",
        keep_s=3600.0,
        wall=clock.wall,
        monotonic=clock.monotonic,
    )


async def written_at(
    sup: Supervisor, rec: Recorder, last: float, *, ticks_every: float | None, limit: float
) -> float | None:
    """The monotonic time `_record_due` returned, with the decision loop ticking every
    `ticks_every` seconds (None: never); None if it did not return within `limit`."""
    returned: list[float] = []

    async def writer() -> None:
        await sup._record_due(rec, last)
        returned.append(sup.clock.monotonic())

    with anyio.move_on_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await anyio.lowlevel.checkpoint()
            while not returned:
                if ticks_every is not None:
                    sup._ticked.set()  # what the decision loop does after each tick
                    sup._ticked = anyio.Event()
                await anyio.sleep(ticks_every or 0.05)
    return returned[0] if returned else None


async def test_nothing_to_record_is_never_a_wake_up(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    rec = recorder(tmp_path, sup.clock)  # type: ignore[arg-type]
    # Neither the second running out nor ticks with nothing recorded call for a write.
    assert await written_at(sup, rec, -math.inf, ticks_every=None, limit=2.5) is None
    assert await written_at(sup, rec, -math.inf, ticks_every=0.2, limit=2.5) is None
    assert rec.pending == 0


async def test_a_tick_with_records_waiting_writes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A record's longest wait made longer than the test may take: what returns is the
    # tick's own wake-up, not the record's time running out.
    monkeypatch.setattr(supervisor_module, "_RECORD_EVERY_S", 10 * WAIT_S)
    sup = supervisor(tmp_path)
    rec = recorder(tmp_path, sup.clock)  # type: ignore[arg-type]
    rec.probe("blue", "ok", 0.01)
    assert await written_at(sup, rec, -math.inf, ticks_every=0.05, limit=WAIT_S) is not None
    assert await written_at(sup, rec, -math.inf, ticks_every=None, limit=1.0) is None


async def test_a_record_waits_at_most_a_second_without_a_tick(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    rec = recorder(tmp_path, sup.clock)  # type: ignore[arg-type]
    rec.front_door(True)
    oldest = rec.oldest
    assert oldest is not None
    at = await written_at(sup, rec, -math.inf, ticks_every=None, limit=WAIT_S)
    assert at is not None
    assert at >= oldest + _RECORD_EVERY_S


async def test_ticks_soon_after_a_write_wait_for_the_gap(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    rec = recorder(tmp_path, sup.clock)  # type: ignore[arg-type]
    last = sup.clock.monotonic()
    rec.probe("green", "ok", 0.01)
    # Ticks every 0.1 s, as at a 100 ms interval.
    at = await written_at(sup, rec, last, ticks_every=0.1, limit=WAIT_S)
    assert at is not None
    assert at >= last + _RECORD_GAP_S


async def test_after_a_failed_write_the_next_waits_a_second(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    rec = recorder(tmp_path, sup.clock)  # type: ignore[arg-type]
    rec.probe("green", "ok", 0.01)
    rec.last_error = "No space left on device"
    last = sup.clock.monotonic()
    at = await written_at(sup, rec, last, ticks_every=0.1, limit=WAIT_S)
    assert at is not None
    assert at >= last + _RECORD_EVERY_S


async def test_ticks_within_the_gap_do_not_wake_the_writer_task(tmp_path: Path) -> None:
    """The decision loop wakes the writer task only from `_record_after` on: at 50 ms,
    a task switch a tick for nothing adds up."""
    sup = supervisor(tmp_path)
    rec = recorder(tmp_path, sup.clock)  # type: ignore[arg-type]
    rec.probe("blue", "ok", 0.01)
    last = sup.clock.monotonic()
    assert sup._record_after == math.inf
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup._record_due, rec, last)
        await anyio.lowlevel.checkpoint()
        assert sup._record_after == last + _RECORD_GAP_S
        tg.cancel_scope.cancel()
    assert sup._record_after == math.inf
