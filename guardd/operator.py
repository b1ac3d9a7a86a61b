"""Operator commands from the control socket, run under the guard's single lock."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Any

from guardd import qoslock, statusview
from guardd.core.types import COLORS, Color, other
from guardd.exceptions import OperationRefused
from guardd.guard import Guard
from guardd.timestamps import until_wall


async def handle(
    guard: Guard,
    cmd: str,
    args: dict[str, Any],
    by: str,
    *,
    waiting: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Run one command; raise `OperationRefused` with the reason an operator should read.

    `waiting` says whether the client still waits for the answer; a change it gave up on
    while guardd was busy (a rollback, a stalled tick) is not made.
    """
    if cmd == "status":
        return guard.snapshot()
    if cmd == "history":
        limit = args.get("limit")
        return {"events": guard.journal.read(limit if isinstance(limit, int) else None)}
    if cmd == "qos_status":
        if guard.fleet is not None:
            # The fleet's lock; unknown (never "unlocked") when etcd cannot be asked.
            return guard.fleet.qos_doc()
        return statusview.qos_doc(guard, qoslock.read_lock(guard.s.lock_file))
    if cmd == "fleet_status":
        if guard.fleet is None:
            raise OperationRefused("this guard has no [fleet] section")
        return guard.fleet.status_doc()
    async with guard.lock:
        if not waiting():
            # Told "unreachable" (a timeout, an interrupt), the operator may act by hand:
            # a change made now, behind their back, would surprise them.
            guard.log.warning("control_request_abandoned", cmd=cmd, by=by)
            raise OperationRefused("the client left before guardd could act: nothing done")
        result = await _mutate(guard, cmd, args, by)
        guard.save_state()
        return result


async def _mutate(guard: Guard, cmd: str, args: dict[str, Any], by: str) -> dict[str, Any]:
    reason = args.get("reason") or None
    if cmd == "pause":
        guard.pause(reason, by=by)
        return {"paused": True}
    if cmd == "resume":
        changed = guard.resume(reason, by=by)
        if guard.fleet is not None:
            # A hold and the rollback budget are the fleet's: so is their resume.
            await guard.fleet.rearm(by, reason or "resumed by an operator")
        return {"paused": False, "changed": changed}
    if cmd == "qos_lock":
        return await _qos_lock(guard, args, reason, by)
    if cmd == "qos_unlock":
        return await _qos_unlock(guard, reason, by)
    if guard.active is None and not (cmd == "switch" and args.get("force")):
        why = (
            "the switch target names neither color"
            if guard.target_unreadable is None
            else f"the switch target cannot be read: {guard.target_unreadable}"
        )
        raise OperationRefused(
            f"the active color is unknown ({why}); `guardctl switch COLOR --force` sets it"
        )
    if cmd == "rollback":
        assert guard.active is not None  # noqa: S101 - refused above
        target = guard.machine.rollback_target(guard.active)
        if target == guard.active and not _fleet_wants_other(guard, target):
            raise OperationRefused(f"{target} is already active; it is the rollback target")
        await _acting(
            guard,
            _move(guard, target, "rollback", by, reason or "rollback requested by an operator"),
        )
        return _moved(guard, cmd)
    if cmd == "switch":
        color: Color = args["color"]
        if color not in COLORS:
            raise OperationRefused(f"unknown color {color!r}")
        if color == guard.active and not _fleet_wants_other(guard, color):
            raise OperationRefused(f"{color} is already active")
        force = bool(args.get("force"))
        _gate(guard, color, force=force, promote=False)
        await _acting(
            guard,
            _move(
                guard,
                color,
                "switch",
                by,
                reason or f"switch to {color} requested by an operator",
                gated=not force,
            ),
        )
        return _moved(guard, cmd)
    if cmd == "promote":
        assert guard.active is not None  # noqa: S101 - refused above
        standby = other(guard.active)
        _gate(guard, standby, force=False, promote=True)
        await _move(guard, standby, "promote", by, reason or f"promote {standby}", gated=True)
        return _moved(guard, cmd)
    raise OperationRefused(f"unknown command {cmd!r}")


