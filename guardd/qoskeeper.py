"""The QoS lock keeper: the lock file guardd writes, and the guard window that releases it.

Owns the lock guardd holds (`OwnedLock`: the lock file's content, the guard window that
judges its release, an operator's expiry and floor) and whether any lock is held now. It
takes, extends and releases the lock, notices when someone else removed or replaced it,
and puts it back after a restart. What it does is journaled and saved through its host,
the guard, whose single lock every call already holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from guardd import qoslock
from guardd.core.machine import STALE_INTERVALS
from guardd.core.qos import QosVerdict, QosWindow
from guardd.core.types import GUARDD, Color, Outcome
from guardd.exceptions import StorageError, UnsafePath, why
from guardd.journal import is_named, named_record, record_fields
from guardd.metrics import GuardMetrics
from guardd.timestamps import parse_rfc3339, rfc3339

if TYPE_CHECKING:
    from guardd.guard import GuardSettings, Storage

#: How long after the last of the other nodes' guard windows the leader's is judged again
#: (seconds): time for those nodes' records to say their windows ended. Also the shortest
#: such extension.
STAY_MARGIN_S = 1.0


@dataclass(frozen=True, slots=True)
class Floor:
    """An end a lock is not released before: another lock's, laid over or under a guard
    window. Kept as written as well as on the monotonic clock: rendered back from the
    monotonic clock, it would move by the time between two clock reads each time, and a
    lock that ends with another must show that lock's very `until`."""

    at: float  # monotonic seconds; math.inf = until unlocked
    until: str | None  # the RFC 3339 end as written; None = until unlocked

    @classmethod
    def of(cls, at: float, wall: float, now: float) -> Floor:
        """The floor at monotonic `at`, its `until` read off the clocks (`wall` and
        monotonic `now` read together)."""
        return cls(at, None if math.isinf(at) else rfc3339(wall + at - now))


UNLOCKED = Floor(math.inf, None)


@dataclass(frozen=True, slots=True)
class TakePlan:
    """A lock `QosKeeper.plan_take` planned: what `apply_take` writes and keeps."""

    info: qoslock.LockInfo
    window: QosWindow | None
    expires_at: float | None  # monotonic; None = until unlocked
    manual: bool
    floor: Floor | None
    # The guard window held already lasts longer than asked: only its floor moves.
    unchanged: bool = False


@dataclass(slots=True)
class OwnedLock:
    """A lock file guardd wrote, with the window that will judge its release."""

    info: qoslock.LockInfo
    window: QosWindow | None  # None for an operator's lock, which only expires
    expires_at: float | None  # monotonic; None = until unlocked
    manual: bool
    # An operator's lock laid over a guard window, or one a window was taken under: the
    # lock is not released before this, whatever the window says.
    floor: Floor | None = None
    # Whether the window's last judgement found its SLOs not held (extended for that): a
    # fleet node says so in its record.
    failed: bool = False
    # A lock taken because the guard holds (`QosKeeper.hold`): it lasts as long as the hold.
    hold: bool = False


@dataclass(frozen=True, slots=True)
class LockChange:
    """A change of the lock file under way (state.json `qos_change`).

    state.json names it before the file is touched, so that a crash at any step is finished
    at the next start (`QosKeeper.restore`): cut short between the file and state.json,
    guardd's own lock would otherwise read as someone else's (never released) and a
    released one would come back. `before`/`after`: the file as it was and as the change
    leaves it (`after` None: removed); `event`: the journal record the change makes
    (`event`, `id` and its fields), None when it makes none.
    """

    before: qoslock.LockInfo
    after: qoslock.LockInfo | None
    event: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """The `qos_change` object of state.json."""
        return {
            "before": self.before.to_json(),
            "after": None if self.after is None else self.after.to_json(),
            "event": self.event,
        }

    @classmethod
    def from_json(cls, doc: object) -> LockChange | None:
        """The change `to_json` wrote; None for anything else (nothing to finish)."""
        if not isinstance(doc, dict):
            return None
        before, after, event = (
            _lock_info(doc.get("before")),
            _lock_info(doc.get("after")),
            doc.get("event"),
        )
        if before is None or (doc.get("after") is not None and after is None):
            return None
        if event is not None and not is_named(event):
            return None
        return cls(before, after, event)


