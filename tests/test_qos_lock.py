"""The QoS lock: no lock shortens another guardd holds; a window too thin cannot pass.

A real `Guard` on real files with a fake clock (tests/harness/guard_fakes.py), so minutes
of guard window take a moment; the journal and the lock file are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd import qoslock
from guardd.config import FleetConfig
from guardd.core.qos import QosWindow
from guardd.core.types import Outcome
from guardd.exceptions import OperationRefused
from guardd.fleet.coordinator import Fleet
from guardd.guard import Guard
from guardd.operator import handle
from guardd.timestamps import parse_rfc3339, rfc3339
from tests.harness.guard_fakes import DOWN, OK, SPEC, FakeClock, Log, prepare, start, step, steps

pytestmark = pytest.mark.anyio
ROOT = "uid:0(root)"
QOS_WINDOW = 10.0  # guard_fakes.settings


async def rolled_back(tmp_path: Path) -> tuple[Guard, FakeClock]:
    """A guard that has just rolled green back to blue and holds its guard window."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3)
    assert g.active == "blue" and g.own_lock is not None and g.own_lock.window is not None
    return g, clock


def lock(g: Guard) -> qoslock.LockInfo:
    return qoslock.read_lock(g.s.lock_file)


def events(g: Guard, name: str) -> list[dict[str, Any]]:
    return [e for e in g.journal.recent if e["event"] == name]


async def run_until_released(g: Guard, clock: FakeClock, limit: int) -> float:
    """Healthy probes until guardd releases the lock; the monotonic time it did."""
    for _ in range(limit):
        await step(g, clock, OK, OK)
        if not lock(g).held:
            return clock.mono
    raise AssertionError(f"the lock was not released within {limit} ticks")


@pytest.mark.parametrize("for_s", [3.0, 9.0])
async def test_a_shorter_operator_lock_does_not_shorten_the_guard_window(
    tmp_path: Path, for_s: float
) -> None:
    g, clock = await rolled_back(tmp_path)
    window_until = lock(g).until
    taken_at = clock.mono
    answer = await handle(g, "qos_lock", {"reason": "hotfix", "for_s": for_s}, ROOT)
    assert answer["until"] == window_until, "the answer shows the lock as it stands"
    # Said plainly: nothing changed, rather than "done".
    assert answer["message"].startswith("qos lock: unchanged: the guard window's lock")
    assert lock(g).until == window_until
    released_at = await run_until_released(g, clock, 60)
    assert released_at >= taken_at + QOS_WINDOW - 1  # the guard window's end, not for_s
    (released,) = events(g, "qos_released")
    assert released["by"] == "guardd" and "guard window passed" in released["reason"]


async def test_a_longer_operator_lock_extends_the_guard_window(tmp_path: Path) -> None:
    g, clock = await rolled_back(tmp_path)
    taken_at = clock.mono
    answer = await handle(g, "qos_lock", {"reason": "hands off", "for_s": 30}, ROOT)
    assert "message" not in answer  # it did change: the lock now lasts longer
    until = lock(g).until
    assert until is not None and lock(g).reason == "hands off"
    released_at = await run_until_released(g, clock, 80)
    assert released_at >= taken_at + 30
    assert parse_rfc3339(events(g, "qos_released")[0]["ts"]) >= parse_rfc3339(until)
    assert events(g, "qos_released")[0]["reason"] == "operator lock expired"


async def test_an_operator_lock_until_unlocked_outlasts_the_window(tmp_path: Path) -> None:
    g, clock = await rolled_back(tmp_path)
    await handle(g, "qos_lock", {"reason": "freeze"}, ROOT)
    assert lock(g).until is None
    await steps(g, clock, [(OK, OK)] * 60)
    assert lock(g).held and not events(g, "qos_released")
    await handle(g, "qos_unlock", {}, ROOT)  # explicit: the one way to end it early
    assert not lock(g).held


async def test_the_guard_window_still_extends_under_an_operator_lock(tmp_path: Path) -> None:
    g, clock = await rolled_back(tmp_path)
    await handle(g, "qos_lock", {"reason": "hands off", "for_s": 12}, ROOT)
    await steps(g, clock, [(DOWN, OK)] + [(OK, OK)] * 11)
    assert events(g, "qos_extended"), "the failed window is judged, as without the lock"
    assert lock(g).held