async def _qos_lock(
    guard: Guard, args: dict[str, Any], reason: str | None, by: str
) -> dict[str, Any]:
    current = qoslock.read_lock(guard.s.lock_file)
    # A copy of the fleet's lock, not this node's own guard window (whose `by` is
    # `fleet:<who>` too after a rollback the fleet decided).
    mirror = guard.fleet is not None and current.held and guard.fleet.is_mirror(current)
    if guard.fleet is not None:
        guard.fleet.require_etcd("the fleet's QoS lock cannot be taken")
    own = guard.own_lock
    if current.held and not mirror and (own is None or current != own.info):
        raise OperationRefused(
            f"a QoS lock is already held ({current.reason}); "
            "release it with `guardctl qos unlock` first"
        )
    # The fleet's lock as read, when another node wrote it: also while this node's own
    # guard window is what its file holds (the fleet's lock may be a colleague's freeze
    # that outlasts the window).
    fleet_lock = guard.fleet.copy_to_keep() if guard.fleet is not None else None
    if fleet_lock is None and mirror:
        fleet_lock = current
    replaced = None
    duration = args.get("for_s")
    if fleet_lock is not None:
        asked = guard.clock.wall() + float(duration) if duration else None
        if asked is not None and asked < until_wall(fleet_lock.until):
            # A lock never shortens another (as on one host): a colleague's freeze "until
            # unlocked" must not end in ten minutes because someone else locked for ten.
            raise OperationRefused(
                f"the fleet's lock ({fleet_lock.reason}, {fleet_lock.by}, until "
                f"{fleet_lock.until or 'unlocked'}) holds longer than asked; a lock never "
                "shortens it (`guardctl qos unlock` ends it)"
            )
        # The operator's lock replaces the fleet's (and the answer says which, as it may
        # have been taken on another host).
        replaced = (
            f"; it replaces the fleet's lock ({fleet_lock.reason}, {fleet_lock.by}, "
            f"until {fleet_lock.until or 'unlocked'})"
        )
    if own is not None and own.window is None and (own.manual or own.hold) and current == own.info:
        # An operator's lock (this caller's or another's), or a hold's (no end): a lock
        # never shortens another, as in a fleet. Two pipelines under one uid, the second
        # locking for ten minutes, would otherwise end the first one's freeze "until
        # unlocked" in ten; and a hold's lock would lapse while guardd still holds.
        ends = math.inf if own.expires_at is None else own.expires_at
        asked_end = guard.clock.monotonic() + float(duration) if duration else math.inf
        if asked_end < ends:
            raise OperationRefused(
                f"a QoS lock is already held ({own.info.reason}, {own.info.by}, until "
                f"{own.info.until or 'unlocked'}) longer than asked; a lock never shortens "
                "another (`guardctl qos unlock` ends it)"
            )
    plan = guard.qos.plan_take(
        reason or "locked by an operator",
        by=by,
        duration=float(duration) if duration else None,
        manual=True,
    )
    unchanged = plan.unchanged
    if guard.fleet is not None and not (unchanged and guard.fleet.qos_doc().get("locked")):
        # The fleet's lock, whichever node it is taken on (docs/contract.md "Fleet"); not
        # when this node's window already outlasts what was asked and the fleet is locked.
        # Written to etcd first: a lock etcd refuses (another node's changed it meanwhile)
        # is taken nowhere, this node's file and journal included.
        await guard.fleet.set_qos(plan.info)
    # (A copy of the fleet's lock in the file is replaced in one rename, never removed
    # first: a gate reading it in between would find no lock.)
    info = guard.qos.apply_take(plan)
    answer = info.to_json()
    if replaced is not None:
        answer["message"] = f"qos lock: done{replaced}"
    if unchanged:
        # A lock never shortens one guardd holds: say so rather than "done".
        answer["message"] = (
            f"qos lock: unchanged: the guard window's lock already holds until {info.until}, "
            "longer than asked (a lock never shortens it; `guardctl qos unlock` ends it)"
        )
    return answer


