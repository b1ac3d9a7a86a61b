"""When the daemon hands its observations to the writer thread: at the end of a decision
tick, at most about once a second, no record waiting more than a second, and never for
nothing; and the event loop is never woken because a write ended.

`Supervisor._after_tick` is what the decision loop does after each tick, `_record` what
every observation goes through, and `_recording_loop` the timer of records no tick takes in
time. The writer is a real thread writing real files.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from guardd.clock import SystemClock
from guardd.faults import FaultPoints
from guardd.observations import Recorder
from guardd.supervisor import _RECORD_EVERY_S, _RECORD_GAP_S, Supervisor
from tests.test_runtime import supervisor

pytestmark = pytest.mark.anyio

WAIT_S = 30.0


def recording(tmp_path: Path) -> tuple[Supervisor, Recorder]:
    """A supervisor with a recorder whose writer thread runs (not the daemon's loops)."""
    sup = supervisor(tmp_path)
    clock: SystemClock = sup.clock  # type: ignore[assignment]
    rec = Recorder(
        tmp_path / "observations",
        "lab",
        keep_s=3600.0,
        wall=clock.wall,
        monotonic=clock.monotonic,
    )
    rec.start_writer()
    sup.recorder = rec
    return sup, rec


def soon(sup: Supervisor, period: float = 0.1) -> float:
    """The latest the decision loop ticks next when it waits `period` (s) from now: what
    is recorded now, that tick takes."""
    return sup.clock.monotonic() + period


async def until(what: Callable[[], bool]) -> None:
    """Wait until `what` holds, polling: the writer thread's counters (and the timer's
    state) have no event a test could wait on."""
    with anyio.fail_after(WAIT_S):
        while not what():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def written(rec: Recorder, n: int) -> None:
    """Wait until `n` records are written."""
    await until(lambda: rec.written >= n)


async def test_a_tick_hands_the_round_to_the_writer_at_once(tmp_path: Path) -> None:
    sup, rec = recording(tmp_path)
    sup._next_tick_by = soon(sup)
    sup._record("probe", "blue", "ok", 0.01)
    sup._record("probe", "green", "ok", 0.01)
    assert not sup._record_timer.is_set(), "a tick follows: no timer"
    sup._after_tick(period=1.0)
    left = rec.oldest
    assert left is None, "handed over at the end of the tick"
    await written(rec, 2)
    # The next batch waits out the gap: ticks within it leave the records pending.
    sup._record("probe", "blue", "ok", 0.01)
    sup._after_tick(period=0.05)
    assert rec.oldest is not None
    assert sup._record_not_before >= sup.clock.monotonic() + _RECORD_GAP_S - 0.5
    assert not sup._record_timer.is_set(), "the next tick is in 50 ms, well before it is due"
    with anyio.fail_after(WAIT_S):
        await rec.aclose()
    assert rec.written == 3, "the shutdown writes what waited"


async def test_nothing_to_record_sets_no_timer(tmp_path: Path) -> None:
    sup, rec = recording(tmp_path)
    for period in (0.05, 1.0, 3600.0):
        sup._after_tick(period=period)
        assert not sup._record_timer.is_set()
    with anyio.fail_after(WAIT_S):
        await rec.aclose()
    assert rec.written == 0


class ActingGuard:
    """What the decision loop needs of a guard; its first tick acts until `release`."""

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.acting = anyio.Event()
        self.release = anyio.Event()
        self.ticks = 0

    async def tick(self) -> None:
        self.ticks += 1
        if self.ticks == 1:
            self.acting.set()
            await self.release.wait()

    def status_line(self) -> str:
        return "acting"

    def may_switch(self) -> str | None:
        return None


async def test_a_record_made_while_a_tick_acts_does_not_wait_for_it(tmp_path: Path) -> None:
    """A tick that switches and verifies takes seconds: the rounds probed meanwhile (and
    the switch's own record) are written by the timer, before the tick ends."""
    sup, rec = recording(tmp_path)
    guard = ActingGuard()
    sup.guard = guard  # type: ignore[assignment]
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup._decision_loop)
        tg.start_soon(sup._recording_loop)
        sup._wake.set()
        with anyio.fail_after(WAIT_S):
            await guard.acting.wait()
        sup._record("probe", "blue", "ok", 0.01)
        assert sup._record_timer.is_set()
        await written(rec, 1)
        assert guard.ticks == 1 and not guard.release.is_set(), "written while it acts"
        guard.release.set()
        tg.cancel_scope.cancel()
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


