"""The guard: the core machine wired to its adapters, and the single writer of state.

Every decision and every operator command runs under one lock, so a person and the
guard never race. I/O on the decision path is limited to what the decision needs
(reading the switch target, journaling, switching); notifications, metrics and logs
are handed off and never awaited.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from guardd import onsets, qoslock, recovery, statusview
from guardd.budget import RollbackBudget
from guardd.core.machine import (
    Alert,
    Decision,
    Facts,
    GuardMachine,
    Hold,
    Reapply,
    Rollback,
)
from guardd.core.policy import PolicySpec
from guardd.core.signals import Reading
from guardd.core.types import COLORS, GUARDD, Color, Outcome, Severity, State
from guardd.exceptions import (
    GuarddError,
    OperationRefused,
    StorageError,
    SwitchError,
    SwitchRefused,
    UnsafePath,
    VerifyFailed,
)
from guardd.exceptions import why as _why
from guardd.faults import FaultPoints
from guardd.journal import Journal, named_record, record_fields
from guardd.metrics import GuardMetrics
from guardd.probes.http import HttpProber, ProbeResult
from guardd.qoskeeper import OwnedLock, QosKeeper
from guardd.signals import Signal, TrafficView, is_access_log
from guardd.statefile import StateFile
from guardd.switchers import Switcher

if TYPE_CHECKING:
    from guardd.fleet.coordinator import Fleet

__all__ = ["GUARDD", "VERIFY_SHARE", "Guard", "GuardSettings", "Storage", "SwitchOutcome"]

# Journal events that mean something is wrong or blocked log at `warning`, so that
# `journalctl -p warning` shows them; every other event is `info`. An event the journal
# could not take (a storage failure) logs at `error`.
# Lines in a row, none usable, before a signal is said to read nothing of use.
_UNUSABLE_LINES = 20
# Said in the reason of a rollback a fleet node decided alone (etcd unreachable and
# `fleet.local_fallback`); its journal entries also carry `"local_fallback": true`.
_ALONE = "; decided alone: etcd is unreachable (fleet.local_fallback)"

_EVENT_LEVELS = {
    "alert": "warning",
    "hold": "warning",
    "rollback_failed": "warning",
    "qos_extended": "warning",
}

# Verification gets this share of `switch.timeout` of its own, so that a front door that
# never serves still leaves the undo its time.
VERIFY_SHARE = 0.5
# A front-door answer slower than this, within a verification, is asked again beside it
# (a hedged request): right after a reload an old nginx worker may still take a
# connection and proxy it to the color just left, which may hang for all of
# `probe.timeout`, while the next connection reaches a new worker. At most one more
# answer than the streak needs is awaited at once.
HEDGE_AFTER_S = 0.25
# The pause between two answers of a streak.
_STREAK_PACE_S = 0.05
_PENDING = object()  # an answer asked and not in yet


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
    #: `switch.verify_header`: the front door's header naming the color that answered.
    verify_header: str | None = None


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

    @property
    def untouched(self) -> bool:
        """Whether the switch was refused before it changed anything (`SwitchRefused`)."""
        return isinstance(self.failure, SwitchRefused)

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
        #: Why this process may not change the switch target now, or None: it holds the
        #: target's lock (`Supervisor.keep_switch_lock`). Asked through `may_switch`.
        self.switch_refused: Callable[[], str | None] = lambda: None
        #: Its answer when last asked: shown in status (`protection_lost`) while it stands.
        self.cannot_switch: str | None = None
        self.lock = anyio.Lock()
        self.active: Color | None = None
        self.paused: dict[str, Any] | None = None
        # What the last reload left for an operator (`status` warnings): why it was
        # rejected, and the keys changed in the file that wait for the next start.
        self.reload_rejected: str | None = None
        self.restart_pending: list[str] = []
        self.rolling_back = False
        self.switch_started: float | None = None
        self.qos = QosKeeper(self)
        # Journal records a step owes (`owe`), named in state.json before they are written.
        self.owed: list[dict[str, Any]] = []
        self.storage = Storage()
        self.ticks = 0
        self.started_mono = clock.monotonic()
        self.state: State = State.STARTING
        self.last_decision: dict[str, Any] | None = None
        self.budget = RollbackBudget()
        # Ticks in a row that read a switch target naming neither color (`_adopt_external_switch`).
        self._unnamed_reads = 0
        # Why the switch target could not be read at the last look; None once it was.
        self.target_unreadable: str | None = None
        #: An operator's switch or promote under way, as it will be journaled (`move_traffic`).
        self.moving: dict[str, Any] | None = None
        self._onsets = onsets.OnsetStamps()
        #: The fleet this node belongs to (`[fleet]`), or None: this node decides alone.
        self.fleet: Fleet | None = None
        # The signals besides the probe, by name (set by the runtime), their readings at
        # the last tick.
        self.signals: dict[str, Signal] = {}
        self.readings: dict[str, dict[Color, Reading]] = {}
        #: Other guards whose lines the journal in state.dir holds (a shared state.dir).
        self.foreign_journal: list[str] = []
        #: Why each signal gives nothing at the last tick (None: it reads fine).
        self.signal_problems: dict[str, str | None] = {}
        #: Status' `recording` object (`guardd.observations`), set by the daemon.
        self.recording: Callable[[], dict[str, Any]] | None = None
        # Each access-log signal's request totals of a color at the last tick (by the
        # adapter's id): what arrived since is counted in the guard window.
        self._traffic_seen: dict[tuple[int, Color], tuple[int, int]] = {}
        # Each signal's line counts at the last tick, and why its lines were unusable.
        self._lines_seen: dict[str, dict[str, int]] = {}
        self._unusable_streak: dict[str, dict[str, int]] = {}
        metrics.watch_traffic(self._traffic_sources)

    # ---- journal and state ---------------------------------------------------------------

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Journal an event, hand it to the notifier, and never let a full disk stop us."""
        if self.owed:
            self.settle()  # a record never overtakes one owed before it (`owe`)
        try:
            entry = self.journal.append(event, **fields)
        except StorageError as e:
            entry = self.journal.recent[-1]
            self.storage_failed("journal", str(e))
        else:
            self.storage_ok("journal")
        self.budget.count(entry, self.clock.monotonic())
        fields = {k: v for k, v in entry.items() if k not in ("event", "guard", "ts")}
        if self.journal.backlog:
            # Not on disk yet (disk full): kept in memory, and an error until written.
            self.log.error(event, journaled=False, **fields)
        else:
            getattr(self.log, _EVENT_LEVELS.get(event, "info"))(event, **fields)
        self.notify(entry)
        return entry

    def storage_failed(self, kind: str, message: str) -> None:
        """Account for a failed write of guardd's own `kind` of file; logged once an episode."""
        self.storage.errors += 1
        self.storage.last_error = message
        self.metrics.storage_error(kind)
        if kind not in self.storage.failing:
            # Once per episode: a full disk would otherwise log on every tick.
            self.log.error("storage_write_failed", kind=kind, error=message)
        self.storage.failing.add(kind)

    def storage_ok(self, kind: str) -> None:
        """Account for a write of `kind` that went through."""
        if kind in self.storage.failing:
            self.storage.failing.discard(kind)
            self.log.info("storage_write_recovered", kind=kind)

    def owe(self, event: str, **fields: Any) -> None:
        """Name a journal record that state.json's memory goes with (a rollback's close,
        a hold, an alert raised, a pause), to be written once state.json holds both: by
        `pay`, from `settle` or a change of the lock file, or at the next start if a crash
        came first. Written before its state, a record would say what a restart then forgot
        (no hold, no guard window, a failed rollback tried again, a page sent twice)."""
        self.owed.append(named_record(event, fields))

    def pay(self) -> None:
        """Journal what is owed (`owe`), in order, under the ids named: call only once
        state.json names it."""
        owed, self.owed = self.owed, []
        for record in owed:
            self.record(record["event"], event_id=record["id"], **record_fields(record))

    def settle(self) -> None:
        """Save state.json; what is owed (`owe`) is named in it, then journaled, then
        state.json is saved again without it."""
        self.save_state()
        if self.owed:
            self.pay()
            self.save_state()

    def journaled(self, event_id: str) -> bool:
        """For the keeper: whether the journal's recent events hold the one with this `id`."""
        return any(e.get("id") == event_id for e in reversed(self.journal.recent))

    def holds_why(self) -> str | None:
        """For the keeper: the reason of a hold's lock while guardd holds, else None."""
        hold = self.machine.hold
        return _holds(hold) if hold is not None else None

    def lock_to_keep(self) -> qoslock.LockInfo | None:
        """For the keeper: on a fleet node, the copy of the fleet's lock that replaces this
        node's own lock when it ends, while another node's lock holds; else None."""
        return self.fleet.copy_to_keep() if self.fleet is not None else None

    def lock_must_stay(self) -> str | None:
        """For the keeper: on a fleet node, why the guard window must not end though its
        SLOs held (a node not yet serving the fleet's desired color); else None."""
        return self.fleet.lock_must_stay() if self.fleet is not None else None

    def lock_stay_ends(self) -> float | None:
        """For the keeper: when what `lock_must_stay` waits for ends (wall seconds), if
        that is known (other fleet nodes' guard windows, each saying its end); else None."""
        return self.fleet.lock_stay_ends() if self.fleet is not None else None

    def guard_window_passed(self) -> None:
        """For the keeper: the last rollback's guard window passed (`GuardMachine.
        guard_window_passed`): the color rolled away from is a rollback target again, also
        while an operator's lock blocks deploys (it never blocks a rollback)."""
        self.machine.guard_window_passed()

    def save_state(self) -> None:
        """Mirror what must survive a restart into state.json."""
        try:
            self.state_file.save_from(self.state_doc)
        except (StorageError, UnsafePath) as e:
            self.storage_failed("state", str(e))
        else:
            self.storage_ok("state")

    def state_doc(self) -> dict[str, Any]:
        """The state.json document (docs/contract.md §4) as things stand."""
        return {
            "guard": self.s.instance,
            "active": self.active,
            "state": self.state.value,
            "paused": self.paused,
            # hold, rolled_away_from, raised: the machine's memory (docs/contract.md §4).
            **self.machine.memory().to_json(),
            "qos": self.qos.to_json(),
            "qos_change": self.qos.change_json(),
            "journal_owed": list(self.owed),  # (a copy: the saved doc is compared later)
            "moving": self.moving,
            "onsets": self._onsets.doc(
                self.machine.policy.table, self.clock.monotonic(), self.clock.wall()
            ),
        }

    def carry_onsets(self, saved: object) -> None:
        """Take up the `for` onsets state.json kept (`guardd.onsets`), at start-up."""
        table = self.machine.policy.table
        found = onsets.carried(saved, table, self.clock.monotonic(), self.clock.wall())
        if found:
            table.carry(found)
            self.log.info("onsets_carried", rules=sorted(f"{r}@{c}" for r, c in found))

    # ---- start-up ----------------------------------------------------------------------

    def load_history(self) -> None:
        """Rebuild the rollback budget from the journal (`recovery.load_history`)."""
        recovery.load_history(self)

    async def recover(self, saved: dict[str, Any]) -> None:
        """Repair a switch cut short by a crash, then adopt what the disk says
        (`recovery.recover`)."""
        await recovery.recover(self, saved)

    # ---- operator's and reload's changes (callers hold `self.lock`) --------------------

    def pause(self, reason: str | None, *, by: str) -> bool:
        """Stop automatic rollbacks until `resume`; false if already paused (a no-op)."""
        if self.paused is not None:
            return False
        self.paused = {"reason": reason, "by": by}
        self.owe("paused", reason=reason or "paused by an operator", by=by)
        self.settle()
        return True

    def resume(self, reason: str | None, *, by: str) -> bool:
        """End a pause and a hold, and refill the rollback budget; true if either was on."""
        was = self.paused is not None or self.machine.hold is not None
        self.paused = None
        self.machine.clear_hold()
        self.owe("resumed", reason=reason or "resumed by an operator", by=by)
        self.settle()
        return was

    def fleet_resumed(self, *, by: str, reason: str) -> None:
        """Another fleet node's operator resumed the fleet: end the hold and refill the
        rollback budget (the journal's `resumed` does), leaving this node's pause as it is."""
        self.machine.clear_hold()
        self.owe(
            "resumed",
            # The fleet's budget and holds are resumed; this node's pause is its own.
            reason=reason + ("; this node stays paused" if self.paused is not None else ""),
            by=by,
        )
        self.settle()

    def reconfigure(
        self,
        settings: GuardSettings,
        *,
        switcher: Switcher,
        verifier: HttpProber | None,
        probe_identity: dict[Color, str],
        keep: frozenset[Color],
        signals: dict[str, Signal] | None = None,
    ) -> None:
        """Apply a reloaded config; the probe windows of colors not in `keep` start afresh."""
        self.s = settings
        self.switcher = switcher
        self.verifier = verifier
        if signals is not None:
            self.signals = signals
        self.machine.reconfigure(settings.policy, settings.probe_interval, keep)
        self.machine.probe_identity = probe_identity

    # ---- probing -----------------------------------------------------------------------

    def observe(self, color: Color, result: ProbeResult) -> bool:
        """Feed one probe round in; true if it may change a decision (worth a tick now).

        The active color always may; the standby only when its health flips, which is
        what a hold waits for. Its other rounds wait for the periodic tick.
        """
        machine = self.machine
        w = machine.windows[color]
        was_failing = w.consecutive_failures > 0
        machine.observe(
            color, self.clock.monotonic(), result.outcome, result.latency_s, result.error
        )
        active = color == self.active
        if active:
            self.qos.observe(result.outcome)
        self.metrics.probe_round(color, result, w)
        return active or was_failing != (w.consecutive_failures > 0)

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
        self.qos.step(now)
        self._read_signals(now)
        decision = self.machine.decide(
            # Positional, in the fields' order (now, active, qos_locked, paused,
            # rollbacks_in_budget, rolling_back, front_door_watched, readings,
            # target_unreadable): cheaper than keywords, once a tick.
            Facts(
                now,
                self.active,
                self.qos_held,
                self.paused is not None,
                self._rollbacks_in_budget(),
                self.rolling_back,
                self.verifier is not None,
                self.readings,
                self.target_unreadable,
            )
        )
        # Stamped as decided: acting (a switch and its verification) may take seconds, and
        # the decision comes before the events it leads to.
        decided_at = self.clock.wall()
        verdict = decision.verdict
        self.qos.rules_firing(
            self.active,
            frozenset(
                st.rule
                for st in (verdict.states if verdict is not None else ())
                if st.state == "firing" and not st.dry_run
            ),
        )
        if self.signals and self.active is not None and (self.qos.own_lock or self.qos.beneath):
            # A guard window is judged on what every signal could tell: one that gave
            # nothing, or went stale, leaves the users' side of the SLOs unknown.
            active = self.active
            quiet = {
                name: (getattr(self.readings.get(name, {}).get(active), "last_at", None), limit)
                for name, limit in self.machine.policy.table.stale_after.items()
            }
            gave_nothing = {name for name, problem in self.signal_problems.items() if problem}
            self.qos.signals_blind(gave_nothing, quiet, now)
        self.metrics.set_verdicts(self.machine.verdicts)
        # The decision's pages (holds, alerts; `decide` puts them before its moves) are
        # journaled before it acts, and after state.json remembers them (the machine's hold,
        # the alerts raised): a crash must lose no page, nor send one twice. A hold's lock
        # is on disk before its `hold` (`_standstill_lock` pays it, then `qos_locked`). A
        # move takes its own lock (a guard window, a failed rollback's hold).
        moves: list[Rollback | Reapply] = []
        for action in decision.actions:
            if isinstance(action, (Hold, Alert)):
                self.owed.append(self._page(action))
            else:
                moves.append(action)
        relocked = self._standstill_lock(decision)
        if self.owed:
            self.settle()
        if moves:
            # Shown while it is carried out (a switch and its verification take seconds):
            # `status` during a rollback says what it comes of.
            self.last_decision = statusview.decision_doc(decision, decided_at)
        for move in moves:
            await self._act(move)
        if decision.actions or decision.blocked_by:
            # A rollback this tick decided and the fleet did not take (`decide_rollback`
            # said why, this tick): the leader decides, etcd is unreachable...
            rolled = any(isinstance(a, Rollback) for a in decision.actions)
            not_taken = self.fleet.held_back if rolled and self.fleet is not None else None
            self.last_decision = statusview.decision_doc(decision, decided_at, not_taken)
        if decision.actions or relocked:
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

    def _standstill_lock(self, decision: Decision) -> bool:
        """While guardd will not act on a failing color (it holds, or it is paused or in
        dry run while the active color fails P0/P1), deploys wait too (`QosKeeper.hold`).
        The lock ends once the active color no longer fails and guardd no longer holds, or a
        rollback's guard window takes its place (so a `resume` that leads to a rollback
        leaves no moment unlocked). True if the lock changed."""
        hold, own, verdict = self.machine.hold, self.qos.own_lock, decision.verdict
        failing = verdict is not None and verdict.failing
        # Not over while a P0/P1 rule's condition still holds, its `for` not yet run out.
        fails = verdict is not None and verdict.failing_or_pending
        why = None
        if hold is not None:
            why = _holds(hold)
        elif (
            (standing := _STANDING_BY.get(decision.blocked_by or ""))
            and verdict is not None
            and failing
        ):
            why = f"{standing} while {self.active} fails: {verdict.reason}"
        if why is not None and own is None:
            self.qos.hold(why)
        elif (
            why is not None
            and own is not None
            and own.hold
            and _standstill_cause(why) != _standstill_cause(own.info.reason or "")
        ):
            # The standstill goes on for another cause (a pause ended in a hold, a hold
            # whose reason changed): the lock says the cause it stands for now.
            self.qos.rehold(why)
        elif why is None and not fails and own is not None and own.hold and self._vouched():
            self.qos.end_hold(
                "guardd no longer holds"
                if (own.info.reason or "").startswith("guardd holds")
                else f"{self.active} no longer fails"
            )
        else:
            return False
        return self.qos.own_lock is not own

    def _vouched(self) -> bool:
        """Whether the active color's probes vouch for it (`GuardMachine.vouched`).
        Started again, guardd's windows are empty: no failure seen yet is no evidence that
        a hold is over, so its lock stays until the probes say so (a restart changes no
        decision)."""
        active = self.active
        return active is not None and self.machine.vouched(active, self.clock.monotonic())

    def repeat_key(self, on_disk: Color | None) -> tuple[object, ...] | None:
        """What a decision tick now reads, when it reads nothing more: the machine's
        (`GuardMachine.repeat_key`), the color the switch target names (`on_disk`, as
        `Switcher.read_active` gives it) and the QoS lock's (`QosKeeper.repeat_key`). None
        when a tick may read more than a key holds (signals besides the probe, a fleet, a
        switch under way, a journal backlog to write).

        A tick that took no action, then one whose key equals the key taken just after it,
        decides the same and changes nothing: `guardd replay` counts that one
        (`repeat_tick`) rather than taking it. The daemon itself takes every tick.

        The key's first item is `moving_key()`: with nothing but `observe` and time passing
        between two keys, the rest of them is equal, so that item alone tells whether they
        are (`guardd replay` compares just that while it only feeds probe rounds in).
        """
        if self.signals or self.fleet is not None or self.rolling_back or self.journal.backlog:
            return None
        now = self.clock.monotonic()
        qos = self.qos
        machine = self.machine.repeat_key(
            now, self.active, qos.held, self.paused is not None, self.verifier is not None
        )
        if machine is None:
            return None
        qos_moving, qos_rest = qos.repeat_key(now)
        return (machine[0], qos_moving), machine[1], on_disk, qos_rest

    def moving_key(self) -> tuple[object, ...]:
        """The first item of `repeat_key`, as things stand now (that key must have been
        one: an active color, both colors probed)."""
        active = self.active
        assert active is not None  # noqa: S101 - a key was taken, so there is one
        now = self.clock.monotonic()
        return (
            self.machine.moving_key(now, active, self.verifier is not None),
            self.qos.moving_key(now),
        )

    def repeat_tick(self) -> None:
        """Count a decision tick that `repeat_key` shows would decide nothing new and
        change nothing, without taking it."""
        self.ticks += 1
        self.metrics.decision_tick()

    def _read_signals(self, now: float) -> None:
        """Take every signal's reading of each color for this tick, and say once per
        episode when a signal cannot read its source (an unreadable log, ...)."""
        readings: dict[str, dict[Color, Reading]] = {}
        problems: dict[str, str | None] = {}
        for name, signal in self.signals.items():
            unusable = self._unusable(name, signal)
            problem = signal.problem or unusable
            blind = unusable is not None or (
                signal.problem is not None and getattr(signal, "blind_on_problem", True)
            )
            by_color: dict[Color, Reading] = {}
            for color in COLORS:
                reading = signal.reading(color, now)
                if reading is not None and blind:
                    # A signal that cannot read its source gives nothing: no sample, no
                    # value, so its rules are inconclusive, never fired on what it could
                    # not see; its last good reading still dates it (`stale_after`).
                    reading = Reading(
                        0, reading.window_s, dict.fromkeys(reading.stats), reading.last_at
                    )
                if reading is not None:
                    by_color[color] = reading
            readings[name] = by_color
            problems[name] = problem
            if problem is not None and self.signal_problems.get(name) is None:
                # A new episode: said once, until the signal reads again.
                self.record(
                    "alert",
                    source=self.active,
                    reason=f"signal {name} gives nothing: {problem}; "
                    "its rules are inconclusive until it reads again",
                )
        self.readings = readings
        self.signal_problems = problems
        self._count_traffic()

    def _unusable(self, name: str, signal: Signal) -> str | None:
        """Why the lines a signal reads are of no use: `_UNUSABLE_LINES` or more in a row
        of which none could be counted (a log_format or addresses that do not fit)."""
        lines = getattr(signal, "lines", None)
        if not isinstance(lines, dict) or "ok" not in lines:
            # Only a signal whose lines end in `ok` when counted (access_log) can read
            # nothing of use; an unmatched line of a log_match signal is a count of 0.
            return None
        counts = dict(lines)
        before = self._lines_seen.get(name, counts)
        self._lines_seen[name] = counts
        new = {k: counts.get(k, 0) - before.get(k, 0) for k in counts}
        streak = self._unusable_streak.get(name, {})
        if new.get("ok", 0) > 0:
            self._unusable_streak[name] = {}
            return None
        streak = {k: streak.get(k, 0) + v for k, v in new.items() if v > 0 or k in streak}
        self._unusable_streak[name] = streak
        if sum(streak.values()) < _UNUSABLE_LINES:
            return None
        return (
            f"none of the last {sum(streak.values())} lines was usable ("
            + ", ".join(f"{k} {v}" for k, v in sorted(streak.items()) if v)
            + "): check nginx's log_format and the colors' addresses"
        )

    def _count_traffic(self) -> None:
        """Hand the guard window the real requests of the active color since the last tick."""
        active = self.active
        seen: dict[tuple[int, Color], tuple[int, int]] = {}
        for signal in self.signals.values():
            if not is_access_log(signal) or active is None:
                continue
            key = (id(signal), active)
            counts = signal.requests
            total = sum(n for (color, _cls), n in counts.items() if color == active)
            errors = counts.get((active, "5xx"), 0)
            before = self._traffic_seen.get(key)
            if before is not None:
                self.qos.add_traffic(total - before[0], errors - before[1])
            seen[key] = (total, errors)
        self._traffic_seen = seen

    def _traffic_sources(self) -> list[TrafficView]:
        # Read by the metrics thread: counters are the signals' totals, ratios the ones
        # the last tick took (a window is never walked from another thread).
        return [
            TrafficView(signal, self.readings.get(name, {}))
            for name, signal in list(self.signals.items())
            if is_access_log(signal)
        ]

    def _flush_journal_backlog(self) -> None:
        if self.journal.backlog:
            try:
                self.journal.flush()
            except StorageError:
                return
            self.storage_ok("journal")
            self.log.info("journal_backlog_written")

    def _publish(self, state: State) -> None:
        self.state = state
        self.metrics.set_state(self.state.value)
        self.metrics.set_active(self.active)
        unknown = self.fleet is not None and self.fleet.qos_unknown_why() is not None
        # A fleet node that cannot read the fleet's lock shows it as unknown, never as free.
        self.metrics.set_qos_locked(None if unknown else self.qos_held)
        self.metrics.set_rollback_target_healthy(self.rollback_target_ready())
        now = self.clock.monotonic()
        for color in COLORS:
            if self.machine.is_stale(color, now):
                # Set at each probe round; a probe that never comes back sets nothing, and
                # the last round's "healthy" must not stand for a color no longer vouched for.
                w = self.machine.windows[color]
                self.metrics.set_upstream(
                    color,
                    healthy=False,
                    consecutive_failures=w.consecutive_failures,
                    error_ratio=w.failure_ratio,
                )
        self.settle()

    def rollback_target_ready(self) -> bool:
        """Whether an automatic rollback would find a target fit to take the traffic now
        (`guardd_rollback_target_healthy`): a color is active, so the other is the target,
        both colors have been probed, and nothing makes the target unfit. Never true for a
        target guardd cannot tell about (none, or not probed yet)."""
        return (
            self.active is not None
            and all(w.last_probe_at is not None for w in self.machine.windows.values())
            and self.protection_lost() is None
        )

    def protection_lost(self) -> str | None:
        """Why no automatic rollback could go ahead now, or None (docs/contract.md §3)."""
        if self.cannot_switch is not None:
            return self.cannot_switch
        if self.active is None or any(
            w.last_probe_at is None for w in self.machine.windows.values()
        ):
            return None  # `hold` or `starting`: each is its own warning
        return self.machine.protection_lost(self.active, self.clock.monotonic())

    async def read_target(self) -> Color | None:
        """The color the switch target names now; None when it names none, and then
        `target_unreadable` says why when it could not be read at all.

        What the host did to the target (a symlink put in place of the state file, a file
        made unreadable) is a target that names no color, never an error that ends the
        tick: guardd then holds, as for a target named neither color.
        """
        try:
            color = await self.switcher.read_active()
        except (OSError, GuarddError) as e:
            self.target_unreadable = str(e)
            return None
        self.target_unreadable = None
        return color

    def record_target_lost(self, left: Color, changed: str) -> None:
        """Journal that the switch target, which named `left`, names no color now
        (`external_switch` to null), saying why when it cannot be read; `changed` says when
        (`was changed outside guardd`, `changed while guardd was not running`)."""
        unreadable = self.target_unreadable
        self.record(
            "external_switch",
            source=left,
            target=None,
            by="external",
            reason=f"the switch target {changed} and names neither blue nor green; guardd "
            "holds until it names one"
            if unreadable is None
            else f"the switch target cannot be read ({unreadable}); guardd holds until it "
            "names blue or green",
        )

    async def _adopt_external_switch(self) -> None:
        if self.rolling_back:
            return
        on_disk = await self.read_target()
        if on_disk is None and self.active is not None:
            # It names neither color now: a hand pointed it at another file (a hotfix
            # copy) or removed it. guardd no longer knows what users are served, so it
            # holds until the target names a color again, as at a start that finds it so.
            # Seen twice in a row: not a hand's `ln -sfn` read between unlink and symlink.
            self._unnamed_reads += 1
            if self._unnamed_reads < 2:
                return
            left, self.active = self.active, None
            self.record_target_lost(left, "was changed outside guardd")
            return
        self._unnamed_reads = 0
        if on_disk != self.active and on_disk is not None:
            previous = self.active
            self.active = on_disk
            self.machine.policy.reset(on_disk)
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
        spent = self.budget.spent(self.clock.monotonic(), self.s.policy.budget_window)
        if self.fleet is not None:
            # The budget is the fleet's: its rollbacks count wherever they were decided.
            since = max(self.clock.wall() - self.s.policy.budget_window, self.fleet.rearmed_at)
            spent = max(spent, sum(1 for t in self.fleet.budget_rollbacks if t >= since))
        return spent

    async def _act(self, action: Rollback | Reapply) -> None:
        if isinstance(action, Rollback):
            generation = None
            if self.fleet is not None:
                # In a fleet only its leader rolls back, as a generation every node applies.
                generation = await self.fleet.decide_rollback(
                    action.target, action.reason, action.severity
                )
                if generation is None:
                    return  # (`held_back` says why: `last_decision.not_taken`)
            # A rollback that fails is journaled, held and locked by `move_traffic`; its
            # `OperationRefused` is for an operator's command, and the tick goes on.
            with contextlib.suppress(OperationRefused):
                await self.move_traffic(
                    action.target,
                    kind="rollback",
                    by=GUARDD,
                    reason=action.reason + (_ALONE if generation == 0 else ""),
                    severity=action.severity,
                    evidence=action.evidence.to_dict(),
                    generation=generation or None,
                    local_fallback=generation == 0,
                )
            if generation and self.fleet is not None and self.active == action.target:
                self.fleet.applied_generation(generation)
        else:
            await self.reapply(action.color, action.reason)

    def _page(self, action: Hold | Alert) -> dict[str, Any]:
        """The journal record (`named_record`) of a decision's hold or alert."""
        if isinstance(action, Hold):
            # `to`: where a rollback would go; none when the failing color is itself the
            # rollback target (never `blue->blue`) or the color served is unknown.
            target = self.machine.rollback_target(self.active) if self.active else None
            return named_record(
                "hold",
                {
                    "source": self.active,
                    "target": None if target == self.active else target,
                    "reason": action.reason,
                    "severity": action.severity,
                    "evidence": action.evidence.to_dict() if action.evidence else None,
                },
            )
        return named_record(
            "alert",
            {
                "source": self.active,
                "reason": action.reason,
                "severity": action.severity,
                "evidence": action.evidence.to_dict() if action.evidence else None,
            },
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
        generation: int | None = None,
        fleet_node: str | None = None,
        local_fallback: bool = False,
    ) -> None:
        """Switch to `target` as a rollback, switch or promote; `OperationRefused` if it failed.

        `generation`: the fleet's generation this applies (journaled with it), if any;
        `fleet_node`: the node that decision was written on (journaled as `fleet_node`).
        `local_fallback`: a fleet node decided alone, etcd unreachable (journaled as
        `"local_fallback": true`).

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
        fleet: dict[str, Any] = {} if generation is None else {"generation": generation}
        if fleet_node is not None:
            fleet["fleet_node"] = fleet_node
        if local_fallback:
            fleet["local_fallback"] = True
        moved = self._begin_move(kind, source=source, target=target, reason=reason, by=by, **fleet)
        if kind == "rollback":
            opened = self.record(
                "rollback_started",
                **fleet,
                source=source,
                target=target,
                reason=reason,
                severity=severity,
                by=by,
                evidence=evidence,
            )
            await self.faults.reach("after_rollback_started")
        with anyio.CancelScope(shield=True):
            outcome = await self.switch_verified(source, target, switch=True)
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
                why = self.close_failed(
                    source, target, reason=reason, outcome=outcome, **closing, **fleet
                )
                # Journaled, held and locked: the caller learns it failed, as for a switch.
                raise OperationRefused(
                    f"rollback to {target} failed at {why}; guardd holds until an operator acts"
                )
            said = (
                f"{kind} to {target} failed at {outcome.step}"
                + (
                    " (nothing was changed)"
                    if outcome.untouched
                    else " and could not be undone"
                    if outcome.undo_problem
                    else " and was undone"
                )
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
                **fleet,
            )
            self._end_move()
            raise OperationRefused(said)
        self.active = target
        if source is not None:
            self.machine.traffic_moved(source, target, self.clock.monotonic())
        self.machine.switched()
        self.metrics.observe_switch(elapsed)
        self.metrics.set_active(target)
        self.machine.policy.reset(target)
        # Traffic was moved to `target` on purpose: an operator (perhaps with --force,
        # past the gate), or a rollback to a target that passes its probes now. Judge the
        # color by what it does from now on, not by failures from before the move, which
        # would otherwise undo it on the next tick: a color back from an outage both colors
        # had was rolled back to, then held at once as "failing" on the outage still in its
        # window. So with the requests and log lines the log signals hold of it: a 5xx
        # burst that rolled it back a moment ago rolled the fixed color back again at once.
        # (A color failing again is caught from its new probes; `rolled_away_from` and the
        # rollback budget keep a flapping pair from ping-ponging traffic.)
        self.machine.judge_afresh(target)
        for sig in self.signals.values():
            afresh = getattr(sig, "judge_afresh", None)
            if afresh is not None:
                afresh(target)
        if kind == "rollback":
            self.close_completed(
                source,
                target,
                reason=reason,
                lock_reason=reason,
                duration_ms=round(elapsed * 1000, 1),
                **closing,
                **fleet,
            )
        else:
            self.record(
                kind,
                event_id=moved["id"] if moved else None,
                source=source,
                target=target,
                reason=reason,
                by=by,
                duration_ms=round(elapsed * 1000, 1),
                **fleet,
            )
            self._end_move()

    def _begin_move(self, kind: str, **fields: Any) -> dict[str, Any] | None:
        """An operator's switch or promote is journaled once it is done; it is named in
        state.json first (`moving`), so that a crash in the middle is told as theirs at the
        next start (`recovery`), never as a switch made by someone else. None for a
        rollback, which `rollback_started` opens in the journal itself."""
        if kind == "rollback":
            return None
        self.moving = named_record(kind, fields)
        self.save_state()
        return self.moving

    def _end_move(self) -> None:
        self.moving = None
        self.save_state()

    def close_failed(
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
        **fleet: Any,
    ) -> str:
        """Journal a rollback that failed (and what its undo left), and hold for an operator;
        returns where and why it failed and what is served (`test: nginx rejected ...;
        undone, green is served`).

        `fleet`: the fleet's fields of the rollback (`generation`, `fleet_node`,
        `local_fallback`), journaled with `rollback_failed` as with its `rollback_started`.
        """
        undone = (
            "nothing was changed"
            if outcome.untouched
            else "could not be undone"
            if outcome.undo_problem
            else "undone"
        )
        why = f"{outcome.step}: {outcome.why()}; {undone}, {outcome.serving_text()}"
        # Owed (`owe`) until state.json holds the hold: journaled first, a crash came back
        # to a rollback closed and no hold, and tried it again.
        self.owe(
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
            **fleet,
        )
        hold = self.machine.rollback_failed(
            f"rollback {source} -> {target} failed at {why}", None, severity
        )
        self.owe("hold", source=source, target=target, reason=hold.reason, severity=severity)
        # The hold's lock with them, as the next tick would take it (`_standstill_lock`): no
        # moment after the failed rollback allows deploys, guardd running or not.
        self.qos.hold(_holds(hold))
        self.settle()
        return why

    def hold_for_lost_state(self, why: str) -> None:
        """`state.json` could not be read at start (`why`): whether an operator had paused
        guardd, or it held, is unknown, so it holds until an operator resumes it, and
        deploys wait with it. Deciding alone after a pause for a migration would be worse
        than waiting for a look."""
        hold = self.machine.hold_until_resumed(
            f"{why}: whether guardd was paused or held is unknown; check, then `guardctl resume`"
        )
        self.record("hold", source=self.active, reason=hold.reason, by=GUARDD)
        self.qos.hold(_holds(hold))
        self.settle()

    def close_completed(
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
        """Journal a verified rollback, count it, and take the QoS lock.

        `rollback_completed` is owed (`owe`) until the guard window's lock is on disk: the
        lock's change journals it just before its `qos_locked`. Killed between a journaled
        `rollback_completed` and the lock, guardd came back to a rollback closed and no
        guard window: every gate allowed deploys moments after users met a failing color.
        """
        self.owe(
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
        self.settle()

    async def switch_verified(
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
                await self._switch(target)
                committed = True
            await self._verify(target)
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
        self.active = await self.read_target()
        self.machine.switched()
        out.serving = None if out.undo_problem else await self._serving()
        return out

    def may_switch(self) -> str | None:
        """Why guardd may not change the switch target now (asked afresh), or None. Asked
        at every tick and before a switch, its undo and a re-apply: another guardd may
        switch the target now, and a swap here could undo its swap."""
        self.cannot_switch = self.switch_refused()
        return self.cannot_switch

    async def _switch(self, target: Color) -> None:
        """The switcher's switch to `target`, bounded by twice `switch.timeout`;
        `SwitchRefused` at once when guardd may not switch (`may_switch`)."""
        if why := self.may_switch():
            raise SwitchRefused(why)
        with anyio.fail_after(2 * self.s.switch_timeout):
            await self.switcher.switch(target)

    async def _restore(self, previous: Color | None) -> str | None:
        """Put `previous` back in force after a switch that did not verify; why not, if not."""
        if previous is None:
            return "the color before the switch is unknown, so there is nothing to put back"
        if why := self.may_switch():
            return f"restoring {previous} refused: {why}"
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
        both fail with an HTTP answer), or guardd cannot tell which color answered. With
        `switch.verify_header`, the color its answers name, whatever the target says.
        """
        named = self.active
        if self.verifier is None or (named is None and self.s.verify_header is None):
            return named
        # Old nginx workers answer for a moment after a reload: only a streak of answers
        # that agree, within the verify budget, tells.
        if self.s.verify_header is not None:
            # The front door names the color that answered: that one is served, whatever
            # the target says and whether it passes or fails.
            said = await self._front_door_streak(_named)
            return said if said in COLORS else None

        def agrees(answer: ProbeResult) -> bool | None:
            assert named is not None  # noqa: S101 - returned above when None
            healthy = self.machine.healthy(named, self.clock.monotonic())
            # A front door that gives no answer at all (a timeout, a refused connection:
            # nginx stopped) agrees with no color, a failing one included.
            return (
                healthy is not None and answer.ok == healthy and answer.status is not None
            ) or None

        return named if await self._front_door_streak(agrees) else None

    async def _front_door_streak(self, key: Callable[[ProbeResult], object | None]) -> object:
        """Ask the front door until `verify_successes` answers in a row, by the order they
        were asked, have the same `key` (None: breaks a streak), within the verify budget;
        `key` sees every answer, in the order they come in.

        The key of that streak, else None. A streak counts back from the newest answer in:
        an older one still out (hung on an old nginx worker) is asked again beside it after
        `HEDGE_AFTER_S`, and never holds up a streak of answers asked after it.
        """
        verifier = self.verifier
        assert verifier is not None  # noqa: S101 - callers return without one
        need = self.s.verify_successes
        keys: dict[int, object | None] = {}
        found: object | None = None
        send, receive = anyio.create_memory_object_stream[tuple[int, ProbeResult]](need + 1)

        async def ask(index: int) -> None:
            answer = await verifier.probe()
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await send.send((index, answer))

        with send, receive, anyio.move_on_after(self.s.switch_timeout * VERIFY_SHARE):
            async with anyio.create_task_group() as tg:
                asked = 0
                while found is None:
                    if asked - len(keys) <= need:
                        tg.start_soon(ask, asked)
                        asked += 1
                    with anyio.move_on_after(HEDGE_AFTER_S):
                        index, answer = await receive.receive()
                        keys[index] = key(answer)
                        found = _newest_streak(keys, need)
                        if found is None:
                            await anyio.sleep(_STREAK_PACE_S)
                tg.cancel_scope.cancel()
        return found

    async def _verify(self, target: Color) -> None:
        """Confirm the front door serves `target`: `verify_successes` passing answers in a
        row (with `switch.verify_header`, answers that name `target` too).

        Raises `VerifyFailed` ("verify failed: 0/31 answers passed (3 in a row needed)
        within 5s, last: HTTP 503") when they do not come within the verify budget,
        `VERIFY_SHARE` of `switch.timeout`.
        """
        if self.verifier is None:
            return
        budget = self.s.switch_timeout * VERIFY_SHARE
        judged: list[ProbeResult] = []  # every answer, judged as `target`'s, as it came in

        def passed(answer: ProbeResult) -> bool | None:
            judged.append(self.front_door_answer(answer, target))
            return judged[-1].ok or None

        if await self._front_door_streak(passed):
            return
        last = judged[-1] if judged else None
        said = "no answer" if last is None else last.error or last.outcome.value
        answers, passed_n = len(judged), sum(a.ok for a in judged)
        raise VerifyFailed(
            f"verify failed: {passed_n}/{answers} answers passed "
            f"({self.s.verify_successes} in a row needed) within {budget:g}s, last: {said}",
            answers=answers,
            passed=passed_n,
            status=None if last is None else last.status,
            error=None if last is None or last.ok else said,
        )

    def front_door_answer(self, answer: ProbeResult, color: Color | None) -> ProbeResult:
        """The front door's `answer` judged as an answer of `color`'s (the switch target's
        color; the daemon records and observes answers so judged): as it is, unless
        `switch.verify_header` names another color (or none) for a passing one, which then
        fails: nginx serves something else than the switch target says. Without the
        header, the answers of two healthy colors look alike."""
        header = self.s.verify_header
        if header is None or color is None or not answer.ok or _named(answer) == color:
            return answer
        named = "no such header" if answer.served_by is None else repr(answer.served_by[:40])
        # (Only `ok` and `error` of it are read: the machine's front door, a verification.)
        return replace(
            answer,
            outcome=Outcome.HTTP_OTHER,
            error=f"the answer is not {color}'s: {header}: {named}",
        )

    def switch_limit(self) -> float:
        """The longest a switch can take, verification and undo included, in seconds."""
        # switch (and its own undo) 2x, verify its share, undo 2x, the serving check its share
        return (2 + VERIFY_SHARE + 2 + VERIFY_SHARE) * self.s.switch_timeout

    async def reapply(self, color: Color, reason: str) -> None:
        """Re-apply the switch target (test + reload) because of a front-door mismatch."""
        await self.faults.reach("before_reapply")
        if why := self.may_switch():
            said = f"re-applying {color} refused: {why}"
            self.machine.reapply_failed(said)
            self.record("alert", source=color, by=GUARDD, reapplied=False, reason=said)
            return
        # Counted as a switch in flight, so the watchdog waits for it like for a switch.
        self.rolling_back, self.switch_started = True, self.clock.monotonic()
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(2 * self.s.switch_timeout):
                await self.switcher.reapply()
        except (SwitchError, TimeoutError, OSError, GuarddError) as e:
            step = e.step if isinstance(e, SwitchError) else "switch"
            said = f"re-applying {color} failed at {step}: {_why(e)}"
            self.machine.reapply_failed(said)
            self.record("alert", source=color, by=GUARDD, step=step, reapplied=False, reason=said)
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

    # ---- the QoS lock (`QosKeeper`) ----------------------------------------------------

    @property
    def own_lock(self) -> OwnedLock | None:
        """The lock guardd holds, or None."""
        return self.qos.own_lock

    @property
    def qos_held(self) -> bool:
        """Whether any QoS lock was held at the last look."""
        return self.qos.held

    def take_lock(
        self, reason: str, *, by: str, duration: float | None = None, manual: bool = False
    ) -> qoslock.LockInfo:
        """Write guardd's lock; see `QosKeeper.take`."""
        return self.qos.take(reason, by=by, duration=duration, manual=manual)

    def release_lock(self, *, by: str, reason: str, evidence: dict[str, Any] | None = None) -> bool:
        """Remove the lock file (any lock, when an operator asks) and journal it."""
        return self.qos.release(by=by, reason=reason, evidence=evidence)

    # ---- what guardctl sees (`statusview`) ---------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The docs/contract.md §1 `status --json` object."""
        return statusview.snapshot(self)

    def status_line(self) -> str:
        """The one-line STATUS= summary for systemd."""
        return statusview.status_line(self)