async def _qos_unlock(guard: Guard, reason: str | None, by: str) -> dict[str, Any]:
    own = guard.qos.own_lock
    if (
        own is not None
        and own.hold
        and (guard.machine.hold is not None or guard.paused or guard.s.policy.dry_run)
    ):
        # The lock of a hold, or of a pause or dry run while the active color fails:
        # released now, it is taken again at the next tick, and "unlocked" would be untrue
        # a moment later.
        raise OperationRefused(
            f"the lock stands for a standstill that goes on ({own.info.reason}); guardd "
            "would take it again at once: end that first (`guardctl resume`, `switch`, "
            "`rollback`, or a reload with policy.dry_run off)"
        )
    # A fleet's lock missing from etcd is unknown: an operator's unlock writes it released.
    fleet_held = guard.fleet is not None and (
        bool(guard.fleet.qos_doc().get("locked")) or guard.fleet.qos_missing()
    )
    if not qoslock.read_lock(guard.s.lock_file).held and not fleet_held:
        if guard.fleet is not None:
            guard.fleet.require_etcd("whether the fleet's QoS lock is held is unknown")
        raise OperationRefused("no QoS lock is held")
    if guard.fleet is not None:
        # Released in etcd first: every node releases its copy (or its own window).
        await guard.fleet.set_qos(
            qoslock.LockInfo(held=False, reason=reason or "unlocked by an operator", by=by)
        )
    guard.release_lock(by=by, reason=reason or "unlocked by an operator")
    if guard.fleet is not None:
        # What a gate now says: still locked while the fleet has not converged.
        return guard.fleet.qos_doc()
    after = qoslock.read_lock(guard.s.lock_file)
    if after.held:
        # The file could not be removed (a folder in its place, a read-only mount): deploys
        # are still blocked, and "done" would send the operator away.
        raise OperationRefused(
            f"the QoS lock could not be removed ({guard.storage.last_error}); deploys stay "
            f"blocked until {guard.s.lock_file} is gone"
        )
    return after.to_json()


def _fleet_wants_other(guard: Guard, color: Color) -> bool:
    """Whether this node serves `color` but the fleet's decision is another, or cannot be
    read (a hand's edit of `desired`): then a switch or rollback to `color` is no no-op, it
    writes the fleet's decision (the way out of one no node can apply)."""
    fleet = guard.fleet
    return fleet is not None and fleet.desired is not None and fleet.desired.get("color") != color


async def _acting(guard: Guard, move: Coroutine[Any, Any, None]) -> None:
    """Run an operator's `move`, which ends a hold only once it has moved traffic: one that
    failed and was undone fixed nothing, and the hold (with its deploy lock) stays, said."""
    held = guard.machine.hold
    try:
        await move
    except OperationRefused as e:
        if held is not None and guard.machine.hold is held:
            raise OperationRefused(f"{e}; guardd still holds ({held.reason})") from None
        raise
    if guard.machine.hold is held:
        guard.machine.clear_hold()


async def _move(
    guard: Guard, target: Color, kind: str, by: str, reason: str, *, gated: bool = False
) -> None:
    """Move this node's traffic; in a fleet, first make it the fleet's desired color
    (two-phase for a switch or promote), then apply it here as that generation.

    `gated`: the move passed the QoS gate (no `--force`); in a fleet the gate holds until
    the decision is written (see `Fleet.propose`)."""
    generation = None
    if guard.fleet is not None:
        generation = await guard.fleet.propose(target, kind, by, reason, gated=gated)
    try:
        await guard.move_traffic(target, kind=kind, by=by, reason=reason, generation=generation)
    except OperationRefused as e:
        back = guard.active
        if guard.fleet is None or generation is None or back is None or back == target:
            raise
        # Failed here and undone: the fleet's desired color goes back too, or every node
        # would keep trying the color that did not verify, its users meeting it each time.
        undone = await guard.fleet.undo(generation, back, by, str(e))
        if undone is None:
            raise
        guard.fleet.applied_generation(undone)  # served here already
        raise OperationRefused(
            f"{e}; the fleet's desired color is {back} again (generation {undone})"
        ) from None
    if generation is not None and guard.fleet is not None and guard.active == target:
        guard.fleet.applied_generation(generation)