async def test_a_bug_in_the_writer_is_reported_as_the_recording_loop_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, rec = recording(tmp_path)
    failures: list[tuple[str, str]] = []

    def failed(loop: str, error: Exception) -> str:
        failures.append((loop, str(error)))
        return ""

    monkeypatch.setattr(sup, "loop_failed", failed)

    def buggy(batch: list[dict[str, Any]]) -> tuple[int, str | None]:
        raise KeyError("a bug")

    monkeypatch.setattr(rec, "write_batch", buggy)
    sup._next_tick_by = soon(sup)
    sup._record("probe", "blue", "ok", 0.01)
    sup._after_tick(period=0.1)
    await until(lambda: rec.dropped == 1)
    sup._record_not_before = -math.inf
    sup._after_tick(period=0.1)
    assert failures == [("recording", "'a bug'")]
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


async def test_no_thread_for_the_writer_means_guarding_unrecorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pids limit (systemd's TasksMax) refuses the thread: guardd guards on, says why."""
    sup = supervisor(tmp_path)
    failures: list[str] = []

    def failed(loop: str, error: Exception) -> str:
        failures.append(f"{loop}: {error}")
        return ""

    def no_thread(self: Recorder) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(sup, "loop_failed", failed)
    monkeypatch.setattr(Recorder, "start_writer", no_thread)
    guard = ActingGuard()
    guard.active = "blue"  # type: ignore[attr-defined]
    guard.s = type("S", (), {"probe_interval": 1.0})()  # type: ignore[attr-defined]
    sup._start_recording(guard)  # type: ignore[arg-type]
    assert sup.recorder is None
    assert failures == ["recording: can't start new thread"]
    sup._record("probe", "blue", "ok", 0.01)  # recording nothing, raising nothing


async def test_a_tick_that_comes_too_late_leaves_it_to_the_timer(tmp_path: Path) -> None:
    sup, rec = recording(tmp_path)
    sup._record_not_before = sup.clock.monotonic() + 0.5  # a batch just went
    sup._next_tick_by = soon(sup)
    sup._record("probe", "blue", "ok", 0.01)
    # The next tick is an hour away (interval 1h): the records would wait that long.
    sup._after_tick(period=3600.0)
    assert sup._record_timer.is_set()
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


async def test_a_record_between_distant_ticks_is_written_within_about_a_second(
    tmp_path: Path,
) -> None:
    sup, rec = recording(tmp_path)
    sup._next_tick_by = sup.clock.monotonic() + 3600.0  # the decision loop sleeps an hour
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup._recording_loop)
        await anyio.lowlevel.checkpoint()
        sup._record("sample", "q", "green", {"value": 1.0})
        oldest = rec.oldest
        assert oldest is not None and sup._record_timer.is_set()
        await written(rec, 1)
        handed = sup._record_not_before - _RECORD_GAP_S
        assert handed >= oldest + _RECORD_EVERY_S, "not before its second is up"
        assert handed - oldest < _RECORD_EVERY_S + 0.5, "nor much after"
        # With nothing left, the timer is unset again and the loop sleeps.
        await until(lambda: not sup._record_timer.is_set())
        tg.cancel_scope.cancel()
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


