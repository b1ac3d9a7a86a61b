"""The guard: the core machine wired to its adapters, and the single writer of state.

Every decision and every operator command runs under one lock, so a person and the
guard never race. I/O on the decision path is limited to what the decision needs
(reading the switch target, journaling, switching); notifications, metrics and logs
are handed off and never awaited.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from guardd import qoslock
from guardd._version import __version__
from guardd.core.machine import (
    Alert,
    Decision,
    Facts,
    GuardMachine,
    Hold,
    Memory,
    Reapply,
    Rollback,
)
from guardd.core.policy import PolicySpec
from guardd.core.qos import QosWindow
from guardd.core.types import COLORS, Color, Severity, State, other
from guardd.exceptions import (
    GuarddError,
    Refused,
    StorageError,
    SwitchError,
    UnsafePath,
    VerifyFailed,
)
from guardd.faults import FaultPoints
from guardd.journal import Journal, parse_rfc3339, rfc3339
from guardd.metrics import GuardMetrics
from guardd.probes.http import HttpProber, ProbeResult
from guardd.statefile import StateFile
from guardd.switchers import Switcher

GUARDD = "guardd"

# Journal events that mean something is wrong or blocked log at `warning`, so that
# `journalctl -p warning` shows them; every other event is `info`. An event the journal
# could not take (a storage failure) logs at `error`.
_EVENT_LEVELS = {
    "alert": "warning",
    "hold": "warning",
    "rollback_failed": "warning",
    "qos_extended": "warning",
}

# Verification gets this share of `switch.timeout` of its own, so that a front door that
# never serves still leaves the undo its time.
VERIFY_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """The parts of the configuration the guard consults while running."""

    instance: str
    policy: PolicySpec
    probe_interval: float
    confirm_interval: float
    switch_timeout: float
    verify_url: str | None
    verify_successes: int
    lock_file: Path
    qos_window: float
    qos_max_error_ratio: float
    qos_min_health_ratio: float


@dataclass(slots=True)
class OwnedLock:
    """A lock file guardd wrote, with the window that will judge its release."""

    info: qoslock.LockInfo
    window: QosWindow | None  # None for an operator's lock, which only expires
    expires_at: float | None  # monotonic; None = until unlocked
    manual: bool
    # An operator's lock laid over a guard window: the lock is not released before this
    # (monotonic; math.inf = until unlocked), whatever the window says.
    floor: float | None = None


@dataclass(slots=True)
class SwitchOutcome:
    """How a switch and its verification ended, for the journal and the operator."""

    failure: BaseException | None = None
    step: str | None = None  # test | reload | verify | switch: the step that failed
    undo_problem: str | None = None  # why the previous target is not back in force
    serving: Color | None = None  # the color really served afterwards, None if unknown

    def why(self) -> str:
        """One line: what failed, and what became of the undo."""
        assert self.failure is not None  # noqa: S101 - only asked of a failure
        text = _why(self.failure)
        if self.undo_problem:
            return f"{text}; the undo failed too: {self.undo_problem}"
        return text

    def serving_text(self) -> str:
        """Which color is served, in words."""
        return f"{self.serving} is served" if self.serving else "which color is served is unknown"


@dataclass(slots=True)
class Storage:
    """Whether guardd's own files are being written."""

    errors: int = 0
    last_error: str | None = None
    failing: set[str] = dataclasses.field(default_factory=set)


