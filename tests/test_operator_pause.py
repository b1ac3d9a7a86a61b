"""`pause` and `resume` from the control socket, on a real `Guard` (real journal and state).

A pause journals once however often it is asked, survives in state.json, and blocks
automatic rollbacks; a resume ends it (and a hold), says whether anything changed, and
refills the rollback budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guardd.guard import Guard
from guardd.operator import handle
from tests.harness.guard_fakes import DOWN, OK, SPEC, FakeClock, prepare, start, steps

pytestmark = pytest.mark.anyio
ROOT = "uid:0(root)"


def snapshot_locked(g: Guard) -> bool:
    """Whether `g` holds a QoS lock (read through a call: the property's value changes
    between two reads in a test, which a type checker cannot see)."""
    return g.qos_held


def events(g: Guard, name: str) -> list[dict[str, Any]]:
    return [e for e in g.journal.recent if e["event"] == name]


async def test_pause_twice_journals_once_and_blocks_rollbacks(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)])
    assert await handle(g, "pause", {"reason": "maintenance"}, ROOT) == {"paused": True}
    assert await handle(g, "pause", {"reason": "again"}, ROOT) == {"paused": True}
    paused = events(g, "paused")
    assert [(e["reason"], e["by"]) for e in paused] == [("maintenance", ROOT)]
    assert g.state_file.load()["paused"] == {"reason": "maintenance", "by": ROOT}
    assert g.snapshot()["paused_reason"] == "maintenance"
    await steps(g, clock, [(OK, DOWN)] * 4)
    assert g.active == "green"
    assert events(g, "rollback_started") == []


async def test_pause_without_a_reason_says_who_paused(tmp_path: Path) -> None:
    prepare(tmp_path)
    g = await start(tmp_path, FakeClock(), SPEC)
    await handle(g, "pause", {}, ROOT)
    assert events(g, "paused")[-1]["reason"] == "paused by an operator"
    assert g.state_file.load()["paused"] == {"reason": None, "by": ROOT}


async def test_resume_says_whether_anything_changed(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    assert await handle(g, "resume", {}, ROOT) == {"paused": False, "changed": False}
    await handle(g, "pause", {"reason": "maintenance"}, ROOT)
    answer = await handle(g, "resume", {"reason": "done"}, ROOT)
    assert answer == {"paused": False, "changed": True}
    assert g.paused is None and g.state_file.load()["paused"] is None
    assert [e["reason"] for e in events(g, "resumed")] == ["resumed by an operator", "done"]


async def test_resume_ends_a_hold(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    # Both colors down: nowhere to roll back to, so the guard holds.
    await steps(g, clock, [(OK, OK)] + [(DOWN, DOWN)] * 4)
    assert g.machine.hold is not None
    assert (await handle(g, "resume", {}, ROOT))["changed"] is True
    assert g.machine.hold is None


async def test_resume_refills_the_rollback_budget(tmp_path: Path) -> None:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 3)
    assert g.active == "blue" and g._rollbacks_in_budget() == 1
    await handle(g, "resume", {}, ROOT)
    assert g._rollbacks_in_budget() == 0


async def test_a_restart_during_a_hold_keeps_deploys_blocked_until_probes_vouch(
    tmp_path: Path,
) -> None:
    """Both colors down: guardd holds, and its lock blocks deploys. Killed and started
    again, its windows are empty: a first tick before any probe (or after one) is no
    evidence that the hold is over, so the lock stays; it ends only once probes of the
    active color show it healthy again, as before the restart."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)] + [(DOWN, DOWN)] * 4)
    assert g.machine.hold is not None and g.qos_held
    again = await start(tmp_path, clock, SPEC)  # the same state folder, fresh windows
    await again.tick()
    assert again.qos_held
    await steps(again, clock, [(DOWN, OK)])  # green (active) answers once
    assert again.qos_held, events(again, "qos_released")
    assert events(again, "qos_released") == []
    # Probes that vouch for green: the hold's lock ends, said once.
    await steps(again, clock, [(DOWN, OK)] * (SPEC.min_samples + 1))
    assert snapshot_locked(again) is False
    [released] = events(again, "qos_released")
    assert "no longer" in released["reason"], released