class Said:
    """The supervisor's log, as (level, event) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def log(event: str, **_: Any) -> None:
            self.lines.append((level, event))

        return log


async def failed_once(tmp_path: Path) -> tuple[Supervisor, Recorder, Said]:
    """A supervisor (its log kept) whose writer failed its first write: a file stands
    where the observations directory goes."""
    sup, rec = recording(tmp_path)
    said = Said()
    sup.log = said
    (tmp_path / "observations").write_text("a file where the directory should be")
    sup._next_tick_by = soon(sup)
    sup._record("probe", "blue", "ok", 0.01)
    sup._after_tick(period=0.1)
    await until(lambda: rec.errors > 0)
    return sup, rec, said


async def test_after_a_failed_write_the_next_batch_waits_a_second(tmp_path: Path) -> None:
    sup, rec, said = await failed_once(tmp_path)
    sup._record("probe", "blue", "ok", 0.01)
    sup._record_not_before = -math.inf
    now = sup.clock.monotonic()
    sup._after_tick(period=0.1)
    assert sup._record_not_before >= now + _RECORD_EVERY_S
    (tmp_path / "observations").unlink()
    await written(rec, 2)
    sup._record("probe", "blue", "ok", 0.01)
    sup._record_not_before = -math.inf
    sup._after_tick(period=0.1)
    await written(rec, 3)
    sup._record_not_before = -math.inf
    sup._after_tick(period=0.1)
    sup._record("probe", "blue", "ok", 0.01)
    sup._after_tick(period=0.1)
    assert said.lines == [
        ("warning", "observations_write_failed"),
        ("info", "observations_write_recovered"),
    ], "once an episode"
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


async def test_an_episode_shorter_than_a_batch_is_still_logged(tmp_path: Path) -> None:
    """The writer retries alone a second later: an episode may begin and end between two
    hand-overs, and is logged all the same."""
    sup, rec, said = await failed_once(tmp_path)
    (tmp_path / "observations").unlink()
    await written(rec, 1)
    assert rec.last_error is None
    sup._record("probe", "blue", "ok", 0.01)
    sup._record_not_before = -math.inf
    sup._after_tick(period=0.1)
    assert said.lines == [
        ("warning", "observations_write_failed"),
        ("info", "observations_write_recovered"),
    ]
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


async def test_a_bug_when_handing_over_holds_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    sup, rec = recording(tmp_path)
    sup.faults = FaultPoints(str(faults))
    failures: list[str] = []

    def failed(loop: str, _error: Exception) -> str:
        failures.append(loop)
        return ""

    monkeypatch.setattr(sup, "loop_failed", failed)
    (faults / "raise_in_recording").touch()
    sup._next_tick_by = soon(sup)
    sup._record("probe", "blue", "ok", 0.01)
    sup._after_tick(period=0.1)
    assert failures == ["recording"] and rec.pending == 1 and rec.oldest is not None
    (faults / "raise_in_recording").unlink()
    sup._record_not_before = -math.inf
    sup._after_tick(period=0.1)
    await written(rec, 1)
    with anyio.fail_after(WAIT_S):
        await rec.aclose()


async def test_a_write_ending_never_wakes_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread counts what it wrote itself: no callback crosses back into the
    loop (a self-pipe wake-up and a task resumed per batch, a sixth of a guard's CPU at
    a 1 s interval)."""
    loop = asyncio.get_running_loop()
    crossings: list[object] = []
    real = loop.call_soon_threadsafe

    def counted(*args: Any, **kw: Any) -> Any:
        crossings.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    sup, rec = recording(tmp_path)
    sup._next_tick_by = soon(sup)
    for n in range(1, 6):
        sup._record("probe", "blue", "ok", 0.01)
        sup._record_not_before = -math.inf
        sup._after_tick(period=0.1)
        await written(rec, n)
    assert crossings == []
    rec._queue.put(None)  # stop it, and not through `aclose`'s own wait
    rec._writer.join(WAIT_S)  # type: ignore[union-attr]


@pytest.mark.parametrize("period", [0.05, 0.5, 1.0])
async def test_the_decision_loop_alone_writes_at_its_cadence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, period: float
) -> None:
    """Records of rounds at `period` (s) go out about once a second, each within a second
    and a tick of its recording, and the timer is never needed."""
    sup, rec = recording(tmp_path)
    handed: list[tuple[float, float]] = []  # (oldest, handed at)
    submit = rec.submit

    def watched() -> int:
        oldest = rec.oldest
        n = submit()
        if n and oldest is not None:
            handed.append((oldest, sup.clock.monotonic()))
        return n

    monkeypatch.setattr(rec, "submit", watched)
    with anyio.fail_after(WAIT_S):
        while len(handed) < 3:
            # A round probed while the loop waits for its next tick, then that tick.
            sup._next_tick_by = soon(sup, period)
            sup._record("probe", "blue", "ok", 0.01)
            sup._after_tick(period)
            assert not sup._record_timer.is_set()
            await anyio.sleep(period)
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(handed)]
    assert all(g >= _RECORD_GAP_S for g in gaps), gaps
    assert all(at - oldest <= _RECORD_EVERY_S + period for oldest, at in handed), handed
    with anyio.fail_after(WAIT_S):
        await rec.aclose()