def _lock_info(doc: object) -> qoslock.LockInfo | None:
    """A `LockInfo.to_json` object read back; None if it is not one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("locked"), bool):
        return None
    fields = [doc.get(k) for k in ("reason", "locked_at", "until", "by")]
    if not all(f is None or isinstance(f, str) for f in fields):
        return None
    return qoslock.LockInfo(doc["locked"], *fields)


class LockHost(Protocol):
    """What the keeper needs of the guard it serves."""

    s: GuardSettings
    clock: Any
    log: Any
    metrics: GuardMetrics
    storage: Storage
    active: Color | None

    @property
    def fleet(self) -> object | None:
        """The fleet's coordinator on a fleet node (which writes the lock file too)."""
        ...

    def record(self, event: str, **fields: Any) -> dict[str, Any]: ...

    def save_state(self) -> None: ...

    def pay(self) -> None: ...

    def storage_failed(self, kind: str, message: str) -> None: ...

    def storage_ok(self, kind: str) -> None: ...

    def lock_to_keep(self) -> qoslock.LockInfo | None:
        """A lock that must stay in the lock file once guardd's own ends (a fleet node's
        copy of the fleet's lock, held by another node), else None."""
        ...

    def holds_why(self) -> str | None:
        """The reason of the lock a hold takes while guardd holds now, else None."""
        ...

    def lock_must_stay(self) -> str | None:
        """Why a guard window whose SLOs held must not end yet (a fleet node still serves
        another color than the fleet's desired one), else None."""
        ...

    def lock_stay_ends(self) -> float | None:
        """When what `lock_must_stay` waits for ends (wall seconds), if that is known."""
        ...

    def guard_window_passed(self) -> None:
        """The guard window of the last rollback passed, its SLOs held: whatever lock still
        holds (an operator's, laid over it or taken elsewhere), the rollback is judged."""
        ...

    def journaled(self, event_id: str) -> bool:
        """Whether the journal's recent events hold the one with this `id`."""
        ...


