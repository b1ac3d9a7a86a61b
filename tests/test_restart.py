"""A restart never changes a decision: the same inputs after a restart, the same decisions.

Each row drives a real `Guard` (real journal, state.json and lock file in a temporary
directory; a fake clock and switcher) into one of the states the machine can be in,
then copies its files as a stop or a crash leaves them and starts a second guard from the
copy. Both then see the same inputs — the same probe history, the same probes, the same
clock — and must decide the same, tick by tick. A guard below fails when the machine or
the guard grows a piece of state that no row (and no stated reason) accounts for.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardd import qoslock
from guardd.core.machine import Decision, Memory
from guardd.core.policy import PolicySpec
from guardd.exceptions import OperationRefused
from guardd.guard import Guard
from guardd.operator import handle
from guardd.probes.http import ProbeResult
from guardd.render import render_status
from tests.harness.guard_fakes import (
    DOWN,
    OK,
    SPEC,
    FakeClock,
    FakeSwitcher,
    FakeVerifier,
    build,
    prepare,
    start,
    step,
    steps,
)

pytestmark = pytest.mark.anyio


def decision_key(d: Decision) -> tuple[object, ...]:
    """What a decision decides: its state, its actions, and what blocked it."""
    return (d.state, tuple(repr(a) for a in d.actions), d.blocked_by)


Setup = Callable[[Guard, FakeClock], Awaitable[None]]


async def sticky_hold(g: Guard, clock: FakeClock) -> None:
    assert isinstance(g.switcher, FakeSwitcher) and g.switcher.path is not None
    (g.switcher.path.parent / "switch-fails").touch()
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3)
    assert g.machine.hold is not None and g.machine.hold.sticky


async def transient_hold(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)] + [(DOWN, DOWN)] * 4)
    assert g.machine.hold is not None and not g.machine.hold.sticky


async def paused(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)])
    await handle(g, "pause", {"reason": "maintenance"}, "uid:0(root)")


async def guard_window(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3 + [(OK, DOWN)] * 2)
    assert g.own_lock is not None and g.own_lock.window is not None
    assert g.own_lock.window.samples > 0  # counted before the restart, judged after it


FOREIGN = qoslock.LockInfo(True, "release train", "2026-11-30T10:00:00.000Z", None, "deploybot")


async def window_beneath_a_foreign_lock(g: Guard, clock: FakeClock) -> None:
    # Another tool (`qos_guard.sh lock`) wrote its lock over guardd's guard window.
    await guard_window(g, clock)
    qoslock.LOCK_FILES.write(g.s.lock_file, FOREIGN)
    await steps(g, clock, [(OK, OK)] * 2)
    assert g.own_lock is None and g.qos.beneath is not None


async def operator_lock_over_window(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3 + [(OK, DOWN)])
    await handle(g, "qos_lock", {"reason": "hands off", "for_s": 30}, "uid:0(root)")
    assert g.own_lock is not None and g.own_lock.floor is not None


async def operator_lock(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)])
    await handle(g, "qos_lock", {"reason": "freeze", "for_s": 6}, "uid:0(root)")


async def rolled_away_from(g: Guard, clock: FakeClock) -> None:
    # rollback_to = "previous": green -> blue; green must not be a target in the window.
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3 + [(OK, OK)] * 3)
    assert g.machine.rolled_away_from == "green" and g.active == "blue"


async def baseline_taken(g: Guard, clock: FakeClock) -> None:
    # The rollback moved traffic green -> blue: green's last window is blue's baseline.
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3 + [(OK, OK)])
    assert g.machine.baseline("probe", "blue") is not None


async def no_rollback_target(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)] + [(DOWN, OK)] * 3)
    assert g.protection_lost() is not None


async def p2_alerted(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)] * 10 + [(OK, DOWN)] + [(OK, OK)] * 20)
    assert any(k.startswith("p2:") for k in g.machine.memory().raised)


async def budget_spent(g: Guard, clock: FakeClock) -> None:
    for _ in range(3):
        await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3)
        assert g.active == "blue"
        assert isinstance(g.switcher, FakeSwitcher) and g.switcher.path is not None
        g.switcher.path.write_text("green")
        g.release_lock(by="uid:0(root)", reason="redeployed")
        # Long enough for green's window to forget its failures.
        await steps(g, clock, [(OK, OK)] * 31)
    assert g._rollbacks_in_budget() == 3


async def p1_pending(g: Guard, clock: FakeClock) -> None:
    # Green fails one probe in four: its P1 ratio rule holds, for 1 s of its 5 s `for`.
    await steps(g, clock, [(OK, OK)] * 3 + [(OK, DOWN), (OK, OK)])
    assert ("p1_error_ratio", "green") in g.machine.policy.table.pending_onsets()
    assert g.active == "green"


async def steady(g: Guard, clock: FakeClock) -> None:
    await steps(g, clock, [(OK, OK)] * 3)


async def seen_healthy(g: Guard, clock: FakeClock) -> None:
    # Green passed its probes: its failures alone may roll it back, front door or not.
    await steps(g, clock, [(OK, OK, OK)] * 3)
    assert g.machine.seen_healthy == {"blue", "green"}


async def mismatch_reapplied(g: Guard, clock: FakeClock) -> None:
    # The front door fails while green's own probes pass: re-applied once already.
    await steps(g, clock, [(OK, OK, OK)] + [(OK, OK, DOWN)] * 3)
    assert g.machine.mismatch is not None
    assert isinstance(g.switcher, FakeSwitcher) and g.switcher.reapplied == 1


async def mismatch_reapply_failed(g: Guard, clock: FakeClock) -> None:
    # The same, but `nginx -t` refused the re-apply: the hold to come must say so.
    assert isinstance(g.switcher, FakeSwitcher)
    g.switcher.fail("tested", op="reapply")
    await steps(g, clock, [(OK, OK, OK)] + [(OK, OK, DOWN)] * 3)
    assert (g.machine.memory().reapply_failed or "").startswith("re-applying green failed at ")


@dataclass(frozen=True)
class Row:
    """One state to restart in, the pieces of state.json (or journal) it exercises, and
    the inputs both runs see after the restart."""

    name: str
    covers: frozenset[str]
    setup: Setup
    after: Sequence[tuple[ProbeResult, ...]]
    spec: PolicySpec = SPEC
    crash_in_switch: bool = False
    front_door: bool = False  # with switch.verify_url: the front door is watched


PREVIOUS = dataclasses.replace(SPEC, rollback_to="previous")
P2 = dataclasses.replace(SPEC, window=60.0, min_samples=5, p2_error_ratio=0.02, p1_error_ratio=0.2)

ROWS = [
    Row("steady", frozenset({"guard", "state", "active"}), steady, [(OK, DOWN)] * 4),
    # The restarted guard rolls back when the `for` that began before the restart ends.
    Row("P1 pending", frozenset({"onsets"}), p1_pending, [(OK, OK), (OK, DOWN)] * 4),
    Row(
        "green seen healthy, then failing while the front door serves",
        frozenset({"seen_healthy"}),
        seen_healthy,
        [(OK, DOWN, OK)] * 5,
        front_door=True,
    ),
    Row(
        "front-door mismatch, re-applied once",
        frozenset({"mismatch", "mismatch_color"}),
        mismatch_reapplied,
        [(OK, OK, DOWN)] * 5,
        front_door=True,
    ),
    Row(
        "front-door mismatch whose re-apply failed",
        frozenset({"reapply_failed"}),
        mismatch_reapply_failed,
        [(OK, OK, DOWN)] * 5,
        front_door=True,
    ),
    Row("sticky hold after a failed switch", frozenset({"hold"}), sticky_hold, [(OK, DOWN)] * 6),
    Row(
        "transient hold, both down",
        frozenset({"hold"}),
        transient_hold,
        [(DOWN, DOWN)] * 3 + [(OK, DOWN)],
    ),
    Row("paused", frozenset({"paused"}), paused, [(OK, DOWN)] * 5),
    Row("guard window, part counted", frozenset({"qos"}), guard_window, [(OK, OK)] * 12),
    Row(
        "operator's lock laid over a guard window",
        frozenset({"qos"}),
        operator_lock_over_window,
        [(OK, OK)] * 35,
    ),
    Row("operator's lock", frozenset({"qos"}), operator_lock, [(OK, OK)] * 8),
    Row(
        "guard window beneath another tool's lock",
        frozenset({"qos"}),
        window_beneath_a_foreign_lock,
        [(OK, OK)] * 12,
    ),
    Row(
        "color just rolled away from",
        frozenset({"rolled_away_from"}),
        rolled_away_from,
        [(DOWN, OK)] * 5,
        spec=PREVIOUS,
    ),
    Row("baseline taken at a rollback", frozenset({"baselines"}), baseline_taken, [(OK, OK)] * 3),
    Row(
        "rollback target down, alerted", frozenset({"raised"}), no_rollback_target, [(DOWN, OK)] * 4
    ),
    Row("P2 alerted", frozenset({"raised"}), p2_alerted, [(OK, DOWN)] + [(OK, OK)] * 3, spec=P2),
    Row("rollback budget spent", frozenset({"journal:budget"}), budget_spent, [(OK, DOWN)] * 4),
    Row(
        "switch in flight",
        frozenset({"journal:pending"}),
        steady,
        [(OK, DOWN)] * 3 + [(OK, OK)] * 4,
        crash_in_switch=True,
    ),
]

# Keys of state.json that are no decision's memory, and why.
NOT_MEMORY = {
    "version": "the file format",
}
# Keys of state.json that only a crash in the middle of a step leaves set, each with the
# test that crashes there.
CUT_SHORT = {
    "qos_change": "test_a_crash_at_any_step_of_a_lock_change_is_finished_at_the_next_start",
    "journal_owed": "test_a_crash_around_a_ticks_journal_records_changes_nothing",
    "moving": "tests/faults/test_crash.py::test_kill9_during_an_operators_switch_keeps_who_and_why",
}
# Attributes of the machine and the guard that state.json does not keep, and why each may
# be lost in a restart without changing a decision.
MACHINE_NOT_KEPT = {
    "spec": "configuration, read again at start",
    "probe_interval": "configuration",
    "policy": "configuration; the onsets of its rules' `for` are in state.json (row: P1 pending)",
    "windows": "probe history: measurements, taken again after a restart (the test's inputs)",
    "last_decision": "the previous tick's result, recomputed by the next tick",
    "probe_identity": "configuration: a digest of each color's probe URLs",
    "front_door": "the front door's answers: measurements, taken again after a restart",
    "_reapplied_at": "an index into the front door's answers, which count anew from 0",
    "_readings": "the other signals' readings: measurements, taken again after a restart",
    "verdicts": "the last tick's verdicts on each color, recomputed by the next tick",
    "_probed": "the colors probed since this start: a restart is `starting` until both are",
}
MACHINE_KEPT = {
    "hold", "rolled_away_from", "_edges", "seen_healthy", "mismatch", "_mismatch_color",
    "_reapply_failed", "baselines",
}  # fmt: skip
GUARD_NOT_KEPT = {
    "signals": "adapters, built from the configuration",
    "readings": "the signals' readings at the last tick: measurements, taken again",
    "foreign_journal": "read again from the journal at every start",
    "reload_rejected": "a start applies the file, or does not start: no reload is left rejected",
    "restart_pending": "a start applies every key of the file: none waits for the next one",
    "signal_problems": "why each signal gave nothing at the last tick (a problem still there "
    "after a restart is alerted again, once): measured again",
    "_lines_seen": "line counts at the last tick: the adapters count anew from 0",
    "_unusable_streak": "unusable lines in a row: counted anew after a restart",
    "_traffic_seen": "request totals at the last tick: the adapters count anew from 0, and the "
    "guard window counts what arrives from the next tick on",
    "s": "configuration",
    "machine": "checked attribute by attribute above",
    "switcher": "an adapter",
    "fleet": "an adapter; the generation it applied is kept in state.dir/fleet.json, the rest "
    "is read again from etcd",
    "journal": "the journal itself: the budget and a pending switch are read back from it",
    "state_file": "an adapter",
    "metrics": "published again at every tick",
    "verifier": "an adapter",
    "clock": "an adapter",
    "log": "an adapter",
    "notify": "an adapter",
    "faults": "test hooks",
    "switch_refused": "a hook to the supervisor's switch lock, which a start takes afresh",
    "cannot_switch": "whether the switch lock is held, asked again at every tick",
    "lock": "a mutex",
    "active": "read from the switch target at start, as before every decision",
    "rolling_back": "a switch in flight is an open rollback_started (row: switch in flight)",
    "switch_started": "only times a switch in flight",
    "storage": "measured by the next write",
    "recording": "the daemon's recorder's status, an adapter; observations/ keeps the records",
    "ticks": "a counter for the watchdog",
    "started_mono": "uptime",
    "state": "recomputed by the next tick",
    "last_decision": "shown in status only; recomputed by the next decision",
    "qos": "checked attribute by attribute below",
    "budget": "checked attribute by attribute below",
    "_onsets": "the wall stamps of the onsets in state.json, made again from the rule table",
    "target_unreadable": "why the switch target could not be read: read again before every "
    "decision",
    "_unnamed_reads": "switch-target reads in a row that named no color: read again; a start "
    "that finds none named holds at once",
}
GUARD_KEPT = {"paused", "owed", "moving"}
QOS_NOT_KEPT = {
    "host": "the guard itself",
    "held": "read from the lock file before every decision",
    "_firing": "the rules firing at the last tick: measured again; one still firing after a "
    "restart counts again in the window (fail closed)",
    "_firing_color": "the color those rules fired on",
    "store": "where the lock file is read and written: the files themselves, set at start",
}
QOS_KEPT = {"own_lock", "change", "beneath"}
BUDGET_NOT_KEPT = {
    "_auto_rollbacks": "the budget: read back from the journal (row: rollback budget spent)",
    "_since": "the budget: read back from the journal (`resumed`)",
}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_a_restart_decides_as_the_running_guard_would(row: Row, tmp_path: Path) -> None:
    clock = FakeClock()
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    snapshot_at: list[float] = []

    def crash() -> None:
        # kill -9 inside the switch: whatever is on disk now is what the restart finds.
        if not snapshot_at:
            shutil.copytree(a_root, b_root)
            snapshot_at.append(clock.mono)

    prepare(a_root)
    g1 = await start(
        a_root,
        clock,
        row.spec,
        FakeVerifier() if row.front_door else None,
        on_switch=crash if row.crash_in_switch else None,
    )
    await row.setup(g1, clock)
    if row.crash_in_switch:
        before_crash = [(OK, OK)] + [(OK, DOWN)] * 3
        await steps(g1, clock, before_crash)
        assert snapshot_at, "the switch was reached"
    else:
        g1.save_state()  # what SIGTERM does before exiting
        shutil.copytree(a_root, b_root)
    g1_clock = clock
    b_clock = copy.copy(clock)

    g2 = build(b_root, b_clock, row.spec, FakeVerifier() if row.front_door else None)
    await g2.recover(g2.state_file.load())
    # The same inputs: the probe history the restarted guard would measure again.
    g2.machine.windows = copy.deepcopy(g1.machine.windows)

    assert g2.active == g1.active
    kept1, kept2 = g1.machine.memory().to_json(), g2.machine.memory().to_json()
    if row.crash_in_switch:
        # A switch resumed after a crash takes no baseline: the window it would come from
        # died with the process. `above_baseline` rules then stay inconclusive (never
        # firing on missing data) until traffic next moves.
        assert kept2.pop("baselines") == {}
        kept1.pop("baselines")
    assert kept2 == kept1
    assert g2.paused == g1.paused
    assert qoslock.read_lock(g2.s.lock_file) == qoslock.read_lock(g1.s.lock_file)
    assert g2._rollbacks_in_budget() == g1._rollbacks_in_budget()

    for n, inputs in enumerate(row.after):
        d1 = await step(g1, g1_clock, *inputs)
        d2 = await step(g2, b_clock, *inputs)
        assert decision_key(d2) == decision_key(d1), f"tick {n} after the restart"
        assert g2.active == g1.active, f"tick {n}"
        assert qoslock.read_lock(g2.s.lock_file).held == qoslock.read_lock(g1.s.lock_file).held
    moves = ("rollback_started", "rollback_completed", "rollback_failed", "hold", "alert")
    tail1 = [e["event"] for e in g1.journal.recent if e["event"] in moves]
    tail2 = [e["event"] for e in g2.journal.recent if e["event"] in moves]
    assert tail2 == tail1


def test_every_piece_of_state_has_a_row(tmp_path: Path) -> None:
    """A new key in state.json, or new state in the machine or the guard, needs a row here."""
    covered = set().union(*(r.covers for r in ROWS)) | set(NOT_MEMORY) | set(CUT_SHORT)
    (tmp_path / "target").write_text("green")
    guard = build(tmp_path, FakeClock(), SPEC)
    guard.save_state()
    keys = set(guard.state_file.load())
    assert keys <= covered, f"state.json keys without a row: {keys - covered}"
    assert {"journal:budget", "journal:pending"} <= covered
    assert {f.name for f in dataclasses.fields(Memory)} <= keys
    machine = set(vars(guard.machine))
    assert machine == MACHINE_KEPT | set(MACHINE_NOT_KEPT), machine ^ (
        MACHINE_KEPT | set(MACHINE_NOT_KEPT)
    )
    assert set(vars(guard)) == GUARD_KEPT | set(GUARD_NOT_KEPT), set(vars(guard)) ^ (
        GUARD_KEPT | set(GUARD_NOT_KEPT)
    )
    qos = set(vars(guard.qos))
    assert qos == QOS_KEPT | set(QOS_NOT_KEPT), qos ^ (QOS_KEPT | set(QOS_NOT_KEPT))
    assert set(vars(guard.budget)) == set(BUDGET_NOT_KEPT), set(vars(guard.budget))


async def test_the_budget_counts_rollbacks_behind_thousands_of_newer_events(tmp_path: Path) -> None:
    """The journal keeps its recent events in memory; the budget reads the whole file."""
    prepare(tmp_path)
    clock = FakeClock()
    g1 = await start(tmp_path, clock, SPEC)
    await budget_spent(g1, clock)
    for _ in range(2500):  # e.g. a guard window extended for hours, within budget_window
        g1.record("config_reloaded", reason="configuration reloaded")
    g1.save_state()
    g1.journal.close()
    g2 = build(tmp_path, clock, SPEC)
    await g2.recover(g2.state_file.load())
    assert g2._rollbacks_in_budget() == 3
    g2.machine.windows = copy.deepcopy(g1.machine.windows)
    decision = None
    for _ in range(3):
        decision = await step(g2, clock, OK, DOWN)
    assert decision is not None and decision.blocked_by == "hold"
    assert "budget" in str(g2.machine.hold)


@dataclass(frozen=True)
class LockChangeRow:
    """Inputs that make the guard change the lock file with `event`, and inputs after it
    that end the lock (both guards must end it alike)."""

    name: str
    event: str
    before: Sequence[tuple[ProbeResult, ...]]
    after: Sequence[tuple[ProbeResult, ...]]


LOCK_CHANGES = [
    LockChangeRow(
        "a hold's lock taken", "qos_locked", [(OK, OK)] + [(DOWN, DOWN)] * 4, [(DOWN, OK)] * 40
    ),
    LockChangeRow(
        "a guard window taken", "qos_locked", [(OK, OK)] + [(OK, DOWN)] * 3, [(OK, OK)] * 14
    ),
    LockChangeRow(
        "a guard window extended",
        "qos_extended",
        [(OK, OK)] + [(OK, DOWN)] * 3 + [(DOWN, OK)] + [(OK, OK)] * 12,
        [(OK, OK)] * 30,
    ),
    LockChangeRow(
        "a guard window released",
        "qos_released",
        [(OK, OK)] + [(OK, DOWN)] * 3 + [(OK, OK)] * 12,
        [(OK, OK)] * 3,
    ),
]
CRASH_POINTS = ("before the lock file", "after the lock file", "after the journal")


class CrashingStore:
    """The lock files, with a hook before and after each change of one."""

    def __init__(self, hook: Callable[[str], None]) -> None:
        self.hook = hook

    def read(self, path: Path) -> qoslock.LockInfo:
        return qoslock.LOCK_FILES.read(path)

    def write(self, path: Path, lock: qoslock.LockInfo) -> None:
        self.hook("before the lock file")
        qoslock.LOCK_FILES.write(path, lock)
        self.hook("after the lock file")

    def remove(self, path: Path) -> bool:
        self.hook("before the lock file")
        removed = qoslock.LOCK_FILES.remove(path)
        self.hook("after the lock file")
        return removed


@pytest.mark.parametrize("at", CRASH_POINTS)
@pytest.mark.parametrize("row", LOCK_CHANGES, ids=[r.name for r in LOCK_CHANGES])
async def test_a_crash_at_any_step_of_a_lock_change_is_finished_at_the_next_start(
    row: LockChangeRow, at: str, tmp_path: Path
) -> None:
    """kill -9 while guardd changes the QoS lock file: the restarted guard owns the lock the
    running one owns (never someone else's, never a released one back), journals the change
    exactly once, and ends the lock as the running one does."""
    clock = FakeClock()
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    prepare(a_root)
    g1 = await start(a_root, clock, PREVIOUS)

    def hook(point: str) -> None:
        change = g1.qos.change
        named = change is not None and change.event is not None and change.event["event"]
        if point == at and named == row.event and not b_root.exists():
            shutil.copytree(a_root, b_root)

    g1.qos.store = CrashingStore(hook)
    record = g1.record

    def recording(event: str, **fields: object) -> dict[str, object]:
        entry = record(event, **fields)
        if event == row.event and at == "after the journal" and not b_root.exists():
            shutil.copytree(a_root, b_root)
        return entry

    g1.record = recording  # type: ignore[method-assign]
    for inputs in row.before:
        await step(g1, clock, *inputs)
        if b_root.exists():
            break  # (the first such change is the one cut short)
    assert b_root.exists(), f"no {row.event}"
    changed = [e for e in g1.journal.recent if e["event"] == row.event][-1]

    b_clock = copy.copy(clock)
    g2 = build(b_root, b_clock, PREVIOUS)
    await g2.recover(g2.state_file.load())
    g2.machine.windows = copy.deepcopy(g1.machine.windows)

    assert qoslock.read_lock(g2.s.lock_file) == qoslock.read_lock(g1.s.lock_file)
    own1, own2 = g1.qos.own_lock, g2.qos.own_lock
    assert (own2 and own2.info) == (own1 and own1.info), "guardd's own lock, as before"
    assert [e["id"] for e in g2.journal.recent].count(changed["id"]) == 1, "journaled once"
    assert g2.qos.change is None, "finished"
    for n, inputs in enumerate(row.after):
        d1 = await step(g1, clock, *inputs)
        d2 = await step(g2, b_clock, *inputs)
        assert decision_key(d2) == decision_key(d1), f"tick {n} after the restart"
        assert qoslock.read_lock(g2.s.lock_file) == qoslock.read_lock(g1.s.lock_file), n
    assert not qoslock.read_lock(g2.s.lock_file).held, "the lock ended"


@dataclass(frozen=True)
class RecordsRow:
    """Inputs that make the guard journal `events` in one tick (a rollback's close, a
    hold, an alert: records whose memory state.json keeps), with the lock they take, and
    inputs after it (both guards must decide alike). `switch_fails`: every switch fails."""

    name: str
    before: Sequence[tuple[ProbeResult, ...]]
    events: tuple[str, ...]
    after: Sequence[tuple[ProbeResult, ...]]
    switch_fails: bool = False
    spec: PolicySpec = PREVIOUS

    def crash_points(self) -> tuple[str, ...]:
        """Where a crash can cut the tick short: the lock file, each record."""
        file = CRASH_POINTS[:2] if "qos_locked" in self.events else ()
        return (*file, *(f"after {e}" for e in self.events))


ROLLBACK = [(OK, OK)] + [(OK, DOWN)] * 3
RECORDS = [
    RecordsRow(
        "rollback completed", ROLLBACK, ("rollback_completed", "qos_locked"), [(OK, OK)] * 14
    ),
    RecordsRow(
        "rollback failed",
        ROLLBACK,
        ("rollback_failed", "hold", "qos_locked"),
        [(OK, DOWN)] * 6,
        switch_fails=True,
    ),
    RecordsRow("hold", [(OK, OK)] + [(DOWN, DOWN)] * 4, ("hold", "qos_locked"), [(DOWN, OK)] * 40),
    RecordsRow("P2 alert", [(OK, OK)] * 10 + [(OK, DOWN)], ("alert",), [(OK, OK)] * 20, spec=P2),
]


@pytest.mark.parametrize(
    ("row", "at"),
    [(row, at) for row in RECORDS for at in row.crash_points()],
    ids=lambda v: v.name if isinstance(v, RecordsRow) else v,
)
async def test_a_crash_around_a_ticks_journal_records_changes_nothing(
    row: RecordsRow, at: str, tmp_path: Path
) -> None:
    """kill -9 anywhere in a tick that journals what state.json remembers (a rollback's
    close and the QoS lock it takes, a hold and its lock, an alert): the restarted guard
    holds the lock and the hold the running one holds, and the lock file holds it while
    guardd is down; it journals each record once, in order (never a page twice, never
    one lost), resumes no rollback, and decides as the running guard after it."""
    clock = FakeClock()
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    prepare(a_root)
    g1 = await start(a_root, clock, row.spec)
    if row.switch_fails:
        assert isinstance(g1.switcher, FakeSwitcher) and g1.switcher.path is not None
        (g1.switcher.path.parent / "switch-fails").touch()
    lock_file = g1.s.lock_file

    def copy_at(point: str) -> None:
        if point == at and not b_root.exists():
            shutil.copytree(a_root, b_root)
            if point != CRASH_POINTS[0] and "qos_locked" in row.events:
                # What `qos status --config` reads while guardd is down: a lock.
                assert qoslock.read_lock(b_root / lock_file.relative_to(a_root)).held

    g1.qos.store = CrashingStore(copy_at)
    record = g1.record

    def recording(event: str, **fields: object) -> dict[str, object]:
        entry = record(event, **fields)
        copy_at(f"after {event}")
        return entry

    g1.record = recording  # type: ignore[method-assign]
    for inputs in row.before:
        await step(g1, clock, *inputs)
        if b_root.exists():
            break  # (the rest of the tick: what the crash cut short)
    assert b_root.exists(), f"no {at}"
    made = [(e["event"], e["id"]) for e in g1.journal.recent]
    assert [name for name, _ in made][-len(row.events) :] == list(row.events)

    b_clock = copy.copy(clock)
    g2 = build(b_root, b_clock, row.spec)
    await g2.recover(g2.state_file.load())
    g2.machine.windows = copy.deepcopy(g1.machine.windows)

    assert qoslock.read_lock(g2.s.lock_file) == qoslock.read_lock(lock_file)
    own1, own2 = g1.qos.own_lock, g2.qos.own_lock
    assert (own2 and (own2.info, own2.window is None, own2.hold)) == (
        own1 and (own1.info, own1.window is None, own1.hold)
    )
    assert g2.machine.memory().to_json() == g1.machine.memory().to_json()
    assert g2.active == g1.active
    assert [(e["event"], e["id"]) for e in g2.journal.recent] == made, (
        "journaled once each, in order, under the ids named; no rollback resumed"
    )
    assert (g2.owed, g2.qos.change) == ([], None), "finished"
    for n, inputs in enumerate(row.after):
        d1 = await step(g1, clock, *inputs)
        d2 = await step(g2, b_clock, *inputs)
        assert decision_key(d2) == decision_key(d1), f"tick {n} after the restart"
        assert qoslock.read_lock(g2.s.lock_file) == qoslock.read_lock(lock_file), n
    tail = len(g1.journal.recent) - len(made)
    assert [e["event"] for e in g2.journal.recent][len(made) :] == [
        e["event"] for e in g1.journal.recent
    ][len(made) :], f"the same {tail} records after the restart"


@pytest.mark.parametrize("cmd", ["pause", "resume"])
async def test_a_crash_just_after_an_operators_pause_or_resume_keeps_it(
    cmd: str, tmp_path: Path
) -> None:
    """kill -9 just after `paused` or `resumed` is journaled: the restarted guard is paused
    (or not) as the journal says, and journals it once."""
    clock = FakeClock()
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    prepare(a_root)
    g1 = await start(a_root, clock, SPEC)
    await steps(g1, clock, [(OK, OK)])
    if cmd == "resume":
        await handle(g1, "pause", {"reason": "maintenance"}, "uid:0(root)")
    journaled = {"pause": "paused", "resume": "resumed"}[cmd]
    record = g1.record

    def recording(event: str, **fields: object) -> dict[str, object]:
        entry = record(event, **fields)
        if event == journaled and not b_root.exists():
            shutil.copytree(a_root, b_root)
        return entry

    g1.record = recording  # type: ignore[method-assign]
    await handle(g1, cmd, {"reason": "by hand"}, "uid:0(root)")
    assert b_root.exists()
    g2 = build(b_root, copy.copy(clock), SPEC)
    await g2.recover(g2.state_file.load())
    assert g2.paused == g1.paused
    assert [e["id"] for e in g2.journal.recent] == [e["id"] for e in g1.journal.recent]


async def test_a_state_file_owing_records_guardd_cannot_journal_starts_all_the_same(
    tmp_path: Path,
) -> None:
    """state.json is data: owed records with an event guardd does not know, a malformed id
    or fields the journal writes itself are not journaled, and the start goes on; a good
    one is journaled once."""
    clock = FakeClock()
    prepare(tmp_path)
    g1 = await start(tmp_path, clock, SPEC)
    await steps(g1, clock, [(OK, OK)])
    doc = g1.state_doc()
    good = {"event": "alert", "id": "a" * 32, "reason": "owed", "ts": "1999", "guard": "x"}
    doc["journal_owed"] = [
        {"event": "no_such_event", "id": "b" * 32},
        {"event": "alert", "id": "not hex"},
        {"event": "alert"},
        "a string",
        good,
        good,
    ]
    g1.journal.close()
    g1.state_file.save(doc)
    g2 = build(tmp_path, clock, SPEC)
    await g2.recover(g2.state_file.load())
    owed = [e for e in g2.journal.recent if e["event"] == "alert"]
    assert [(e["id"], e["reason"], e["guard"]) for e in owed] == [("a" * 32, "owed", "lab")]
    assert owed[0]["ts"] != "1999"
    assert not any(e["event"] == "no_such_event" for e in g2.journal.recent)


def _files(root: Path) -> dict[Path, bytes]:
    """Every file under `root` but the lock files, and its bytes."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix != ".lock"}


@pytest.mark.parametrize("under", [None, "a freeze", "a lock for long"])
async def test_guardds_own_lock_that_state_json_never_named_is_judged_not_kept_for_ever(
    tmp_path: Path, under: str | None
) -> None:
    """A rollback on a full state disk: the lock file (elsewhere, in /run) took the
    rollback's lock, but neither state.json nor the journal took a byte of it. Started
    again, the lock is guardd's (`by`), not someone else's to wait on for ever: it is
    judged as a guard window from the start, said so, and released once its SLOs held.
    Never before what it was laid over ends: an operator's lock for long keeps it until
    then, and a freeze with no end (whose lock guardd's took over) until unlocked."""
    clock = FakeClock()
    prepare(tmp_path)
    g1 = await start(tmp_path, clock, SPEC)
    await steps(g1, clock, [(OK, OK)] * 3)
    if under is not None:
        asked = {"reason": "release freeze"} | ({"for_s": 600} if under != "a freeze" else {})
        await handle(g1, "qos_lock", asked, "uid:0(root)")
    g1.save_state()
    kept = _files(tmp_path)
    await steps(g1, clock, [(OK, DOWN)] * 3)
    lock = qoslock.read_lock(g1.s.lock_file)
    assert g1.active == "blue" and lock.held and lock.by == "guardd"
    assert (lock.until is None) == (under == "a freeze")
    for path, data in kept.items():  # what a full disk left of the state dir
        if path.name != "target":
            path.write_bytes(data)

    g2 = await start(tmp_path, clock, SPEC)
    [said] = [e for e in g2.journal.recent if "state.json does not name" in e.get("reason", "")]
    assert said["event"] == "alert" and lock.reason in said["reason"], said
    assert qoslock.read_lock(g2.s.lock_file).reason == lock.reason
    window = int(g2.s.qos_window / g2.s.probe_interval) + 5
    await steps(g2, clock, [(OK, OK)] * window)
    if under == "a freeze":
        assert said["reason"].endswith("it stays until `guardctl qos unlock`"), said
        assert qoslock.read_lock(g2.s.lock_file) == lock, "kept as it was"
        # Named in state.json from now on: a reboot (an empty /run) puts it back, and the
        # next start has nothing to say again.
        g2.save_state()
        g2.s.lock_file.unlink()
        g3 = await start(tmp_path, clock, SPEC)
        assert qoslock.read_lock(g3.s.lock_file) == lock
        assert not [e for e in g3.journal.recent[len(g2.journal.recent) :] if e["event"] == "alert"]
        await handle(g3, "qos_unlock", {"reason": "freeze over"}, "uid:0(root)")
        assert not qoslock.read_lock(g3.s.lock_file).held
        return
    assert g2.own_lock is not None or under is None
    if under == "a lock for long":
        assert qoslock.read_lock(g2.s.lock_file).until == lock.until, "not before its end"
        clock.advance(600)
        await steps(g2, clock, [(OK, OK)] * 3)
    assert not qoslock.read_lock(g2.s.lock_file).held
    assert [e for e in g2.journal.recent if e["event"] == "qos_released"]


async def test_a_rollback_state_json_missed_is_not_read_as_a_switch_made_while_down(
    tmp_path: Path,
) -> None:
    """state.json could not take the rollback (a full state disk), the journal did: at the
    next start the journal says guardd moved traffic there, so no one is blamed for it."""
    clock = FakeClock()
    prepare(tmp_path)
    g1 = await start(tmp_path, clock, SPEC)
    await steps(g1, clock, [(OK, OK)] * 3)
    g1.save_state()
    before = g1.state_file.path.read_bytes()
    await steps(g1, clock, [(OK, DOWN)] * 3)
    assert g1.active == "blue"
    assert [e["event"] for e in g1.journal.recent].count("rollback_completed") == 1
    g1.state_file.path.write_bytes(before)  # what a full disk left of it

    g2 = await start(tmp_path, clock, SPEC)
    assert g2.active == "blue"
    assert "external_switch" not in [e["event"] for e in g2.journal.recent]


@pytest.mark.parametrize("down", ["a moment", "past the window's end"])
async def test_a_guard_window_goes_on_after_a_restart_for_what_was_left_to_watch(
    tmp_path: Path, down: str
) -> None:
    """Stopped a moment into its guard window and started again after the window would
    have ended: nothing watched blue meanwhile, so the window goes on for what was left,
    the lock's until moved to its new end (`qos_extended`), and is released only then. A
    restart quicker than a probe takes to go stale moves nothing."""
    clock = FakeClock()
    prepare(tmp_path)
    g1 = await start(tmp_path, clock, SPEC)
    await steps(g1, clock, [(OK, OK)] * 3 + [(OK, DOWN)] * 3 + [(OK, OK)] * 2)
    assert g1.own_lock is not None and g1.own_lock.window is not None
    left = g1.own_lock.window.ends_at - clock.monotonic()
    assert left > 2 * g1.s.probe_interval
    g1.save_state()  # what SIGTERM does
    before = qoslock.read_lock(g1.s.lock_file)
    if down == "a moment":
        clock.advance(2 * g1.s.probe_interval)  # (a probe goes stale after 3)
        g2 = await start(tmp_path, clock, SPEC)
        assert "qos_extended" not in [e["event"] for e in g2.journal.recent]
        assert qoslock.read_lock(g2.s.lock_file) == before
        return
    clock.advance(10 * g1.s.qos_window)

    g2 = await start(tmp_path, clock, SPEC)
    [moved] = [e for e in g2.journal.recent if e["event"] == "qos_extended"]
    assert "the time guardd was not running does not count" in moved["reason"], moved
    assert moved["from"] == "blue", "the color watched, as every qos_extended names it"
    assert g2.own_lock is not None and g2.own_lock.window is not None
    assert g2.own_lock.window.ends_at == pytest.approx(clock.monotonic() + left, abs=0.01)
    assert qoslock.read_lock(g2.s.lock_file).until == moved["until"]
    await steps(g2, clock, [(OK, OK)])
    assert qoslock.read_lock(g2.s.lock_file).held, "not released on the first look"
    await steps(g2, clock, [(OK, OK)] * (int(left / g2.s.probe_interval) + 2))
    assert not qoslock.read_lock(g2.s.lock_file).held


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_a_guard_window_beneath_another_lock_comes_back_when_that_one_goes(
    tmp_path: Path, restart: bool
) -> None:
    """Another tool's lock written over guardd's guard window, then removed before the
    window passed: deploys were allowed with the new color never judged. guardd's lock
    now comes back for what is left of the window, restart or not; it is released once
    the window passes."""
    clock = FakeClock()
    prepare(tmp_path)
    g = await start(tmp_path, clock, SPEC)
    await window_beneath_a_foreign_lock(g, clock)
    [said] = [e for e in g.journal.recent if e["event"] == "alert" and "beneath" in e["reason"]]
    assert "guard window goes on beneath it" in said["reason"], said
    assert qoslock.read_lock(g.s.lock_file) == FOREIGN
    # status says the window is still watched, beneath that lock.
    shown = g.snapshot()["qos"]
    assert shown["by"] == "deploybot" and shown["window"]["beneath"] is True, shown
    assert "guardd's guard window beneath it: " in render_status(g.snapshot())
    if restart:
        g.save_state()
        g = await start(tmp_path, clock, SPEC)
        assert g.own_lock is None and g.qos.beneath is not None
    g.s.lock_file.unlink()  # the other tool is done
    await steps(g, clock, [(OK, OK)])
    back = qoslock.read_lock(g.s.lock_file)
    assert back.held and back.by == "guardd", back
    assert [e["event"] for e in g.journal.recent][-2:] == ["qos_locked", "alert"]
    await steps(g, clock, [(OK, OK)] * int(g.s.qos_window / g.s.probe_interval + 2))
    assert not qoslock.read_lock(g.s.lock_file).held
    assert g.journal.recent[-1]["event"] == "qos_released"


@pytest.mark.parametrize("ended_by", ["the window passing", "an operator's unlock"])
async def test_a_guard_window_ended_beneath_another_lock_does_not_come_back(
    tmp_path: Path, ended_by: str
) -> None:
    """The window passed (its SLOs held) while the other lock lay over it, or an operator
    unlocked: removing that lock allows deploys, and guardd's lock stays gone."""
    clock = FakeClock()
    prepare(tmp_path)
    g = await start(tmp_path, clock, SPEC)
    await window_beneath_a_foreign_lock(g, clock)
    if ended_by == "the window passing":
        await steps(g, clock, [(OK, OK)] * int(g.s.qos_window / g.s.probe_interval + 2))
        g.s.lock_file.unlink()
    else:
        await handle(g, "qos_unlock", {"reason": "ship it"}, "uid:0(root)")
    await steps(g, clock, [(OK, OK)] * 2)
    assert not qoslock.read_lock(g.s.lock_file).held
    assert g.qos.beneath is None and g.own_lock is None


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_an_unlock_that_cannot_remove_the_lock_leaves_the_window_beneath_it(
    tmp_path: Path, restart: bool
) -> None:
    """A folder where the lock was (another tool's doing) holds deploys, with guardd's
    guard window beneath it. An operator's unlock that cannot remove it is refused and
    changes nothing: once the folder is gone, guardd's lock comes back for what is left
    of the window, as it would have without the refused unlock."""
    clock = FakeClock()
    prepare(tmp_path)
    g = await start(tmp_path, clock, SPEC)
    await window_beneath_a_foreign_lock(g, clock)
    g.s.lock_file.unlink()
    g.s.lock_file.mkdir()
    await steps(g, clock, [(OK, OK)])
    assert g.own_lock is None and g.qos.beneath is not None
    count = len(g.journal.recent)
    with pytest.raises(OperationRefused, match=r"^the QoS lock could not be removed \("):
        await handle(g, "qos_unlock", {"reason": "ship it"}, "uid:0(root)")
    assert g.qos.beneath is not None, "a refused unlock ends nothing"
    assert g.snapshot()["qos"]["window"]["beneath"] is True
    if restart:
        g.save_state()
        g = await start(tmp_path, clock, SPEC)
        assert g.own_lock is None and g.qos.beneath is not None
    g.s.lock_file.rmdir()
    await steps(g, clock, [(OK, OK)])
    back = qoslock.read_lock(g.s.lock_file)
    assert back.held and back.by == "guardd", back
    events = [e["event"] for e in g.journal.recent[count:]]
    assert "qos_released" not in events and events[-2:] == ["qos_locked", "alert"], events


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_a_lock_of_guardds_put_back_after_it_ended_is_judged_as_a_guard_window(
    tmp_path: Path, restart: bool
) -> None:
    """guardd's lock file removed by hand (its lock ends, journaled), then put back (`mv`
    back, a backup restored): a lock of guardd's that it does not hold. Running or
    restarted, guardd takes it as its own and judges it as a guard window from then on,
    never before its `until`, and says so; it was left as a stranger's lock, promised a
    release by guardd that never came, holding deploys until someone noticed."""
    clock = FakeClock()
    prepare(tmp_path)
    g = await start(tmp_path, clock, SPEC)
    await guard_window(g, clock)
    lock = g.s.lock_file
    saved = lock.read_bytes()
    until = qoslock.read_lock(lock).until
    lock.unlink()
    await steps(g, clock, [(OK, OK)])
    assert g.journal.recent[-1]["event"] == "qos_released"
    count = len(g.journal.recent)
    lock.write_bytes(saved)
    if restart:
        g.save_state()
        g = await start(tmp_path, clock, SPEC)
    else:
        await steps(g, clock, [(OK, OK)])
    said = [e for e in g.journal.recent[count:] if e["event"] == "alert"]
    assert len(said) == 1, said
    why = "state.json does not name it" if restart else "this guardd does not hold it"
    assert why in said[0]["reason"] and "judged as a guard window from now" in said[0]["reason"]
    assert g.own_lock is not None and g.own_lock.window is not None
    held = qoslock.read_lock(lock)
    assert held.by == "guardd" and held.until is not None and until is not None
    assert held.until >= until
    await steps(g, clock, [(OK, OK)] * int(g.s.qos_window / g.s.probe_interval + 2))
    assert not qoslock.read_lock(lock).held
    assert g.journal.recent[-1]["event"] == "qos_released"
    assert g.journal.recent[-1]["by"] == "guardd"


@pytest.mark.parametrize("old_holds", ["guardd's lock", "another lock"])
async def test_a_lock_file_moved_by_the_config_leaves_no_lock_at_the_old_path(
    tmp_path: Path, old_holds: str
) -> None:
    """qos.lock_file changed, then a restart: guardd's lock stands at the new path, and is
    removed from the old one, where any gate still reading it would be blocked for good;
    a lock someone else put there since is theirs, left alone."""
    clock = FakeClock()
    prepare(tmp_path)
    g1 = await start(tmp_path, clock, SPEC)
    await guard_window(g1, clock)
    old = g1.s.lock_file
    mine = qoslock.read_lock(old)
    if old_holds == "another lock":
        qoslock.LOCK_FILES.write(old, FOREIGN)
    g1.save_state()
    g2 = build(tmp_path, clock, SPEC)
    g2.s = dataclasses.replace(g2.s, lock_file=tmp_path / "moved" / "lab.qos.lock")
    g2.s.lock_file.parent.mkdir()
    await g2.recover(g2.state_file.load())
    if old_holds == "another lock":
        assert qoslock.read_lock(old) == FOREIGN
        return
    assert qoslock.read_lock(g2.s.lock_file) == mine
    assert not old.exists()
    [said] = [e for e in g2.journal.recent if "qos.lock_file changed" in (e["reason"] or "")]
    assert said["reason"].endswith(f"is at {g2.s.lock_file} now, removed from {old}"), said


async def test_a_lock_file_moved_onto_another_tools_lock_keeps_the_window_beneath_it(
    tmp_path: Path,
) -> None:
    """qos.lock_file changed to a path where another tool's lock already stands: guardd's
    window goes on beneath that lock (not dropped: deploys would open when it goes), its
    lock leaves the old path, and comes back at the new one when that lock is removed."""
    clock = FakeClock()
    prepare(tmp_path)
    g1 = await start(tmp_path, clock, SPEC)
    await guard_window(g1, clock)
    old = g1.s.lock_file
    g1.save_state()
    g2 = build(tmp_path, clock, SPEC)
    g2.s = dataclasses.replace(g2.s, lock_file=tmp_path / "moved" / "lab.qos.lock")
    g2.s.lock_file.parent.mkdir()
    qoslock.LOCK_FILES.write(g2.s.lock_file, FOREIGN)
    await g2.recover(g2.state_file.load())
    assert g2.own_lock is None and g2.qos.beneath is not None
    assert not old.exists()
    g2.s.lock_file.unlink()
    await steps(g2, clock, [(OK, OK)])
    back = qoslock.read_lock(g2.s.lock_file)
    assert back.held and back.by == "guardd", back