class Guard:
    """One guarded service: its machine, switch target, journal, state and lock."""

    def __init__(
        self,
        settings: GuardSettings,
        *,
        machine: GuardMachine,
        switcher: Switcher,
        journal: Journal,
        state_file: StateFile,
        metrics: GuardMetrics,
        verifier: HttpProber | None,
        clock: Any,
        log: Any,
        notify: Callable[[dict[str, Any]], None] = lambda _e: None,
        faults: FaultPoints | None = None,
    ) -> None:
        self.s = settings
        self.machine = machine
        self.switcher = switcher
        self.journal = journal
        self.state_file = state_file
        self.metrics = metrics
        self.verifier = verifier
        self.clock = clock
        self.log = log
        self.notify = notify
        self.faults = faults or FaultPoints(None)
        self.lock = anyio.Lock()
        self.active: Color | None = None
        self.paused: dict[str, Any] | None = None
        self.rolling_back = False
        self.switch_started: float | None = None
        self.own_lock: OwnedLock | None = None
        self.qos_held = False
        self.storage = Storage()
        self.ticks = 0
        self.started_mono = clock.monotonic()
        self.state: State = State.STARTING
        self.last_decision: dict[str, Any] | None = None
        # The rollback budget runs on the monotonic clock, so that a step of the wall
        # clock can neither spend it nor refill it.
        self._auto_rollbacks: deque[float] = deque()
        self._budget_since = -math.inf

    # ---- journal and state ---------------------------------------------------------------

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Journal an event, hand it to the notifier, and never let a full disk stop us."""
        try:
            entry = self.journal.append(event, **fields)
        except StorageError as e:
            entry = self.journal.recent[-1]
            self._storage_failed("journal", str(e))
        else:
            self._storage_ok("journal")
        self._count_for_budget(entry, self.clock.monotonic())
        fields = {k: v for k, v in entry.items() if k not in ("event", "guard", "ts")}
        if self.journal.backlog:
            # Not on disk yet (disk full): kept in memory, and an error until written.
            self.log.error(event, journaled=False, **fields)
        else:
            getattr(self.log, _EVENT_LEVELS.get(event, "info"))(event, **fields)
        self.notify(entry)
        return entry

    def _count_for_budget(self, entry: dict[str, Any], at: float) -> None:
        """Count an automatic rollback, or an operator's `resumed`, at monotonic `at`."""
        if entry.get("event") == "rollback_completed" and entry.get("by") == GUARDD:
            self._auto_rollbacks.append(at)
        elif entry.get("event") == "resumed":
            self._budget_since = at
            self._auto_rollbacks.clear()

    def _storage_failed(self, kind: str, message: str) -> None:
        self.storage.errors += 1
        self.storage.last_error = message
        self.metrics.storage_error(kind)
        if kind not in self.storage.failing:
            # Once per episode: a full disk would otherwise log on every tick.
            self.log.error("storage_write_failed", kind=kind, error=message)
        self.storage.failing.add(kind)

    def _storage_ok(self, kind: str) -> None:
        if kind in self.storage.failing:
            self.storage.failing.discard(kind)
            self.log.info("storage_write_recovered", kind=kind)

    def save_state(self) -> None:
        """Mirror what must survive a restart into state.json."""
        doc: dict[str, Any] = {
            "guard": self.s.instance,
            "active": self.active,
            "state": self.state.value,
            "paused": self.paused,
            # hold, rolled_away_from, raised: the machine's memory (docs/contract.md §4).
            **self.machine.memory().to_json(),
            "qos": self._lock_doc(),
        }
        try:
            self.state_file.save(doc)
        except (StorageError, UnsafePath) as e:
            self._storage_failed("state", str(e))
        else:
            self._storage_ok("state")

    def _lock_doc(self) -> dict[str, Any] | None:
        own = self.own_lock
        if own is None:
            return None
        wall, now = self.clock.wall(), self.clock.monotonic()
        doc: dict[str, Any] = {
            "reason": own.info.reason,
            "locked_at": own.info.locked_at,
            "until": own.info.until,
            "by": own.info.by,
            "manual": own.manual,
            "floor": None
            if own.floor is None
            else ("unlocked" if math.isinf(own.floor) else rfc3339(wall + own.floor - now)),
            "window": None,
        }
        if own.window is not None:
            # The counts, so that a restart judges the window on the probes it already saw.
            doc["window"] = {
                "until": rfc3339(wall + own.window.ends_at - now),
                **own.window.counts(),
            }
        return doc

    # ---- start-up ----------------------------------------------------------------------

    def load_history(self) -> None:
        """Rebuild the rollback budget from the journal, so a restart does not reset it."""
        # Across a restart only the journal's wall-clock stamps tell; they are placed on
        # the monotonic clock once, here.
        # Rollbacks older than `budget_window` fall out in `_rollbacks_in_budget`.
        # The whole file, not only the recent events kept in memory: a busy hour (a guard
        # window extended again and again) must not push a rollback out of the budget.
        wall, mono = self.clock.wall(), self.clock.monotonic()
        for entry in self.journal.read():
            self._count_for_budget(entry, mono - (wall - _ts(entry)))

    def open_rollback(self) -> dict[str, Any] | None:
        """The last `rollback_started` that no completion or failure closed."""
        closed: set[str] = set()
        for entry in reversed(self.journal.recent):
            kind = entry.get("event")
            if kind in ("rollback_completed", "rollback_failed"):
                closed.add(str(entry.get("rollback_id")))
            elif kind == "rollback_started":
                return None if str(entry.get("id")) in closed else entry
        return None

    async def recover(self, saved: dict[str, Any]) -> None:
        """Repair a switch cut short by a crash, then adopt what the disk says."""
        try:
            # Bounded: a start-up must not outlast systemd's TimeoutStartSec, and a config
            # nginx rejects right now must not stop guardd from guarding.
            with anyio.fail_after(self.s.switch_timeout):
                await self.switcher.recover()
        except (SwitchError, TimeoutError) as e:
            self.record("alert", reason=f"could not repair the switch target at start: {_why(e)}")
        # The memory first: a rollback resumed below ends in its own hold or guard window.
        self.machine.restore(Memory.from_json(saved))
        pending = self.open_rollback()
        self.active = await self.switcher.read_active()
        if pending is not None:
            await self._resume_rollback(pending)
        remembered = saved.get("active")
        moved_while_down = (
            remembered in COLORS
            and self.active is not None
            and remembered != self.active
            and pending is None
        )
        if moved_while_down:
            self.record(
                "external_switch",
                source=remembered,
                target=self.active,
                by="external",
                reason="the switch target changed while guardd was not running",
            )
        if isinstance(saved.get("paused"), dict):
            self.paused = saved["paused"]
        if moved_while_down:
            # Someone moved traffic while guardd was down: an operator acted, just as with
            # a switch made while it runs (`_adopt_external_switch`).
            self.machine.clear_hold()
        self._restore_lock(saved.get("qos"))
        self.metrics.set_active(self.active)

    async def _resume_rollback(self, started: dict[str, Any]) -> None:
        target = started.get("to")
        # A journal line is data: only a real color is remembered as the one rolled away from.
        source = started.get("from") if started.get("from") in COLORS else None
        if target not in COLORS:
            return
        reason = f"interrupted by a restart; resumed: {started.get('reason')}"
        self.log.warning("rollback_resuming", rollback_id=started.get("id"), target=target)
        closing: dict[str, Any] = {
            "severity": started.get("severity"),
            "by": str(started.get("by", GUARDD)),
            "evidence": started.get("evidence"),
            "rollback_id": str(started.get("id")),
        }
        with anyio.CancelScope(shield=True):
            # The link may already name the target (the crash fell after the rename):
            # then only the verification is owed, and a failed one is undone all the same.
            outcome = await self._switch_verified(source, target, switch=self.active != target)
        if outcome.failure is not None:
            self._close_failed(source, target, reason=reason, outcome=outcome, **closing)
            return
        self.active = target
        self.machine.switched()
        self._close_completed(
            source, target, reason=reason, lock_reason=str(started.get("reason")), **closing
        )

    def _restore_lock(self, saved: object) -> None:
        if not isinstance(saved, dict):
            return
        info = qoslock.LockInfo(
            True, saved.get("reason"), saved.get("locked_at"), saved.get("until"), saved.get("by")
        )
        wall, now = self.clock.wall(), self.clock.monotonic()

        def mono(stamp: object, default: float | None) -> float | None:
            # A wall-clock stamp of state.json placed on the monotonic clock; one that cannot
            # be read keeps the lock (fail closed: a lock is never lost to a garbled file).
            try:
                return float(now + max(0.0, parse_rfc3339(str(stamp)) - wall))
            except ValueError:
                return default

        current = qoslock.read_lock(self.s.lock_file)
        if not current.held:
            # /run was cleared (a reboot) or the file was removed while guardd was down:
            # the guard window still stands, so put the lock back.
            self._write_lock(info)
        elif current != info:
            return  # someone else's lock now; it is theirs to remove
        manual = bool(saved.get("manual"))
        expires_at = mono(info.until, None) if info.until else None
        floor_doc = saved.get("floor")
        floor = (
            None
            if floor_doc is None
            else (math.inf if floor_doc == "unlocked" else mono(floor_doc, math.inf))
        )
        window: QosWindow | None = None
        if not manual:
            w = saved.get("window")
            w = w if isinstance(w, dict) else {}
            # Older state files kept only the lock's until: the window then ends with it.
            ends = mono(w.get("until"), None) if "until" in w else expires_at
            window = self._new_window(
                now, (ends if ends is not None else now + self.s.qos_window) - now
            )
            window.restore_counts(w)
        self.own_lock = OwnedLock(info, window, expires_at, manual, floor)

    def _new_window(self, now: float, span: float) -> QosWindow:
        return QosWindow(
            now,
            span,
            self.s.qos_max_error_ratio,
            self.s.qos_min_health_ratio,
            self.s.policy.min_samples,
        )

    # ---- probing -----------------------------------------------------------------------

    def observe(self, color: Color, result: ProbeResult) -> bool:
        """Feed one probe round in; true if it may change a decision (worth a tick now).

        The active color always may; the standby only when its health flips, which is
        what a hold waits for. Its other rounds wait for the periodic tick.
        """
        now = self.clock.monotonic()
        w = self.machine.windows[color]
        was_failing = w.consecutive_failures > 0
        self.machine.observe(color, now, result.outcome, result.latency_s, result.error)
        own = self.own_lock
        if own is not None and own.window is not None and color == self.active:
            own.window.add(result.outcome)
        self.metrics.observe_probe(color, result.outcome.value, result.latency_s)
        self.metrics.set_upstream(
            color,
            healthy=w.consecutive_failures == 0,
            consecutive_failures=w.consecutive_failures,
            error_ratio=w.failure_ratio,
        )
        return color == self.active or was_failing != (w.consecutive_failures > 0)

    def cadence(self, color: Color) -> float:
        """How soon to probe `color` again: fast while confirming a failure."""
        w = self.machine.windows[color]
        hold = self.machine.hold
        confirming = (color == self.active and w.consecutive_failures > 0) or (
            hold is not None
            and not hold.sticky
            and self.active is not None
            and color == self.machine.rollback_target(self.active)
        )
        return self.s.confirm_interval if confirming else self.s.probe_interval

    # ---- the decision tick -------------------------------------------------------------

    async def tick(self) -> Decision:
        """Read the world, decide, act. Callers hold `self.lock`."""
        now = self.clock.monotonic()
        self.ticks += 1
        self.metrics.decision_tick()
        await self._adopt_external_switch()
        self._qos_step(now)
        decision = self.machine.decide(
            Facts(
                now=now,
                active=self.active,
                qos_locked=self.qos_held,
                paused=self.paused is not None,
                rollbacks_in_budget=self._rollbacks_in_budget(),
                rolling_back=self.rolling_back,
                front_door_watched=self.verifier is not None,
            )
        )
        for action in decision.actions:
            await self._act(action)
        if decision.actions or decision.blocked_by:
            self.last_decision = _decision_doc(decision, self.clock.wall())
        if decision.actions:
            # Acting changed the world (a switch, a lock, a hold): restate without deciding again.
            self._publish(
                self.machine.current_state(
                    Facts(
                        now=self.clock.monotonic(),
                        active=self.active,
                        qos_locked=self.qos_held,
                        paused=self.paused is not None,
                    )
                )
            )
        else:
            self._publish(decision.state)
        self._flush_journal_backlog()
        return decision

    def _flush_journal_backlog(self) -> None:
        if self.journal.backlog:
            try:
                self.journal.flush()
            except StorageError:
                return
            self._storage_ok("journal")
            self.log.info("journal_backlog_written")

    def _publish(self, state: State) -> None:
        self.state = state
        self.metrics.set_state(self.state.value)
        self.metrics.set_active(self.active)
        self.metrics.set_qos_locked(self.qos_held)
        self.metrics.set_rollback_target_healthy(self.protection_lost() is None)
        self.save_state()

    def protection_lost(self) -> str | None:
        """Why no automatic rollback could go ahead now, or None (docs/contract.md §3)."""
        if self.active is None or any(
            w.last_probe_at is None for w in self.machine.windows.values()
        ):
            return None  # `hold` or `starting`: each is its own warning
        return self.machine.protection_lost(self.active, self.clock.monotonic())

    async def _adopt_external_switch(self) -> None:
        if self.rolling_back:
            return
        on_disk = await self.switcher.read_active()
        if on_disk != self.active and on_disk is not None:
            previous = self.active
            self.active = on_disk
            self.machine.policy.reset()
            self.machine.clear_hold()
            self.machine.switched()
            self.record(
                "external_switch",
                source=previous,
                target=on_disk,
                by="external",
                reason="the switch target was changed outside guardd; adopted",
            )

    def _rollbacks_in_budget(self) -> int:
        horizon = max(self.clock.monotonic() - self.s.policy.budget_window, self._budget_since)
        while self._auto_rollbacks and self._auto_rollbacks[0] < horizon:
            self._auto_rollbacks.popleft()
        return len(self._auto_rollbacks)

    async def _act(self, action: Rollback | Hold | Alert | Reapply) -> None:
        if isinstance(action, Rollback):
            await self.move_traffic(
                action.target,
                kind="rollback",
                by=GUARDD,
                reason=action.reason,
                severity=action.severity,
                evidence=action.evidence.to_dict(),
            )
        elif isinstance(action, Reapply):
            await self.reapply(action.color, action.reason)
        elif isinstance(action, Hold):
            self.record(
                "hold",
                source=self.active,
                target=self.machine.rollback_target(self.active) if self.active else None,
                reason=action.reason,
                severity=action.severity,
                evidence=action.evidence.to_dict() if action.evidence else None,
            )
        else:
            self.record(
                "alert",
                source=self.active,
                reason=action.reason,
                severity=action.severity,
                evidence=action.evidence.to_dict() if action.evidence else None,
            )

    # ---- moving traffic ----------------------------------------------------------------

    async def move_traffic(
        self,
        target: Color,
        *,
        kind: str,
        by: str,
        reason: str,
        severity: Severity | None = None,
        evidence: dict[str, Any] | None = None,
    ) -> None:
        """Switch to `target` as a rollback, switch or promote; raise `Refused` if it failed.

        The switch runs shielded and bounded by `switch.timeout`, so a SIGTERM arriving
        mid-switch lets it finish or be undone rather than leaving it half done.
        """
        source = self.active
        started_at = self.clock.monotonic()
        self.rolling_back = True
        self.switch_started = started_at
        self.state = State.ROLLING_BACK
        self.metrics.set_state(self.state.value)
        opened = None
        if kind == "rollback":
            opened = self.record(
                "rollback_started",
                source=source,
                target=target,
                reason=reason,
                severity=severity,
                by=by,
                evidence=evidence,
            )
            await self.faults.reach("after_rollback_started")
        with anyio.CancelScope(shield=True):
            outcome = await self._switch_verified(source, target, switch=True)
            if outcome.failure is None:
                await self.faults.reach("before_rollback_completed")
        self.rolling_back = False
        elapsed = self.clock.monotonic() - started_at
        closing: dict[str, Any] = {
            "severity": severity,
            "by": by,
            "evidence": evidence,
            "rollback_id": opened["id"] if opened else "",
        }
        if outcome.failure is not None:
            if kind == "rollback":
                self._close_failed(source, target, reason=reason, outcome=outcome, **closing)
                return
            said = (
                f"{kind} to {target} failed at {outcome.step}"
                + (" and could not be undone" if outcome.undo_problem else " and was undone")
                + f": {outcome.why()}; {outcome.serving_text()}"
            )
            self.record(
                "alert",
                source=source,
                target=target,
                by=by,
                reason=said,
                step=outcome.step,
                serving=outcome.serving,
            )
            raise Refused(said)
        self.active = target
        if source is not None:
            self.machine.traffic_moved(source, target, self.clock.monotonic())
        self.machine.switched()
        self.metrics.observe_switch(elapsed)
        self.metrics.set_active(target)
        self.machine.policy.reset()
        if kind != "rollback":
            # An operator moved traffic on purpose (perhaps with --force, past the gate):
            # judge the color by what it does from now on, not by failures from before the
            # act, which would otherwise undo it on the next tick.
            self.machine.judge_afresh(target)
        if kind == "rollback":
            self._close_completed(
                source,
                target,
                reason=reason,
                lock_reason=reason,
                duration_ms=round(elapsed * 1000, 1),
                **closing,
            )
        else:
            self.record(
                kind,
                source=source,
                target=target,
                reason=reason,
                by=by,
                duration_ms=round(elapsed * 1000, 1),
            )

    def _close_failed(
        self,
        source: Color | None,
        target: Color,
        *,
        reason: str,
        outcome: SwitchOutcome,
        severity: Severity | None,
        by: str,
        evidence: dict[str, Any] | None,
        rollback_id: str,
    ) -> None:
        """Journal a rollback that failed (and what its undo left), and hold for an operator."""
        undone = "could not be undone" if outcome.undo_problem else "undone"
        why = f"{outcome.step}: {outcome.why()}; {undone}, {outcome.serving_text()}"
        self.record(
            "rollback_failed",
            source=source,
            target=target,
            reason=f"{reason}; failed at {why}",
            severity=severity,
            by=by,
            evidence=evidence,
            rollback_id=rollback_id,
            step=outcome.step,
            serving=outcome.serving,
        )
        hold = self.machine.rollback_failed(
            f"rollback {source} -> {target} failed at {why}", None, severity
        )
        self.record("hold", source=source, target=target, reason=hold.reason, severity=severity)

    def _close_completed(
        self,
        source: Color | None,
        target: Color,
        *,
        reason: str,
        lock_reason: str,
        severity: Severity | None,
        by: str,
        evidence: dict[str, Any] | None,
        rollback_id: str,
        **extra: Any,
    ) -> None:
        """Journal a verified rollback, count it, and take the QoS lock."""
        self.record(
            "rollback_completed",
            source=source,
            target=target,
            reason=reason,
            severity=severity,
            by=by,
            evidence=evidence,
            rollback_id=rollback_id,
            **extra,
        )
        self.metrics.rollback_completed(severity or "manual")
        if source is not None:
            self.machine.rollback_succeeded(source)
        self.take_lock(f"rollback {source} -> {target}: {lock_reason}", by=by)

    async def _switch_verified(
        self, source: Color | None, target: Color, *, switch: bool
    ) -> SwitchOutcome:
        """Switch to `target` (when `switch`), verify, and undo what did not verify.

        Each part is bounded: the switch (and the switcher's own undo) by twice
        `switch.timeout`, the verification by its share of it, the undo of a switch that
        did not verify by twice `switch.timeout` again. Callers shield this.
        """
        out = SwitchOutcome()
        committed = not switch
        try:
            if switch:
                with anyio.fail_after(2 * self.s.switch_timeout):
                    await self.switcher.switch(target)
                committed = True
            await self._verify()
        except TimeoutError:
            out.failure = SwitchError(
                f"the switch did not finish within {2 * self.s.switch_timeout:g}s"
            )
            out.step = "switch"
        except (SwitchError, OSError, GuarddError) as e:
            out.failure = e
            out.step = e.step if isinstance(e, SwitchError) else "switch"
            notes = getattr(e, "__notes__", None)
            if notes:  # the switcher's own undo did not finish
                out.undo_problem = "; ".join(str(n) for n in notes)
        if out.failure is None:
            return out
        if committed:
            out.undo_problem = await self._restore(source)
        self.active = await self.switcher.read_active()
        self.machine.switched()
        out.serving = None if out.undo_problem else await self._serving()
        return out

    async def _restore(self, previous: Color | None) -> str | None:
        """Put `previous` back in force after a switch that did not verify; why not, if not."""
        if previous is None:
            return "the color before the switch is unknown, so there is nothing to put back"
        try:
            with anyio.fail_after(2 * self.s.switch_timeout):
                await self.switcher.restore(previous)
        except (SwitchError, TimeoutError, OSError, GuarddError) as e:
            step = e.step if isinstance(e, SwitchError) else "switch"
            return f"restoring {previous} failed at {step}: {_why(e)}"
        return None

    async def _serving(self) -> Color | None:
        """The color served now, as far as guardd can tell; None when it cannot.

        The switch target names a color; without a front door that is all guardd knows.
        With one, its answer must agree with that color's own last probe (both pass or
        both fail), or guardd cannot tell which color answered.
        """
        named = self.active
        if named is None or self.verifier is None:
            return named
        # Old nginx workers answer for a moment after a reload: only a streak of answers
        # that agree with the named color's own probes, within the verify budget, tells.
        streak = 0
        with anyio.move_on_after(self.s.switch_timeout * VERIFY_SHARE):
            while True:
                answer = await self.verifier.probe()
                healthy = self.machine.healthy(named, self.clock.monotonic())
                streak = streak + 1 if healthy is not None and answer.ok == healthy else 0
                if streak >= self.s.verify_successes:
                    return named
                await anyio.sleep(0.05)
        return None

    async def _verify(self) -> None:
        """Confirm the front door serves: `verify_successes` passing answers in a row.

        Raises `VerifyFailed` ("verify failed: 0/31 answers passed (3 in a row needed)
        within 5s, last: HTTP 503") when they do not come within the verify budget,
        `VERIFY_SHARE` of `switch.timeout`.
        """
        if self.verifier is None:
            return
        budget = self.s.switch_timeout * VERIFY_SHARE
        streak = answers = passed = 0
        last: ProbeResult | None = None
        with anyio.move_on_after(budget):
            while streak < self.s.verify_successes:
                last = await self.verifier.probe()
                answers += 1
                passed += last.ok
                streak = streak + 1 if last.ok else 0
                if streak < self.s.verify_successes:
                    await anyio.sleep(0.05)
        if streak >= self.s.verify_successes:
            return
        said = "no answer" if last is None else last.error or last.outcome.value
        raise VerifyFailed(
            f"verify failed: {passed}/{answers} answers passed "
            f"({self.s.verify_successes} in a row needed) within {budget:g}s, last: {said}"
        )

    def switch_limit(self) -> float:
        """The longest a switch can take, verification and undo included, in seconds."""
        # switch (and its own undo) 2x, verify its share, undo 2x, the serving check its share
        return (2 + VERIFY_SHARE + 2 + VERIFY_SHARE) * self.s.switch_timeout

    async def reapply(self, color: Color, reason: str) -> None:
        """Re-apply the switch target (test + reload) because of a front-door mismatch."""
        await self.faults.reach("before_reapply")
        # Counted as a switch in flight, so the watchdog waits for it like for a switch.
        self.rolling_back, self.switch_started = True, self.clock.monotonic()
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(2 * self.s.switch_timeout):
                await self.switcher.reapply()
        except (SwitchError, TimeoutError, OSError, GuarddError) as e:
            step = e.step if isinstance(e, SwitchError) else "switch"
            self.record(
                "alert",
                source=color,
                by=GUARDD,
                step=step,
                reapplied=False,
                reason=f"re-applying {color} failed at {step}: {_why(e)}",
            )
            return
        finally:
            self.rolling_back = False
        self.record(
            "alert",
            source=color,
            by=GUARDD,
            reapplied=True,
            reason=f"re-applied {color} (the switch target is tested and reloaded): {reason}",
        )

    def observe_front_door(self, result: ProbeResult) -> bool:
        """Feed one answer through the front door in; true if worth a tick now."""
        if self.rolling_back:
            return False  # a switch verifies the front door itself; the flux says nothing
        fd = self.machine.front_door
        before = (fd.ok, fd.streak >= self.s.policy.consecutive_failures)
        self.machine.observe_front_door(self.clock.monotonic(), result.ok, result.error)
        return before != (fd.ok, fd.streak >= self.s.policy.consecutive_failures)

    # ---- the QoS lock ------------------------------------------------------------------

    def take_lock(
        self, reason: str, *, by: str, duration: float | None = None, manual: bool = False
    ) -> qoslock.LockInfo:
        """Write guardd's lock: a guard window, or an operator's lock for `duration` seconds
        (None: until unlocked). Returns the lock as it now stands.

        A new lock never shortens one guardd holds: an operator's lock laid over a guard
        window can only extend it (the window is still judged, and extended if its SLOs
        fail), and a guard window taken under an operator's lock lasts at least as long as
        that lock. Only `release_lock` (`guardctl qos unlock`) ends a lock early.
        """
        wall = self.clock.wall()
        now = self.clock.monotonic()
        old = self.own_lock
        window: QosWindow | None
        if manual and old is not None and old.window is not None:
            # An operator's lock over a guard window: a floor under the window's end.
            asked = math.inf if duration is None else now + duration
            floor = max(asked, old.floor if old.floor is not None else -math.inf)
            if floor <= (math.inf if old.expires_at is None else old.expires_at):
                old.floor = floor
                self.save_state()
                return old.info  # the guard window already lasts longer
            end, window, manual = floor, old.window, False
        elif manual:
            # An operator replaces their own lock (or takes one): theirs to shorten.
            end, window, floor = (math.inf if duration is None else now + duration), None, None
        else:
            span = duration or self.s.qos_window
            window = self._new_window(now, span)
            current = qoslock.read_lock(self.s.lock_file)
            if current.held and (old is None or current != old.info):
                # Someone else's lock (a touched file): it had no end, so neither does ours.
                floor = math.inf
                reason = f"{reason}; a lock was already held ({current.reason}): until unlocked"
            elif old is None:
                floor = None
            elif old.window is None:  # an operator's lock: the guard window lasts at least as long
                floor = math.inf if old.expires_at is None else old.expires_at
            else:
                floor = old.floor
            end = max(now + span, floor if floor is not None else -math.inf)
        until = None if math.isinf(end) else rfc3339(wall + end - now)
        info = qoslock.LockInfo(True, reason, rfc3339(wall), until, by)
        self._write_lock(info)
        expires_at = None if math.isinf(end) else end
        self.own_lock = OwnedLock(info, window, expires_at, manual and window is None, floor)
        self.qos_held = True
        self.metrics.set_qos_locked(True)
        self.record("qos_locked", reason=reason, by=by, until=info.until)
        self.save_state()
        return info

    def _write_lock(self, info: qoslock.LockInfo) -> None:
        try:
            qoslock.write_lock(self.s.lock_file, info)
        except (OSError, StorageError, UnsafePath) as e:
            self._storage_failed("lock", f"cannot write {self.s.lock_file}: {_why(e)}")
        else:
            self._storage_ok("lock")

    def _qos_step(self, now: float) -> None:
        current = qoslock.read_lock(self.s.lock_file)
        own = self.own_lock
        if own is not None and current != own.info:
            if "lock" in self.storage.failing and not current.held:
                self._write_lock(own.info)  # the earlier write failed (disk full): try again
                current = qoslock.read_lock(self.s.lock_file)
            if current != own.info:
                # Removed or replaced by someone else: theirs now, never ours to delete.
                self.own_lock = own = None
                self.save_state()
        self.qos_held = current.held
        if own is None:
            return
        if own.window is not None and own.window.due(now):
            verdict = own.window.verdict()
            evidence = verdict.evidence(own.window.max_error_ratio, own.window.min_health_ratio)
            if verdict.met and own.floor is not None and own.floor > now:
                # The window passed, but an operator's lock laid over it still stands.
                self.log.info("guard_window_passed", reason=verdict.reason, until=own.info.until)
                own.window = None
                own.manual = True
                own.expires_at = None if math.isinf(own.floor) else own.floor
                own.floor = None
                self.save_state()
            elif verdict.met:
                self.release_lock(
                    by=GUARDD, reason=f"guard window passed: {verdict.reason}", evidence=evidence
                )
            else:
                end = now + self.s.qos_window
                if own.floor is not None:
                    end = max(end, own.floor)
                wall = self.clock.wall()
                until = None if math.isinf(end) else rfc3339(wall + end - now)
                info = dataclasses.replace(own.info, until=until)
                self._write_lock(info)
                own.info = info
                own.window.restart(now, self.s.qos_window)
                own.expires_at = None if math.isinf(end) else end
                self.record(
                    "qos_extended",
                    source=self.active,
                    reason=verdict.reason,
                    until=info.until,
                    evidence=evidence,
                )
                self.record(
                    "alert",
                    source=self.active,
                    reason=f"guard window not met, lock extended: {verdict.reason}",
                )
                self.save_state()
        elif own.window is None and own.expires_at is not None and now >= own.expires_at:
            self.release_lock(by=GUARDD, reason="operator lock expired")

    def release_lock(self, *, by: str, reason: str, evidence: dict[str, Any] | None = None) -> bool:
        """Remove the lock file (any lock, when an operator asks) and journal it."""
        try:
            removed = qoslock.remove_lock(self.s.lock_file)
        except (OSError, UnsafePath) as e:
            self._storage_failed("lock", _why(e))
            return False
        self.own_lock = None
        self.qos_held = False
        self.metrics.set_qos_locked(False)
        if removed:
            self.record("qos_released", reason=reason, by=by, evidence=evidence)
        self.save_state()
        return removed

    # ---- what guardctl sees ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The docs/contract.md §1 `status --json` object."""
        now = self.clock.monotonic()
        lock = qoslock.read_lock(self.s.lock_file)
        upstreams: dict[str, Any] = {}
        for color in COLORS:
            st = self.machine.stats(color, now)
            stale = self.machine.is_stale(color, now)
            upstreams[color] = {
                "healthy": None if stale else st.consecutive_failures == 0,
                "stale": stale,
                "consecutive_failures": st.consecutive_failures,
                "consecutive_successes": st.consecutive_successes,
                "error_ratio": _r(st.error_ratio),
                "samples": st.samples,
                "p50_ms": _r(st.p50_ms),
                "p95_ms": _r(st.p95_ms),
                "last_error": st.last_error,
                "last_probe_age_s": None
                if st.last_probe_at is None
                else round(now - st.last_probe_at, 3),
            }
        hold = self.machine.hold
        return {
            "guard": self.s.instance,
            "front_door": self._front_door_doc(now),
            "warnings": self.warnings(),
            "state": self.state.value,
            "active": self.active,
            "standby": other(self.active) if self.active else None,
            "rollback_to": self.machine.rollback_target(self.active) if self.active else None,
            "paused": self.paused is not None,
            "paused_reason": (self.paused or {}).get("reason"),
            "hold_reason": hold.reason if hold else None,
            "no_rollback_target": self.protection_lost(),
            "qos": {
                "locked": lock.held,
                "reason": lock.reason,
                "until": lock.until,
                "locked_at": lock.locked_at,
                "by": lock.by,
            },
            "upstreams": upstreams,
            "last_event": self.journal.recent[-1] if self.journal.recent else None,
            "last_decision": self.last_decision,
            "storage": {
                "ok": not self.storage.failing,
                "errors": self.storage.errors,
                "last_error": self.storage.last_error,
                "journal_backlog": self.journal.backlog,
            },
            "probe_interval_s": self.s.probe_interval,
            "uptime_s": round(now - self.started_mono, 1),
            "version": __version__,
        }

    def _front_door_doc(self, now: float) -> dict[str, Any] | None:
        """The front door as `status --json` shows it; None when it is not watched."""
        if self.verifier is None:
            return None
        fd = self.machine.front_door
        stale = fd.last_at is None or now - fd.last_at > 3 * self.s.probe_interval
        return {
            "healthy": None if stale else fd.ok,
            "stale": stale,
            "streak": fd.streak,
            "last_error": fd.last_error,
            "last_probe_age_s": None if fd.last_at is None else round(now - fd.last_at, 3),
        }

    def warnings(self) -> list[str]:
        """What an operator should look at although nothing is failing outright."""
        mismatch = self.machine.mismatch
        return [] if mismatch is None else [f"mismatch: {mismatch}"]

    def status_line(self) -> str:
        """The one-line STATUS= summary for systemd."""
        now = self.clock.monotonic()
        parts = [f"active={self.active or 'unknown'}", f"state={self.state.value}"]
        for color in COLORS:
            w = self.machine.windows[color]
            if self.machine.is_stale(color, now):
                parts.append(f"{color}=stale")
            elif w.consecutive_failures:
                parts.append(
                    f"{color}=down({w.consecutive_failures}/{self.s.policy.consecutive_failures})"
                )
            else:
                parts.append(f"{color}=up")
        parts.append("qos=locked" if self.qos_held else "qos=free")
        if self.protection_lost() is not None:
            parts.append("no-rollback-target")
        if self.paused is not None:
            parts.append("paused")
        if self.storage.failing:
            parts.append("storage=failing(" + ",".join(sorted(self.storage.failing)) + ")")
        if self.machine.mismatch is not None:
            parts.append("front_door=mismatch")
        return " ".join(parts)


def _ts(entry: dict[str, Any]) -> float:
    try:
        return parse_rfc3339(str(entry.get("ts")))
    except ValueError:
        return 0.0


def _r(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(v, 4)


_TELLING = ("[emerg]", "[alert]", "[crit]", "[error]", "failed", "error", "rejected")


def _why(e: BaseException) -> str:
    """The lines of an error an operator needs: nginx's [emerg] line, not its banner."""
    if isinstance(e, TimeoutError):
        return "timed out"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    telling = [line for line in lines[1:] if any(word in line.lower() for word in _TELLING)]
    return "; ".join([lines[0], *telling])[:400]


def _decision_doc(decision: Decision, wall: float) -> dict[str, Any]:
    verdict = decision.verdict
    action = "none"
    for a in decision.actions:
        action = {Rollback: "rollback", Hold: "hold", Alert: "alert", Reapply: "reapply"}[type(a)]
    if decision.blocked_by and action == "none":
        action = f"blocked:{decision.blocked_by}"
    return {
        "ts": rfc3339(wall),
        "action": action,
        "severity": verdict.severity if verdict else None,
        "reason": verdict.reason if verdict else None,
        "evidence": verdict.evidence.to_dict() if verdict else None,
    }