async def test_a_guard_window_taken_under_an_operator_lock_keeps_it(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    await handle(g, "qos_lock", {"reason": "freeze"}, ROOT)
    await steps(g, clock, [(OK, DOWN)] * 3)  # a rollback while the operator's lock is held
    assert g.active == "blue" and events(g, "rollback_completed")
    # The window's reason says why it lasts as long as the freeze: the freeze is named.
    assert str(lock(g).reason).endswith("; a lock was already held (freeze): until unlocked")
    await steps(g, clock, [(OK, OK)] * 40)
    assert lock(g).held and lock(g).until is None
    assert not events(g, "qos_released")


class RunningClock(FakeClock):
    """Time passes between two reads of the clock (1.3 ms a monotonic read), as it does on
    a real machine: an end converted through the monotonic clock and back moves."""

    def monotonic(self) -> float:
        self.advance(0.0013)
        return self.mono


async def test_a_guard_window_ending_with_an_operators_lock_keeps_its_very_until(
    tmp_path: Path,
) -> None:
    """The window's lock shows the freeze's own `until`, to the millisecond, when it is
    taken, each time it is extended, and after a restart: a gate or a fleet comparing the
    two sees one end."""
    prepare(tmp_path)
    clock = RunningClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    await handle(g, "qos_lock", {"reason": "freeze", "for_s": 6 * QOS_WINDOW}, ROOT)
    freeze = lock(g).until
    assert freeze is not None
    await steps(g, clock, [(OK, DOWN)] * 3)  # a rollback under the freeze
    assert g.active == "blue" and events(g, "rollback_completed")
    assert lock(g).until == freeze
    await steps(g, clock, [(DOWN, OK)] + [(OK, OK)] * 12)  # a window not met: extended
    assert events(g, "qos_extended") and lock(g).until == freeze
    assert events(g, "qos_extended")[-1]["until"] == freeze
    g.save_state()
    g = await start(tmp_path, clock, SPEC)  # a restart: the floor comes back as written
    assert g.own_lock is not None and g.own_lock.floor is not None
    assert g.own_lock.floor.until == freeze
    extended = len(events(g, "qos_extended"))
    await steps(g, clock, [(DOWN, OK)] + [(OK, OK)] * 12)
    assert len(events(g, "qos_extended")) > extended and lock(g).until == freeze
    await run_until_released(g, clock, 80)
    assert parse_rfc3339(events(g, "qos_released")[-1]["ts"]) >= parse_rfc3339(freeze)


async def test_a_guard_window_outlasting_an_operators_lock_says_only_its_own_why(
    tmp_path: Path,
) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    await handle(g, "qos_lock", {"reason": "short", "for_s": QOS_WINDOW / 2}, ROOT)
    await steps(g, clock, [(OK, DOWN)] * 3)
    assert g.active == "blue" and events(g, "rollback_completed")
    # Taken while "short" held, and outlasting it: the window's own why alone.
    assert str(lock(g).reason).startswith("rollback green -> blue"), lock(g)
    assert "already held" not in str(lock(g).reason), lock(g)
    assert not events(g, "qos_released")


async def test_a_rollback_under_a_touched_lock_file_keeps_it_until_unlocked(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    g.s.lock_file.touch()  # any tool may take the lock by creating the file
    await steps(g, clock, [(OK, DOWN)] * 3)
    assert g.active == "blue" and events(g, "rollback_completed")
    assert "already held" in str(lock(g).reason)
    await steps(g, clock, [(OK, OK)] * 40)
    assert lock(g).held and not events(g, "qos_released")
    await handle(g, "qos_unlock", {}, ROOT)
    assert not lock(g).held


@pytest.mark.parametrize("first", [{"for_s": 60}, {}], ids=["for 60s", "until unlocked"])
async def test_a_lock_never_shortens_an_operators_lock(
    tmp_path: Path, first: dict[str, float]
) -> None:
    """Two pipelines under one uid: the second's `qos lock --for 3s` must not end the
    first's freeze early. Refused, naming the lock; a longer one replaces it; after an
    unlock, a short lock is anyone's to take."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    await handle(g, "qos_lock", {"reason": "freeze", **first}, ROOT)
    with pytest.raises(OperationRefused, match=r"^a QoS lock is already held \(freeze, "):
        await handle(g, "qos_lock", {"reason": "shorter", "for_s": 3}, ROOT)
    assert qoslock.read_lock(g.s.lock_file).reason == "freeze"
    if first:
        await handle(g, "qos_lock", {"reason": "longer", "for_s": 120}, ROOT)
        assert qoslock.read_lock(g.s.lock_file).reason == "longer"
    await handle(g, "qos_unlock", {}, ROOT)
    await handle(g, "qos_lock", {"reason": "shorter", "for_s": 3}, ROOT)
    await run_until_released(g, clock, 6)
    assert events(g, "qos_released")[-1]["reason"] == "operator lock expired"


@pytest.mark.parametrize(
    ("min_samples", "probes", "met"), [(5, 3, False), (5, 5, True), (1, 1, True)]
)
def test_the_window_needs_min_samples_probes(min_samples: int, probes: int, met: bool) -> None:
    w = QosWindow(0.0, 1.0, 0.01, 0.99, min_samples)
    for _ in range(probes):
        w.add(Outcome.OK)
    verdict = w.verdict()
    assert verdict.met is met
    if not met:
        assert f"min_samples is {min_samples}" in verdict.reason
    assert verdict.evidence(0.01, 0.99)["min_samples"] == min_samples


async def test_a_window_with_too_few_probes_is_extended_not_released(tmp_path: Path) -> None:
    g, clock = await rolled_back(tmp_path)
    # The active color's probes stop answering in time (each one hangs): fewer than
    # min_samples of them land in the window.
    for n in range(11):
        clock.advance(1.0)
        if n == 0:
            g.observe("blue", OK)
        g.observe("green", OK)
        async with g.lock:
            await g.tick()
    (extended,) = events(g, "qos_extended")
    assert "min_samples" in extended["reason"]
    assert extended["evidence"]["samples"] < SPEC.min_samples
    assert lock(g).held and not events(g, "qos_released")


async def test_journal_levels_follow_what_the_event_means(tmp_path: Path) -> None:
    g, clock = await rolled_back(tmp_path)
    await steps(g, clock, [(DOWN, OK)] + [(OK, OK)] * 11)  # the window fails: extended
    assert isinstance(g.log, Log)  # Guard takes any structlog-like logger
    levels = {(level, event) for level, event, _ in g.log.lines}
    assert ("warning", "qos_extended") in levels
    assert ("warning", "alert") in levels
    assert ("info", "rollback_completed") in levels
    assert ("info", "qos_locked") in levels
    g.journal.close()  # every write fails now, as on a full disk
    g.record("alert", reason="cannot tell")
    level, event, fields = g.log.lines[-1]
    assert (level, event) == ("error", "alert") and fields["journaled"] is False


def _fleet_refusing_writes(g: Guard, tmp_path: Path) -> list[int]:
    """`g` as a fleet node whose etcd answers, but refuses every transaction (the lock
    changed meanwhile: another node's `qos lock` won the race); the count of refusals."""
    fleet = Fleet(
        FleetConfig(etcd=["http://127.0.0.1:9"], node="n0", lease_ttl=2.0),
        instance="lab",
        state_dir=tmp_path / "fleet",
        switch_timeout=10.0,
    )
    fleet.reachable, fleet.guard, g.fleet = True, g, fleet
    refused = [0]

    async def txn(*_: object) -> tuple[bool, int]:
        refused[0] += 1
        return False, 7

    fleet.client.txn = txn  # type: ignore[method-assign,assignment]
    return refused


@pytest.mark.parametrize("before", ["none", "copy", "own", "window"])
async def test_a_fleet_lock_etcd_refuses_is_taken_nowhere(tmp_path: Path, before: str) -> None:
    """An operator's `qos lock` on a fleet node is written to etcd first: refused there
    (another node's lock won), it leaves this node's lock file, its own lock and its
    journal as they were, whatever the file held (nothing, a copy of the fleet's lock,
    the operator's own lock, a guard window)."""
    if before == "window":
        g, _ = await rolled_back(tmp_path)
    else:
        prepare(tmp_path)
        g = await start(tmp_path, FakeClock(), SPEC)
    soon = rfc3339(g.clock.wall() + 60.0)
    if before == "copy":
        qoslock.write_lock(
            g.s.lock_file,
            qoslock.LockInfo(True, "X", "2026-12-01T10:00:00.000Z", soon, "fleet:uid:0(root)"),
        )
    elif before == "own":
        await handle(g, "qos_lock", {"reason": "mine", "for_s": 60.0}, ROOT)
    refused = _fleet_refusing_writes(g, tmp_path)
    if before == "copy":
        g.fleet.qos = {  # type: ignore[union-attr]
            "locked": True, "reason": "X", "until": soon, "by": "uid:0(root)", "node": "n1",
        }  # fmt: skip
    file_before, own_before = lock(g), g.own_lock
    floor_before = own_before.floor if own_before is not None else None
    journal_before = list(g.journal.recent)
    with pytest.raises(OperationRefused, match="changed meanwhile"):
        await handle(g, "qos_lock", {"reason": "Y", "for_s": 3600.0}, ROOT)
    assert refused[0] == 1
    assert lock(g) == file_before
    assert g.own_lock is own_before
    assert (g.own_lock.floor if g.own_lock is not None else None) == floor_before
    assert list(g.journal.recent) == journal_before


async def test_a_generation_decided_again_while_the_lock_was_waited_for_is_not_applied(
    tmp_path: Path,
) -> None:
    """A node about to apply the fleet's generation waits for the guard's lock while an
    operator's move on this node is undone and a newer generation written back: once it
    has the lock, the generation it was about to apply is not the fleet's any more, and
    it moves nothing (applying it would put users on the color just undone)."""
    prepare(tmp_path)
    g = await start(tmp_path, FakeClock(), SPEC)
    _fleet_refusing_writes(g, tmp_path)
    fleet = g.fleet
    assert fleet is not None
    fleet.desired = {"color": "blue", "generation": 2, "kind": "switch", "node": "n0"}
    moved: list[str] = []

    async def move_traffic(target: str, **_: object) -> None:
        moved.append(target)

    g.move_traffic = move_traffic  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg, g.lock:
        tg.start_soon(fleet._converge)
        await anyio.wait_all_tasks_blocked()  # it waits for the lock
        # Meanwhile (the operator's command holds the lock): undone, written back.
        fleet.desired = {"color": "green", "generation": 3, "kind": "switch"}
        fleet.applied_generation(3)
    assert moved == []
    assert g.active == "green"


async def test_an_unlock_is_refused_while_the_standstill_its_lock_stands_for_goes_on(
    tmp_path: Path,
) -> None:
    """A hold's lock released while guardd still holds is taken again at the next tick:
    "unlocked" would be untrue a moment later, so the unlock says why it cannot be."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    await steps(g, clock, [(DOWN, DOWN)] * 4)  # green fails, and blue with it: hold
    assert g.machine.hold is not None and lock(g).held
    with pytest.raises(OperationRefused, match=r"guardd would take it again at once"):
        await handle(g, "qos_unlock", {}, ROOT)
    assert lock(g).held and not events(g, "qos_released")
    await handle(g, "pause", {"reason": "looking"}, ROOT)
    with pytest.raises(OperationRefused, match=r"`guardctl resume`"):
        await handle(g, "qos_unlock", {}, ROOT)


async def test_deploys_wait_while_a_switch_is_in_flight(tmp_path: Path) -> None:
    """A rollback stuck at nginx's reload, with its undo, lasts a few switch.timeouts
    before its lock (a guard window, a hold's) is written: the gate says locked meanwhile."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    assert (await handle(g, "qos_status", {}, ROOT))["locked"] is False
    g.rolling_back = True
    doc = await handle(g, "qos_status", {}, ROOT)
    assert (doc["locked"], doc["reason"], doc["by"]) == (True, qoslock.IN_FLIGHT, "guardd")
    assert g.snapshot()["qos"] == doc
    assert not lock(g).held  # (nothing written: it is said, as the switch goes on)


async def test_a_window_extended_past_an_operators_lock_is_guardds(tmp_path: Path) -> None:
    """An operator's lock laid over a guard window for a little longer than it; the window
    fails and is extended past that lock's end: the lock is guardd's from then on, never
    shown as the operator's with an end they never gave."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3)  # rolled back to blue: a window
    assert g.active == "blue"
    await handle(g, "qos_lock", {"reason": "hands off", "for_s": QOS_WINDOW + 2}, ROOT)
    asked = qoslock.read_lock(g.s.lock_file)
    assert asked.by == ROOT
    await steps(g, clock, [(DOWN, OK)] * 2)  # blue fails a little: the window is not met
    for _ in range(100):  # (the window ends within QOS_WINDOW of probes)
        if events(g, "qos_extended"):
            break
        await step(g, clock, OK, OK)
    assert events(g, "qos_extended"), "the window was judged and extended"
    extended = qoslock.read_lock(g.s.lock_file)
    assert extended.by == "guardd", extended
    assert (extended.until or "") > (asked.until or ""), (extended, asked)


async def test_a_lock_never_shortens_the_lock_of_a_hold(tmp_path: Path) -> None:
    """While guardd holds, its lock has no end: `qos lock --for 3s` would make it lapse
    (deploys allowed, the hold going on) until the next tick took it again."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)] + [(DOWN, DOWN)] * 4)  # both down: guardd holds
    held = qoslock.read_lock(g.s.lock_file)
    assert held.held and (held.reason or "").startswith("guardd holds: "), held
    with pytest.raises(OperationRefused, match=r"^a QoS lock is already held \(guardd holds: "):
        await handle(g, "qos_lock", {"reason": "op 3s", "for_s": 3}, ROOT)
    assert qoslock.read_lock(g.s.lock_file) == held
