"""Start-up recovery: what a guard reads back from disk before its first decision.

Owns the restart: the rollback budget rebuilt from the whole journal, a switch a crash
cut short (an open `rollback_started`) finished or undone, the switch target read and
compared with what state.json remembers, and the machine's memory, a pause and guardd's
QoS lock taken back. It runs once, before the guard's loops start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from guardd.core.machine import Memory
from guardd.core.types import COLORS, GUARDD, TRAFFIC_MOVES
from guardd.exceptions import SwitchError, why
from guardd.journal import is_named, open_rollback, record_fields
from guardd.timestamps import parse_rfc3339

if TYPE_CHECKING:
    from collections.abc import Sequence

    from guardd.guard import Guard


def load_history(guard: Guard) -> None:
    """Rebuild the rollback budget from the journal, so a restart does not reset it."""
    # Across a restart only the journal's wall-clock stamps tell; they are placed on
    # the monotonic clock once, here.
    # Rollbacks older than `budget_window` fall out in `RollbackBudget.spent`.
    # The whole file, not only the recent events kept in memory: a busy hour (a guard
    # window extended again and again) must not push a rollback out of the budget.
    wall, mono = guard.clock.wall(), guard.clock.monotonic()
    others: set[str] = set()
    for entry in guard.journal.read():
        guard.budget.count(entry, mono - (wall - _ts(entry)))
        written_by = entry.get("guard")
        if isinstance(written_by, str) and written_by != guard.s.instance:
            others.add(written_by)
    if others:
        # A state.dir shared with (or copied from) another guard: its rollbacks count in
        # this one's budget and incidents. Said, not undone: the journal is append-only.
        guard.foreign_journal = sorted(others)
        guard.log.warning(
            "journal_of_another_guard",
            others=sorted(others),
            path=str(guard.journal.path),
        )


async def recover(guard: Guard, saved: dict[str, Any]) -> None:
    """Repair a switch cut short by a crash, then adopt what the disk says."""
    try:
        # Bounded: a start-up must not outlast systemd's TimeoutStartSec, and a config
        # nginx rejects right now must not stop guardd from guarding.
        with anyio.fail_after(guard.s.switch_timeout):
            await guard.switcher.recover()
    except (SwitchError, TimeoutError) as e:
        # Said as what it is: most starts had no switch in flight to repair, only a target
        # to check (nginx -t), which failed.
        guard.record("alert", reason=f"the switch target failed its check at start: {why(e)}")
    # The memory first: a rollback resumed below ends in its own hold or guard window.
    guard.machine.restore(Memory.from_json(saved))
    # What a crash left owed to the journal (`Guard.owe`), first: a rollback whose close
    # it names is closed, not resumed.
    guard.owed = _still_owed(guard, saved.get("journal_owed"))
    guard.pay()
    # Then the pause and the lock as they were: a rollback resumed below takes its lock
    # (a guard window, a hold's) over guardd's own lock, never over a lock it forgot.
    if isinstance(saved.get("paused"), dict):
        guard.paused = saved["paused"]
    # The color served, before the lock: a guard window moved at start names the color
    # it watches, as every `qos_extended` does.
    guard.active = await guard.read_target()
    guard.qos.restore(saved.get("qos"), saved.get("qos_change"))
    pending = open_rollback(guard.journal.recent)
    if pending is not None:
        await _resume_rollback(guard, pending)
    remembered = saved.get("active")
    interrupted = _interrupted_move(guard, saved.get("moving"))
    moved_while_down = (
        remembered in COLORS
        and guard.active is not None
        and remembered != guard.active
        and pending is None
        and not interrupted
        # state.json may be older than the journal (a full state disk took the journal's
        # lines later, or kept its page's room): a move the journal ends with, to the
        # color served now, is guardd's own, not a switch made while it was down.
        and _last_moved_to(guard.journal.recent) != guard.active
    )
    if moved_while_down:
        guard.record(
            "external_switch",
            source=remembered,
            target=guard.active,
            by="external",
            reason="the switch target changed while guardd was not running",
        )
    elif remembered in COLORS and guard.active is None and pending is None and not interrupted:
        # Named a color when guardd stopped, none now (removed, replaced, pointed at a
        # hotfix copy): said as a change made while guardd runs is, before the hold.
        guard.record_target_lost(remembered, "changed while guardd was not running")
    if moved_while_down or interrupted:
        # Someone moved traffic while guardd was down: an operator acted, just as with
        # a switch made while it runs (`Guard._adopt_external_switch`).
        guard.machine.clear_hold()
    elif pending is None and remembered == guard.active:
        # Traffic is where it was: the `for` of a condition that held goes on, as if
        # guardd had not stopped (a switch would have started them afresh).
        guard.carry_onsets(saved.get("onsets"))
    guard.metrics.set_active(guard.active)


def _last_moved_to(recent: Sequence[dict[str, Any]]) -> object:
    """The `to` of the last traffic move among the journal's `recent` events (oldest
    first), None when there is none."""
    return next((e.get("to") for e in reversed(recent) if e.get("event") in TRAFFIC_MOVES), None)


def _interrupted_move(guard: Guard, moving: object) -> bool:
    """Journal an operator's switch or promote a crash cut short (state.json's `moving`,
    `Guard.move_traffic`), as theirs: done, if the switch target names its color now (the
    switcher's `recover` finished it), else an `alert` that it was not. True when it was
    done: traffic moved by the operator, not by someone while guardd was down."""
    if not is_named(moving) or not isinstance(moving, dict):
        return False
    if moving["event"] not in ("switch", "promote"):
        return False
    if guard.journaled(moving["id"]):
        return moving.get("target") == guard.active  # journaled before the crash
    fields = record_fields(moving)
    target, by = fields.get("target"), fields.get("by")
    if target is not None and target == guard.active:
        said = fields.get("reason") or moving["event"]
        reason = f"{said}; interrupted by a restart, found done at start"
        guard.record(moving["event"], event_id=moving["id"], **{**fields, "reason": reason})
        return True
    guard.record(
        "alert",
        source=fields.get("source"),
        target=target,
        by=by,
        reason=f"the {moving['event']} to {target} by {by} was cut short by a restart and not "
        f"made: {guard.active or 'no color'} is served",
    )
    return False


def _still_owed(guard: Guard, owed: object) -> list[dict[str, Any]]:
    """The records state.json's `journal_owed` names that the journal lacks, each once:
    the crash may have come after some were written. What guardd cannot journal (an
    unknown event, a malformed id: state.json is data) is left out."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record in owed if isinstance(owed, list) else []:
        if is_named(record) and record["id"] not in seen and not guard.journaled(record["id"]):
            seen.add(record["id"])
            found.append(record)
    return found


async def _resume_rollback(guard: Guard, started: dict[str, Any]) -> None:
    target = started.get("to")
    # A journal line is data: only a real color is remembered as the one rolled away from.
    source = started.get("from") if started.get("from") in COLORS else None
    if target not in COLORS:
        return
    reason = f"interrupted by a restart; resumed: {started.get('reason')}"
    guard.log.warning("rollback_resuming", rollback_id=started.get("id"), target=target)
    closing: dict[str, Any] = {
        "severity": started.get("severity"),
        "by": str(started.get("by", GUARDD)),
        "evidence": started.get("evidence"),
        "rollback_id": str(started.get("id")),
    }
    with anyio.CancelScope(shield=True):
        # The link may already name the target (the crash fell after the rename):
        # then only the verification is owed, and a failed one is undone all the same.
        outcome = await guard.switch_verified(source, target, switch=guard.active != target)
    # A fleet's generation stays with the rollback it was started as, and counts as applied.
    generation = started.get("generation")
    fleet: dict[str, Any] = {"generation": generation} if isinstance(generation, int) else {}
    if outcome.failure is not None:
        guard.close_failed(source, target, reason=reason, outcome=outcome, **closing, **fleet)
        return
    guard.active = target
    guard.machine.switched()
    guard.close_completed(
        source, target, reason=reason, lock_reason=str(started.get("reason")), **closing, **fleet
    )
    if guard.fleet is not None and isinstance(generation, int):
        guard.fleet.applied_generation(generation)


def _ts(entry: dict[str, Any]) -> float:
    try:
        return parse_rfc3339(str(entry.get("ts")))
    except ValueError:
        return 0.0