def _gate(guard: Guard, color: Color, *, force: bool, promote: bool) -> None:
    if force:
        return
    lock = qoslock.read_lock(guard.s.lock_file).to_json()
    whose = "the QoS lock"
    fleet = guard.fleet
    if not lock["locked"] and fleet is not None and fleet.reachable:
        # The fleet's lock as this node last read it (held, or the fleet unconverged); the
        # move's decision is then written only if it has not changed (`Fleet.propose`).
        # Unreachable, `propose` refuses: etcd cannot be written.
        lock, whose = fleet.qos_doc(), "the fleet's QoS lock"
    if lock.get("unknown"):
        raise OperationRefused(
            f"{whose} is unknown ({lock.get('warning')})"
            + ("" if promote else "; use --force to override")
        )
    if lock["locked"]:
        raise OperationRefused(
            f"{whose} is held ({lock['reason']}"
            + (f", until {lock['until']}" if lock.get("until") else "")
            + ")"
            + ("" if promote else "; use --force to override")
        )
    now = guard.clock.monotonic()
    if promote:
        if not guard.machine.promotable(color, now):
            w = guard.machine.windows[color]
            need = guard.s.policy.promote_successes
            ratio = guard.machine.window_would_fire(color, now, guard.s.policy.p1_error_ratio)
            # Only what is still missing, each with where it stands now.
            missing = []
            if (lacking := guard.machine.judged(color, now)) is not None:
                missing.append(f"a window guardd can judge (now {lacking})")
            if w.consecutive_successes < need:
                missing.append(f"{need} passing probes in a row (now {w.consecutive_successes})")
            if ratio is not None:
                missing.append(
                    f"a window failed-probe ratio under {guard.s.policy.p1_error_ratio:g} "
                    f"(now {ratio:.3g})"
                )
            raise OperationRefused(
                f"{color} is not ready for promotion: it needs "
                + (" and ".join(missing) or "to be fresh and healthy")
            )
        return
    healthy = guard.machine.healthy(color, now)
    if healthy is not True:
        raise OperationRefused(
            f"{color} is {'stale' if healthy is None else 'unhealthy'}; "
            "use --force to switch anyway"
        )
    lacking = guard.machine.judged(color, now)
    if lacking is not None:
        raise OperationRefused(
            f"{color}'s window cannot be judged yet ({lacking}): whether guardd would roll "
            "it back at once is unknown; wait, or use --force to switch anyway"
        )
    ratio = guard.machine.window_would_fire(color, now, guard.s.policy.p0_error_ratio)
    if ratio is not None:
        raise OperationRefused(
            f"{color}'s window still shows a failed-probe ratio of {ratio:.3g} "
            f"(p0_error_ratio {guard.s.policy.p0_error_ratio:g}): guardd would roll it back "
            "at once; use --force to switch anyway"
        )


def _moved(guard: Guard, cmd: str) -> dict[str, Any]:
    moves = ("rollback_completed", "switch", "promote")
    event = next((e for e in reversed(guard.journal.recent) if e.get("event") in moves), None)
    answer: dict[str, Any] = {"active": guard.active, "event": event}
    lost = guard.fleet.lost_nodes() if guard.fleet is not None else []
    if lost:
        # Done on the live nodes; the lost ones were neither asked nor told: say so.
        generation = (event or {}).get("generation")
        answer["message"] = (
            f"{cmd}: done on the live nodes; not on "
            + ", ".join(lost)
            + f" (lost: lease expired), which will apply generation {generation} when back"
        )
    return answer