#: Why guardd does not act on a failing color, by what blocked the decision, as the
#: standstill lock says it. policy.dry_run moves no traffic; deploys onto a failing service
#: wait all the same, as in a pause.
_STANDING_BY: dict[str, str] = {
    "paused": "guardd is paused",
    "dry_run": "guardd is in dry run (policy.dry_run)",
}


def _named(answer: ProbeResult) -> Color | None:
    """The color the front door's `answer` names in `switch.verify_header`, or None: none,
    another word, or two colors. Case and spaces aside; a header sent on several lines
    (joined by ", ") names a color only if every line names it (the application's own and
    one nginx adds)."""
    # Spaces and tabs only (RFC 9110's OWS): `str.strip` would take a no-break space too.
    said = {part.strip(" \t").lower() for part in (answer.served_by or "").split(",")}
    return next((c for c in COLORS if said == {c}), None)


def _standstill_cause(reason: str) -> str:
    """What a standstill lock's reason stands for: a hold (its whole reason), or a pause or
    dry run while the color fails (not the verdict's figures, which change every tick)."""
    return reason if reason.startswith("guardd holds: ") else reason.partition(" while ")[0]


def _holds(hold: Hold) -> str:
    """The reason of the QoS lock a hold takes (docs/contract.md: "guardd holds: ...")."""
    return f"guardd holds: {hold.reason}"


def _newest_streak(keys: dict[int, object | None], need: int) -> object | None:
    """The key shared by the `need` answers asked last before, and including, the newest
    answer in (`keys`: by the order they were asked), when none of them is still out and
    the key is not None; else None."""
    newest = max(keys)
    key = keys[newest]
    if key is None or newest + 1 < need:
        return None
    for index in range(newest - 1, newest - need, -1):
        if keys.get(index, _PENDING) != key:
            return None
    return key