class QosKeeper:
    """guardd's side of the QoS lock file (`qos.lock_file`)."""

    def __init__(self, host: LockHost) -> None:
        self.host = host
        self.own_lock: OwnedLock | None = None
        # A change of the lock file under way, named in state.json before it is made.
        self.change: LockChange | None = None
        self.held = False  # whether any lock file is there, as of the last look
        #: Where the lock is read and written (the files; a replay keeps it in memory).
        self.store: qoslock.LockStore = qoslock.LOCK_FILES
        # The rules firing on the active color at the last tick: a measurement, taken
        # again after a restart (a rule still firing then is counted again: fail closed).
        self._firing: frozenset[str] = frozenset()
        self._firing_color: Color | None = None
        # guardd's guard window whose lock another tool's lock replaced in the file (a
        # `qos_guard.sh lock` of old): it goes on beneath that one, and its lock comes back
        # if that one is removed before it passes (`_unbury`). Removed otherwise, deploys
        # would be allowed with the new color never judged.
        self.beneath: OwnedLock | None = None

    def take(
        self, reason: str, *, by: str, duration: float | None = None, manual: bool = False
    ) -> qoslock.LockInfo:
        """Write guardd's lock: a guard window, or an operator's lock for `duration` seconds
        (None: until unlocked). Returns the lock as it now stands (`plan_take`, then
        `apply_take`)."""
        return self.apply_take(self.plan_take(reason, by=by, duration=duration, manual=manual))

    def plan_take(
        self, reason: str, *, by: str, duration: float | None = None, manual: bool = False
    ) -> TakePlan:
        """What `take` would write, changing nothing: a fleet node writes the lock to etcd
        first and takes it here only once etcd has it (`apply_take`), so that a lock etcd
        refused leaves no trace in this node's file or journal.

        A new lock never shortens one guardd holds: an operator's lock laid over a guard
        window can only extend it (the window is still judged, and extended if its SLOs
        fail), and a guard window taken under an operator's lock lasts at least as long as
        that lock. Only `release` (`guardctl qos unlock`) ends a lock early.
        """
        host = self.host
        wall = host.clock.wall()
        now = host.clock.monotonic()
        old = self.own_lock
        window: QosWindow | None
        floor: Floor | None
        if manual and old is not None and old.window is not None:
            # An operator's lock over a guard window: a floor under the window's end.
            asked = UNLOCKED if duration is None else Floor.of(now + duration, wall, now)
            floor = asked if old.floor is None or asked.at > old.floor.at else old.floor
            if floor.at <= (math.inf if old.expires_at is None else old.expires_at):
                # The guard window already lasts longer: only the floor moves.
                return TakePlan(old.info, old.window, old.expires_at, False, floor, unchanged=True)
            window, manual = old.window, False
            end = floor
        elif manual:
            # An operator takes one, or replaces an operator's lock by a longer one
            # (`operator._qos_lock` refuses a shorter: a lock never shortens another).
            window, floor = None, None
            end = UNLOCKED if duration is None else Floor.of(now + duration, wall, now)
        else:
            span = duration or host.s.qos_window
            window = self._new_window(now, span)
            current = self.store.read(host.s.lock_file)
            # A fleet node's copy of the fleet's lock is no one else's: the window replaces
            # it in one rename and ends as windows do (the fleet's lock holds either way).
            foreign = current.held and current != host.lock_to_keep()
            if foreign and (old is None or current != old.info):
                # Someone else's lock (a touched file): it had no end, so neither does ours.
                floor = UNLOCKED
                reason = f"{reason}; a lock was already held ({current.reason}): until unlocked"
            elif old is None or old.hold:
                floor = None  # (a hold's lock ends as the hold does: the window replaces it)
            elif old.window is None:  # an operator's lock: the guard window lasts at least as long
                floor = Floor(
                    math.inf if old.expires_at is None else old.expires_at, old.info.until
                )
                if floor.at > now + span:
                    # The window ends with that lock, and its reason must still say why it
                    # holds that long, or a `qos status` shows a freeze's end under a
                    # rollback's why.
                    reason = (
                        f"{reason}; a lock was already held ({old.info.reason}): until "
                        f"{old.info.until or 'unlocked'}"
                    )
            else:
                floor = old.floor
            end = _later(Floor.of(now + span, wall, now), floor)
        info = qoslock.LockInfo(True, reason, rfc3339(wall), end.until, by)
        expires_at = None if math.isinf(end.at) else end.at
        return TakePlan(info, window, expires_at, manual and window is None, floor)

    def apply_take(self, plan: TakePlan) -> qoslock.LockInfo:
        """Take the lock `plan_take` planned; returns it."""
        host = self.host
        if plan.unchanged:
            old = self.own_lock
            if old is not None:
                old.floor = plan.floor
            host.save_state()
            return plan.info
        info = plan.info
        own = OwnedLock(info, plan.window, plan.expires_at, plan.manual, plan.floor)
        self._change(own, info, "qos_locked", reason=info.reason, by=info.by, until=info.until)
        return info

    def hold(self, reason: str) -> None:
        """guardd will not act on a failing color (it holds: a spent rollback budget, a
        rollback that failed, both colors down; or it is paused), so deploys wait too. Take
        a lock for `reason` that lasts as long as that (`end_hold`), unless a lock is held
        already."""
        host = self.host
        if self.own_lock is not None or self.store.read(host.s.lock_file).held:
            return  # locked already (a guard window, an operator's lock, the fleet's copy)
        self._hold_lock(reason)

    def rehold(self, reason: str) -> None:
        """The standstill `hold` took its lock for goes on for another cause: the lock says
        `reason` now, in one write (journaled `qos_locked`, as a new lock)."""
        own = self.own_lock
        if own is not None and own.hold and own.info.reason != reason:
            self._hold_lock(reason)

    def _hold_lock(self, reason: str) -> None:
        info = qoslock.LockInfo(True, reason, rfc3339(self.host.clock.wall()), None, GUARDD)
        own = OwnedLock(info, None, None, manual=False, hold=True)
        self._change(own, info, "qos_locked", reason=reason, by=GUARDD, until=None)

    def end_hold(self, why: str) -> None:
        """What `hold` stood for ended (`why`): release its lock, if still the one held."""
        own = self.own_lock
        if own is not None and own.hold:
            self.release(by=GUARDD, reason=f"the hold ended: {why}")

    def _change(
        self,
        own: OwnedLock | None,
        after: qoslock.LockInfo | None,
        event: str,
        *,
        ends_beneath: bool = False,
        **fields: Any,
    ) -> bool:
        """Make `own` guardd's lock (None: it holds none) and leave `after` in the lock file
        (None: remove it), journaling `event` with `fields` when a lock is taken, changed or
        removed. In an order a crash at any step cannot break (`LockChange`): state.json
        names the change, then the file, the journal (the event under the id named, after
        the records the guard owes, `Guard.owe`, which that state.json names too), and
        state.json again without it.

        A write that fails leaves `own` guardd's lock all the same (`step` writes it again);
        a release (`own` None) that fails changes nothing, not even the window beneath
        another's lock that `ends_beneath` (an operator's unlock) would have ended. Returns
        whether the file held a lock before (False too when a release failed).
        """
        host = self.host
        before = self.store.read(host.s.lock_file)
        previous, beneath = self.own_lock, self.beneath
        if own is not None or ends_beneath:
            self.beneath = None  # a lock of guardd's own again: the window beneath is done
        record = None
        if own is not None or before.held:
            record = named_record(event, fields)
        self.own_lock, self.change = own, LockChange(before, after, record)
        host.save_state()
        if not self._write(after) and own is None:
            self.own_lock, self.beneath, self.change = previous, beneath, None
            host.save_state()
            return False
        self.held = after is not None
        host.metrics.set_qos_locked(self.held)
        # What the guard owes the journal comes first: a rollback's `rollback_completed`
        # before its guard window's `qos_locked`, once the lock is on disk.
        host.pay()
        if record is not None:
            host.record(event, event_id=record["id"], **fields)
        self.change = None
        host.save_state()
        return before.held

    def _write(self, after: qoslock.LockInfo | None) -> bool:
        """Leave `after` in the lock file (None: remove it); a failure is accounted for
        (`storage_failed`), not raised. Returns whether it went through."""
        lock_file = self.host.s.lock_file
        try:
            if after is None:
                self.store.remove(lock_file)
            else:
                self.store.write(lock_file, after)
        except (OSError, StorageError, UnsafePath) as e:
            done = "remove" if after is None else "write"
            self.host.storage_failed("lock", f"cannot {done} {lock_file}: {why(e)}")
            return False
        self.host.storage_ok("lock")
        return True

    def _windows(self) -> list[QosWindow]:
        """The guard windows under way: guardd's lock's, and one beneath another's lock."""
        return [
            lock.window
            for lock in (self.own_lock, self.beneath)
            if lock is not None and lock.window is not None
        ]

    def observe(self, outcome: Outcome) -> None:
        """Count one probe round of the active color in the guard window, if one runs."""
        for window in self._windows():
            window.add(outcome)

    def add_traffic(self, requests: int, errors_5xx: int) -> None:
        """Real requests of the active color since the last tick, for the guard window."""
        for window in self._windows() if requests > 0 else ():
            window.add_traffic(requests, errors_5xx)

    def signals_blind(
        self,
        gave_nothing: set[str],
        quiet: Mapping[str, tuple[float | None, float]],
        now: float,
    ) -> None:
        """Count the signals that could not tell at monotonic `now` (`QosWindow.signal_blind`):
        those that gave nothing, and those of `quiet` (name -> (monotonic time of their
        last reading of the active color, or None; their `stale_after`)) that said nothing
        for longer than their `stale_after` within the window. A rollback's target served
        no traffic while it was the standby: its silence before the window is no blindness
        of the window's."""
        for window in self._windows():
            for name in sorted(gave_nothing):
                window.signal_blind(name)
            for name, (last_at, limit) in sorted(quiet.items()):
                since = window.started_at if last_at is None else max(last_at, window.started_at)
                if now - since > limit:
                    window.signal_blind(name)

    def rules_firing(self, color: Color | None, names: frozenset[str]) -> None:
        """The P0-P2 rules firing on the active color at this tick (dry runs aside).

        The guard window counts a rule when its firing begins within the window, or when
        it still fires as the window is judged (docs/contract.md §2 "Rules"): one bad
        moment is counted by the window it happened in, not by every window its sliding
        statistics still remember it in, unless it still fires at the end.
        """
        before = self._firing if color == self._firing_color else frozenset()
        for window in self._windows():
            for name in sorted(names - before):
                window.rule_fired(name)
        self._firing, self._firing_color = names, color

    def step(self, now: float) -> None:
        """Look at the lock file, and judge the guard window (release or extend) when due."""
        host = self.host
        current = self.store.read(host.s.lock_file)
        own = self.own_lock
        if own is not None and current != own.info:
            if "lock" in host.storage.failing and not current.held:
                self._write(own.info)  # the earlier write failed (disk full): try again
                current = self.store.read(host.s.lock_file)
            if current != own.info:
                # Removed or replaced by someone else: theirs now, never ours to delete.
                if not current.held and host.fleet is None:
                    # Removed by hand (`rm`): deploys are allowed from now on, and the
                    # journal says so, as for a switch made by hand (`external_switch`).
                    # (A fleet node's file is also its coordinator's to change.)
                    host.record(
                        "qos_released",
                        by="external",
                        reason=f"the lock file {host.s.lock_file} was removed outside "
                        f"guardd; its lock ({own.info.reason}) ends",
                    )
                elif host.fleet is None:
                    # Overwritten (emptied, another tool's lock): deploys stay blocked by
                    # what is there now, until it is removed; guardd no longer ends it.
                    # A guard window goes on beneath it, and comes back if it is removed.
                    going_on = own.window is not None and not own.hold
                    host.record(
                        "alert",
                        by="external",
                        reason=f"the lock file {host.s.lock_file} was overwritten outside "
                        f"guardd: guardd's lock ({own.info.reason}) ends, and the lock there "
                        "now holds deploys until it is removed (`guardctl qos unlock`)"
                        + (
                            "; guardd's guard window goes on beneath it, and its lock comes "
                            "back if that one is removed before the window passes"
                            if going_on
                            else ""
                        ),
                    )
                    self.beneath = own if going_on else None
                self.own_lock = own = None
                host.save_state()
        self.held = current.held
        if own is None:
            self._unbury(now, current)
            if self.own_lock is None and self.beneath is None and self._unheld(current):
                # A lock of guardd's that this guardd does not hold (its file put back by
                # hand after it ended, a copy): judged as at a start (`_adopt`), never left
                # as a stranger's lock that would hold deploys until someone notices.
                self._adopt(
                    current,
                    f"the QoS lock in {host.s.lock_file} is guardd's ({current.reason}), but "
                    "this guardd does not hold it (put back after it ended?)",
                )
            return
        if own.window is not None and own.window.due(now):
            for name in sorted(self._firing):
                own.window.rule_fired(name)  # still firing as the window is judged
            verdict = own.window.verdict()
            evidence = verdict.evidence(own.window.max_error_ratio, own.window.min_health_ratio)
            # SLOs held here, but a fleet node still serves the color rolled away from:
            # the window goes on (a deploy now would meet users on that node).
            stay = host.lock_must_stay() if verdict.met else None
            if stay is not None:
                evidence = {**evidence, "fleet": stay}
            if verdict.met and stay is None:
                host.guard_window_passed()
            if verdict.met and stay is None and own.floor is not None and own.floor.at > now:
                # The window passed, but an operator's lock laid over it still stands.
                host.log.info("guard_window_passed", reason=verdict.reason, until=own.info.until)
                own.window = None
                own.manual = True
                own.expires_at = None if math.isinf(own.floor.at) else own.floor.at
                own.floor = None
                host.save_state()
            elif verdict.met and stay is None and (holds := host.holds_why()) is not None:
                # The window passed while guardd holds (its rollback budget spent, say): the
                # hold's lock takes the window's place in one rename, as a window takes a
                # hold's. Released first, the file would be missing for a moment, and the
                # journal (and every `qos` sink) would announce deploys allowed.
                self._hold_lock(f"{holds} (the guard window passed: {verdict.reason})")
            elif verdict.met and stay is None:
                self.release(
                    by=GUARDD, reason=f"guard window passed: {verdict.reason}", evidence=evidence
                )
            else:
                self._extend(now, own, verdict, evidence, stay)
        elif own.window is None and own.expires_at is not None and now >= own.expires_at:
            self.release(by=GUARDD, reason="operator lock expired")

    def _unbury(self, now: float, current: qoslock.LockInfo) -> None:
        """Once the lock laid over guardd's guard window (`beneath`) is removed, put the
        window's lock back: for what is left of it, or, when it passed meanwhile without
        its SLOs holding, for a window more; one that passed with them held ends there."""
        below, host = self.beneath, self.host
        if below is None or current.held or below.window is None:
            return
        self.beneath = None
        window = below.window
        failed: str | None = None
        if window.due(now):
            verdict = window.verdict()
            if verdict.met:
                host.log.info("guard_window_passed", reason=verdict.reason, beneath=True)
                host.save_state()
                return
            failed = verdict.reason
            window.restart(now, host.s.qos_window)
        wall = host.clock.wall()
        end = Floor.of(window.ends_at, wall, now)
        info = qoslock.LockInfo(True, below.info.reason, rfc3339(wall), end.until, GUARDD)
        own = OwnedLock(info, window, end.at, manual=False)
        self._change(own, info, "qos_locked", reason=info.reason, by=GUARDD, until=info.until)
        window_said = (
            "guardd's guard window has not passed"
            if failed is None
            else f"guardd's guard window passed beneath it without its SLOs holding ({failed}), "
            "and goes on for a window more"
        )
        host.record(
            "alert",
            by=GUARDD,
            reason=f"the lock laid over guardd's in {host.s.lock_file} was removed, and "
            f"{window_said}: its lock is back until {info.until}",
        )

    def _extend(
        self,
        now: float,
        own: OwnedLock,
        verdict: QosVerdict,
        evidence: dict[str, Any],
        stay: str | None,
    ) -> None:
        """Extend guardd's own lock whose window was judged not met (`stay` None) or met but
        kept by the fleet (`stay`: why)."""
        host = self.host
        window = own.window
        assert window is not None  # noqa: S101 - a window was judged
        why_not = verdict.reason if stay is None else f"{verdict.reason}, but {stay}"
        wall = host.clock.wall()
        span = host.s.qos_window
        stay_ends = host.lock_stay_ends() if stay is not None else None
        if stay_ends is not None:
            # Other nodes' windows, each with a known end: until just after the last
            # of them, the probes seen so far still counted (a fresh short window
            # would have too few to be judged).
            span = min(span, max(STAY_MARGIN_S, stay_ends - wall + STAY_MARGIN_S))
        window_end = Floor.of(now + span, wall, now)
        end = _later(window_end, own.floor)
        # Moved past an operator's lock laid over the window, the lock is guardd's: never
        # credited to them with an end they never gave (as at a restart).
        by = GUARDD if end is window_end else own.info.by
        info = dataclasses.replace(own.info, until=end.until, by=by)
        own.info = info
        if stay_ends is not None:
            window.prolong(now + span)
        else:
            window.restart(now, host.s.qos_window)
        own.expires_at = None if math.isinf(end.at) else end.at
        own.failed = stay is None  # this judgement's, not sticky: met next time, not
        self._change(
            own,
            info,
            "qos_extended",
            source=host.active,
            reason=why_not,
            until=info.until,
            evidence=evidence,
        )
        if stay is None:
            # (A node that serves another color is an alert of the fleet's already.)
            host.record(
                "alert",
                source=host.active,
                reason=f"guard window not met, lock extended: {why_not}",
            )
        host.save_state()

    def repeat_key(self, now: float) -> tuple[tuple[object, ...], tuple[object, ...]]:
        """What `step(now)` and `rules_firing` read (`Guard.repeat_key`): the lock file as
        it reads now, guardd's own lock and whether its window or expiry is due at `now`.
        A step that found nothing due leaves the keeper as another on the same key would.

        A pair: first `moving_key(now)`, what the passing of time changes (a probe round
        counted in the window is read only once the window is due, which is in it), then
        what only a step, a lock taken or released, or a restart changes.
        """
        own = self.own_lock
        lock: tuple[object, ...] | None = None
        if own is not None:
            lock = (
                own,
                own.info,
                own.window,
                own.floor,
                own.manual,
                "lock" in self.host.storage.failing,
            )
        current = self.store.read(self.host.s.lock_file)
        return self.moving_key(now), (current, self.held, lock, self._firing, self._firing_color)

    def moving_key(self, now: float) -> tuple[object, ...]:
        """The part of `repeat_key` that time changes: whether guardd's own lock's window,
        or its expiry, is due at monotonic `now` (None without a lock of guardd's)."""
        own = self.own_lock
        if own is None:
            return ()
        window = own.window
        return (
            window is not None and window.due(now),
            own.expires_at is not None and now >= own.expires_at,
        )

    def release(self, *, by: str, reason: str, evidence: dict[str, Any] | None = None) -> bool:
        """Remove the lock file (any lock, when an operator asks) and journal it."""
        host = self.host
        # Ours ends, but a lock that still holds takes its place in one rename: a gate that
        # reads the file never sees it missing in between (an operator's unlock, `by`
        # someone else, removes the file whatever it holds).
        keep = host.lock_to_keep() if by == GUARDD else None
        if keep is not None:
            reason += f"; the fleet's lock ({keep.by}, until {keep.until or 'unlocked'}) holds"
        # An operator's unlock ends guardd's window beneath, too (once the file is gone).
        return self._change(
            None,
            keep,
            "qos_released",
            ends_beneath=by != GUARDD,
            reason=reason,
            by=by,
            evidence=evidence,
        )

    def to_json(self) -> dict[str, Any] | None:
        """The `qos` object of state.json: guardd's own lock, or the guard window beneath
        another's lock (`"beneath": true`), or None."""
        own = self.own_lock or self.beneath
        if own is None:
            return None
        doc: dict[str, Any] = {
            # Where it is: a restart after qos.lock_file changed moves it (`_moved_from`).
            # (None in a replay, whose lock is kept in memory under a throwaway path.)
            "file": str(self.host.s.lock_file) if self.store is qoslock.LOCK_FILES else None,
            "beneath": own is not self.own_lock,
            "reason": own.info.reason,
            "locked_at": own.info.locked_at,
            "until": own.info.until,
            "by": own.info.by,
            "manual": own.manual,
            "hold": own.hold,
            "floor": None if own.floor is None else (own.floor.until or "unlocked"),
            # The counts, so that a restart judges the window on the probes it already saw.
            "window": self.window_json(),
        }
        return doc

    def window_json(self) -> dict[str, Any] | None:
        """guardd's own guard window under way (or the one beneath another's lock), or
        None: its `until` (RFC 3339), `left_s` (seconds left to watch; a restart goes on
        from there) and `counts()` so far."""
        own = self.own_lock or self.beneath
        if own is None or own.window is None:
            return None
        wall, now = self.host.clock.wall(), self.host.clock.monotonic()
        return {
            "until": rfc3339(wall + own.window.ends_at - now),
            "left_s": round(max(0.0, own.window.ends_at - now), 3),
            **own.window.counts(),
        }

    def change_json(self) -> dict[str, Any] | None:
        """The `qos_change` object of state.json: a change of the lock file under way."""
        return None if self.change is None else self.change.to_json()

    def restore(self, saved: object, change: object = None) -> None:
        """Take back the lock state.json's `qos` names (see `to_json`) after a restart,
        once a change of the lock file a crash cut short (`qos_change`) is finished."""
        cut_short = LockChange.from_json(change)
        if cut_short is not None:
            self._finish(cut_short)
        if not isinstance(saved, dict):
            self._adopt_unsaved()
            return
        host = self.host
        info = qoslock.LockInfo(
            True, saved.get("reason"), saved.get("locked_at"), saved.get("until"), saved.get("by")
        )
        wall, now = host.clock.wall(), host.clock.monotonic()

        def mono(stamp: object, default: float | None) -> float | None:
            # One that cannot be read keeps the lock (fail closed: a lock is never lost to
            # a garbled file).
            return _on_monotonic(stamp, wall, now, default)

        beneath = self._standing(saved, info, self.store.read(host.s.lock_file))
        if beneath is None:
            return
        manual = bool(saved.get("manual"))
        hold = bool(saved.get("hold"))
        expires_at = mono(info.until, None) if info.until else None
        floor_doc = saved.get("floor")
        floor: Floor | None = None
        if floor_doc == "unlocked":
            floor = UNLOCKED
        elif floor_doc is not None:
            at = mono(floor_doc, math.inf)
            floor = Floor(math.inf if at is None else at, str(floor_doc))
        window: QosWindow | None = None
        left: float | None = None
        if not manual and not hold:
            w = saved.get("window")
            w = w if isinstance(w, dict) else {}
            # Older state files kept only the until: the window then ends with it.
            ends: float | None = mono(w.get("until"), None) if "until" in w else expires_at
            left = _seconds(w.get("left_s"), host.s.qos_window)
            # The time guardd was down does not count: nothing watched it. The window goes
            # on with what was left to watch when state.json was last written; unless
            # guardd was back before its probes would have read as stale (a quick
            # restart): the window missed no more than a probe's lateness then.
            gap = STALE_INTERVALS * host.s.probe_interval
            if left is not None and (ends is None or now + left > ends + gap):
                ends = now + left
            else:
                left = None
            window = self._new_window(
                now, (ends if ends is not None else now + host.s.qos_window) - now
            )
            window.restore_counts(w)
        own = OwnedLock(info, window, expires_at, manual, floor, hold=hold)
        if beneath:
            self.beneath = own  # still beneath another's lock: it comes back when that goes
            return
        self.own_lock = own
        if left is None or window is None or expires_at is None or window.ends_at <= expires_at:
            return
        # The lock's until passed, or comes sooner, while the window was not watched: it
        # is moved to the window's end (and never before what it was laid over, `floor`).
        # guardd's from then on: an operator who locked until a time never asked for this.
        end = _later(Floor.of(window.ends_at, wall, now), floor)
        own.info = dataclasses.replace(info, until=end.until, by=GUARDD)
        own.expires_at = None if math.isinf(end.at) else end.at
        self._change(
            own,
            own.info,
            "qos_extended",
            source=host.active,
            reason=f"the guard window resumed after a restart, {left:g}s of it left to "
            "watch: the time guardd was not running does not count",
            until=own.info.until,
        )

    def _standing(
        self, saved: dict[str, Any], info: qoslock.LockInfo, current: qoslock.LockInfo
    ) -> bool | None:
        """At start, how the lock file (`current`) stands to the lock state.json saved
        (`info`): False, it is guardd's (put back when it was gone: /run cleared by a
        reboot, a removal while guardd was down, a new qos.lock_file); True, another's lies
        over guardd's guard window, which goes on beneath it; None, another lock stands
        instead (guardd's own taken later is adopted) and nothing of `info` is restored."""
        if not current.held:
            self._write(info)
            self._moved_from(saved.get("file"), info)
            return False
        if current == info:
            return False
        if saved.get("beneath") is True:
            return True
        if current.by == GUARDD or saved.get("manual") or saved.get("hold"):
            self._adopt_unsaved()  # a later lock of guardd's own, or someone else's
            return None
        # Someone else's lock where guardd's guard window was (written while guardd was
        # down, or already at a new qos.lock_file): the window goes on beneath it, as it
        # would have while guardd ran; dropped, deploys would open when that one goes.
        self._moved_from(saved.get("file"), info)
        return True

    def _moved_from(self, was: object, info: qoslock.LockInfo) -> None:
        """After `qos.lock_file` changed (state.json's `file` names where the lock was),
        remove guardd's lock from the old path once it stands at the new one: left there,
        it would block for good any gate still reading the old path. Anything else there
        is someone's own, left alone."""
        host = self.host
        if not isinstance(was, str) or Path(was) == host.s.lock_file:
            return
        old = Path(was)
        if self.store.read(old) != info:
            return
        try:
            self.store.remove(old)
        except (OSError, StorageError, UnsafePath) as e:
            said = f"could not remove it from {old} ({why(e)}): it blocks deploys there"
        else:
            said = f"removed from {old}"
        host.record(
            "alert",
            by=GUARDD,
            reason=f"qos.lock_file changed: guardd's lock ({info.reason}) is at "
            f"{host.s.lock_file} now, {said}",
        )

    def _adopt_unsaved(self) -> None:
        """At start: take as guardd's own a guard window's lock (`by` guardd, with an
        `until`) that state.json does not name; judged as a guard window from now, never
        released before its `until`.

        Such a lock was written while state.json could not be (a full state disk: the lock
        file lives elsewhere, in /run), and a crash came before state.json could say so.
        Left as someone else's lock, it would never end, whatever the SLOs. Its own window
        is lost with state.json: the SLOs must hold for a whole `qos.window` from now, and
        the `until` it has keeps what it was laid over (an operator's lock for two hours).
        A lock with no `until` is taken back until unlocked, and said so: guardd wrote it
        over a lock with no end (a freeze, another tool's file), or for a hold, and cannot
        tell which. Either way state.json names it from then on, so that a reboot (which
        empties /run) puts it back, and the next start does not say it again. A fleet
        node's lock file may hold the fleet's lock, written by its coordinator: that one is
        the fleet's, never adopted.
        """
        host = self.host
        current = self.store.read(host.s.lock_file)
        if self._unheld(current):
            self._adopt(
                current,
                f"the QoS lock in {host.s.lock_file} is guardd's ({current.reason}), but "
                "state.json does not name it (it could not be written when the lock was taken: "
                "a full state disk?)",
            )

    def _unheld(self, current: qoslock.LockInfo) -> bool:
        """Whether `current` (the lock file's) is a lock of guardd's (`by` guardd) that this
        guardd does not hold. A fleet node's may be the fleet's, written by its
        coordinator: never adopted."""
        return current.held and current.by == GUARDD and self.host.fleet is None

    def _adopt(self, current: qoslock.LockInfo, said: str) -> None:
        """Take `current`, a lock of guardd's it does not hold (`said`: why), as its own:
        judged as a guard window from now, never released before its `until`; one with
        no `until` stays until unlocked, and is said so."""
        host = self.host
        now, wall, span = host.clock.monotonic(), host.clock.wall(), host.s.qos_window
        ends = _on_monotonic(current.until, wall, now, None)  # (None too for no until)
        if ends is None:
            own = OwnedLock(current, self._new_window(now, span), None, False, UNLOCKED)
            self._change(own, current, "qos_locked", reason=current.reason, by=GUARDD, until=None)
            host.record(
                "alert",
                by=GUARDD,
                reason=f"{said}, and it has no end it can be judged by: it stays until "
                "`guardctl qos unlock`",
            )
            return
        floor = Floor(ends, current.until)
        end = _later(Floor.of(now + span, wall, now), floor)
        info = qoslock.LockInfo(True, current.reason, current.locked_at, end.until, GUARDD)
        own = OwnedLock(info, self._new_window(now, span), end.at, manual=False, floor=floor)
        self._change(own, info, "qos_locked", reason=info.reason, by=GUARDD, until=info.until)
        host.record(
            "alert",
            by=GUARDD,
            reason=f"{said}: judged as a guard window from now, until {info.until} at the earliest",
        )

    def _finish(self, change: LockChange) -> None:
        """Finish `change`, cut short by a crash: the lock file still as it was is changed
        now; the event is journaled (under its id) unless it was, and only if the file
        holds what the change left (not a lock someone wrote meanwhile)."""
        host = self.host
        current = self.store.read(host.s.lock_file)
        if current == change.before:
            self._write(change.after)
            current = self.store.read(host.s.lock_file)
        left = current == change.after if change.after is not None else not current.held
        event = change.event
        if event is not None and left and not host.journaled(event["id"]):
            host.record(event["event"], event_id=event["id"], **record_fields(event))

    def _new_window(self, now: float, span: float) -> QosWindow:
        s = self.host.s
        return QosWindow(
            now, span, s.qos_max_error_ratio, s.qos_min_health_ratio, s.policy.min_samples
        )


def _on_monotonic(stamp: object, wall: float, now: float, default: float | None) -> float | None:
    """An RFC 3339 `stamp` (a lock's until, read back) placed on the monotonic clock, by
    `wall` and monotonic `now` read together (a time already past: `now`); `default`
    when it is no time."""
    try:
        return now + max(0.0, parse_rfc3339(str(stamp)) - wall)
    except ValueError:
        return default


def _seconds(doc: object, most: float) -> float | None:
    """A number of seconds from state.json, from 0 to `most`; None for anything else."""
    if isinstance(doc, bool) or not isinstance(doc, int | float) or not 0 <= doc <= most:
        return None
    return float(doc)


def _later(end: Floor, floor: Floor | None) -> Floor:
    """The later of a window's `end` and a `floor` under it (the floor, as written, when
    the two are the same instant)."""
    return end if floor is None or end.at > floor.at else floor
