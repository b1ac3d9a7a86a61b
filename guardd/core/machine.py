"""The guard state machine: probe results and facts in, a state and actions out.

The machine never switches anything itself. It tells the supervisor to `Rollback`,
to `Hold`, or to raise an `Alert`; the supervisor acts at the edge and reports back
with `rollback_succeeded` or `rollback_failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guardd.core.policy import Policy, PolicySpec, Verdict
from guardd.core.types import COLORS, Color, Evidence, Outcome, Severity, State, other
from guardd.core.window import SlidingWindow, WindowStats

# A color whose last probe is older than this many intervals is not vouched for.
STALE_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class Facts:
    """What the edges know at decision time."""

    now: float
    active: Color | None
    qos_locked: bool = False
    paused: bool = False
    rollbacks_in_budget: int = 0
    rolling_back: bool = False


@dataclass(frozen=True, slots=True)
class Rollback:
    """Move traffic from `source` to `target` now."""

    source: Color
    target: Color
    severity: Severity
    reason: str
    evidence: Evidence


@dataclass(frozen=True, slots=True)
class Hold:
    """Do not switch; page. A sticky hold waits for an operator."""

    reason: str
    sticky: bool
    evidence: Evidence | None = None
    severity: Severity | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """Tell people; change nothing."""

    severity: Severity | None
    reason: str
    evidence: Evidence | None = None


Action = Rollback | Hold | Alert


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one decision tick."""

    state: State
    verdict: Verdict | None
    actions: tuple[Action, ...] = ()
    blocked_by: str | None = None


@dataclass(slots=True)
class _Edges:
    """Conditions already reported, so that each is journaled once per incident."""

    raised: set[str] = field(default_factory=set)

    def first(self, key: str) -> bool:
        if key in self.raised:
            return False
        self.raised.add(key)
        return True

    def clear(self, *prefixes: str) -> None:
        self.raised = {k for k in self.raised if not k.startswith(prefixes)}


# The key of the lost-protection episode in `_Edges`: journaled once, re-armed on recovery.
NO_TARGET = "no_target"


@dataclass(frozen=True, slots=True)
class Memory:
    """Everything the machine remembers besides its probe windows: state.json keeps it.

    The windows (and the P1 onsets the policy derives from them) are measurements, taken
    again after a restart; whatever else steers a decision is here, so that a restart
    alone never changes one (docs/contract.md §4).
    """

    hold: Hold | None = None
    rolled_away_from: Color | None = None
    raised: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """The `machine` object of state.json."""
        hold = self.hold
        return {
            "hold": None
            if hold is None
            else {
                "reason": hold.reason,
                "sticky": hold.sticky,
                "severity": hold.severity,
                "evidence": hold.evidence.to_dict() if hold.evidence else None,
            },
            "rolled_away_from": self.rolled_away_from,
            "raised": sorted(self.raised),
        }

    @classmethod
    def from_json(cls, doc: object) -> Memory:
        """Read back `to_json`; what is missing or malformed is not remembered."""
        if not isinstance(doc, dict):
            return cls()
        hold: Hold | None = None
        h = doc.get("hold")
        if isinstance(h, dict) and isinstance(h.get("reason"), str):
            ev = h.get("evidence")
            sev = h.get("severity")
            hold = Hold(
                h["reason"],
                # Fail closed: a hold whose stickiness cannot be read waits for an operator.
                sticky=h.get("sticky") is not False,
                evidence=Evidence.from_dict(ev) if isinstance(ev, dict) else None,
                severity=sev if sev in ("P0", "P1", "P2") else None,
            )
        away = doc.get("rolled_away_from")
        raised = doc.get("raised")
        return cls(
            hold=hold,
            rolled_away_from=away if away in COLORS else None,
            raised=frozenset(k for k in raised if isinstance(k, str))
            if isinstance(raised, list)
            else frozenset(),
        )


class GuardMachine:
    """Windows for both colors, the policy, and the hold/anti-flap memory."""

    def __init__(self, spec: PolicySpec, probe_interval: float) -> None:
        self.spec = spec
        self.probe_interval = probe_interval
        self.policy = Policy(spec)
        self.windows: dict[Color, SlidingWindow] = {c: SlidingWindow(spec.window) for c in COLORS}
        self.hold: Hold | None = None
        # The color guardd rolled away from: never an automatic target while the guard
        # window that followed is still held, so a flapping color cannot ping-pong traffic.
        self.rolled_away_from: Color | None = None
        self.last_decision: Decision | None = None
        self._edges = _Edges()

    def reconfigure(
        self, spec: PolicySpec, probe_interval: float, keep: frozenset[Color] = frozenset(COLORS)
    ) -> None:
        """Apply a reloaded policy; windows of colors not in `keep` start afresh."""
        self.spec = spec
        self.probe_interval = probe_interval
        self.policy = Policy(spec)
        for color in COLORS:
            if color in keep:
                self.windows[color].resize(spec.window)
            else:
                self.windows[color] = SlidingWindow(spec.window)

    def observe(
        self, color: Color, now: float, outcome: Outcome, latency_s: float, error: str | None = None
    ) -> None:
        """Record one probe round of `color`."""
        self.windows[color].add(now, outcome, latency_s, error)

    def stats(self, color: Color, now: float) -> WindowStats:
        """The window of `color` at `now`."""
        return self.windows[color].stats(now)

    def is_stale(self, color: Color, now: float) -> bool:
        """Whether the last probe of `color` is too old to vouch for."""
        last = self.windows[color].last_probe_at
        return last is None or now - last > STALE_INTERVALS * self.probe_interval

    def healthy(self, color: Color, now: float) -> bool | None:
        """True if the last probe passed and is fresh; None if it cannot be vouched for."""
        if self.is_stale(color, now):
            return None
        return self.windows[color].consecutive_failures == 0

    def promotable(self, color: Color, now: float) -> bool:
        """The promotion gate: `promote_successes` fresh passing probes in a row, and a
        window clean enough that the P1 ratio rule would not send traffic straight back."""
        return (
            self.healthy(color, now) is True
            and self.windows[color].consecutive_successes >= self.spec.promote_successes
            and self.window_would_fire(color, now, self.spec.p1_error_ratio) is None
        )

    def window_would_fire(self, color: Color, now: float, threshold: float) -> float | None:
        """The window's failed-probe ratio if it is judged and at or above `threshold`."""
        stats = self.stats(color, now)
        ratio = stats.error_ratio
        if stats.samples >= self.spec.min_samples and ratio is not None and ratio >= threshold:
            return ratio
        return None

    def memory(self) -> Memory:
        """What must survive a restart for the next decision to come out the same."""
        return Memory(self.hold, self.rolled_away_from, frozenset(self._edges.raised))

    def restore(self, memory: Memory) -> None:
        """Adopt the memory of an earlier run (at start-up, before the first decision)."""
        self.hold = memory.hold
        self.rolled_away_from = memory.rolled_away_from
        self._edges.raised = set(memory.raised)

    def protection_lost(self, active: Color, now: float) -> str | None:
        """Why an automatic rollback from `active` could not go ahead now; None if it could.

        The rollback target counts as lost once it fails `consecutive_failures` probes in
        a row (the rule that would roll it back, were it active) or cannot be vouched for
        (stale). A target that is `active` itself has nothing to lose.
        """
        target = self.rollback_target(active)
        if target == active:
            return None
        if self.is_stale(target, now):
            return f"the rollback target {target} is stale (no recent probe)"
        w = self.windows[target]
        if w.consecutive_failures >= self.spec.consecutive_failures:
            return (
                f"the rollback target {target} is down "
                f"({w.consecutive_failures} failed probes in a row: {w.last_error})"
            )
        return None

    def rollback_target(self, active: Color) -> Color:
        """The color automatic rollbacks go to from `active`."""
        if self.spec.rollback_to in COLORS:
            return "blue" if self.spec.rollback_to == "blue" else "green"
        return other(active)

    def decide(self, facts: Facts) -> Decision:
        """One decision tick."""
        decision = self._decide(facts)
        self.last_decision = decision
        return decision

    def _decide(self, f: Facts) -> Decision:
        if any(w.last_probe_at is None for w in self.windows.values()):
            return Decision(State.STARTING, None)
        if f.rolling_back:
            return Decision(State.ROLLING_BACK, None)
        if not f.qos_locked:
            self.rolled_away_from = None
        if f.active is None:
            hold = Hold("the switch target names neither blue nor green", sticky=False)
            return Decision(State.HOLD, None, self._enter_hold(hold))

        active = f.active
        verdict = self.policy.evaluate(
            f.now, active, self.stats(active, f.now), self.stats(other(active), f.now)
        )
        actions: list[Action] = []
        lost = self.protection_lost(active, f.now)
        if lost is not None:
            if self._edges.first(NO_TARGET):
                actions.append(
                    Alert(
                        None,
                        f"no safe rollback: {lost}; if {active} fails, guardd holds "
                        "instead of rolling back",
                    )
                )
        elif self.healthy(self.rollback_target(active), f.now) is True:
            # Re-armed only once the target passes again, so a target hovering at the
            # threshold is one episode, not an alert per probe.
            self._edges.clear(NO_TARGET)
        if verdict.severity == "P2":
            if self._edges.first(f"p2:{verdict.evidence.rule}"):
                actions.append(Alert("P2", verdict.reason, verdict.evidence))
        else:
            self._edges.clear("p2:")

        blocked: str | None = None
        if verdict.failing:
            blocked, more = self._on_failing(f, active, verdict)
            actions.extend(more)
        else:
            self._edges.clear("dry_run", "paused")
            if self.hold is not None and not self.hold.sticky:
                self.hold = None
        return Decision(self._state(f, active, verdict), verdict, tuple(actions), blocked)

    def _on_failing(
        self, f: Facts, active: Color, verdict: Verdict
    ) -> tuple[str | None, list[Action]]:
        assert verdict.severity in ("P0", "P1")  # noqa: S101 - guarded by verdict.failing
        severity: Severity = verdict.severity
        if f.paused:
            return "paused", []
        if self.hold is not None and self.hold.sticky:
            return "hold", []
        target = self.rollback_target(active)
        if self.spec.dry_run:
            if self._edges.first("dry_run"):
                return "dry_run", [
                    Alert(
                        severity,
                        f"dry run: would roll back {active} -> {target} ({verdict.reason})",
                        verdict.evidence,
                    )
                ]
            return "dry_run", []
        hold: Hold | None = None
        if target == active:
            hold = Hold(
                f"{active} is failing and is itself the rollback target; no safe switch",
                sticky=False,
                evidence=verdict.evidence,
                severity=severity,
            )
        elif f.rollbacks_in_budget >= self.spec.max_rollbacks:
            hold = Hold(
                f"rollback budget spent: {f.rollbacks_in_budget} automatic rollbacks "
                f"within {self.spec.budget_window:g}s (max_rollbacks="
                f"{self.spec.max_rollbacks}); waiting for an operator",
                sticky=True,
                evidence=verdict.evidence,
                severity=severity,
            )
        elif f.qos_locked and target == self.rolled_away_from:
            hold = Hold(
                f"{target} was rolled back from during this guard window; not switching back to it",
                sticky=False,
                evidence=verdict.evidence,
                severity=severity,
            )
        elif self.healthy(target, f.now) is not True:
            why = "stale" if self.healthy(target, f.now) is None else "unhealthy"
            hold = Hold(
                f"{active} is failing but the rollback target {target} is {why}",
                sticky=False,
                evidence=verdict.evidence,
                severity=severity,
            )
        if hold is not None:
            return "hold", list(self._enter_hold(hold))
        self.hold = None
        return None, [
            Rollback(
                active,
                target,
                severity,
                f"{verdict.reason}; rolling back to {target}",
                verdict.evidence,
            )
        ]

    def _enter_hold(self, hold: Hold) -> tuple[Action, ...]:
        # Journal a hold once; a later tick with the same reason is the same incident.
        changed = self.hold is None or self.hold.reason != hold.reason
        self.hold = hold
        return (hold,) if changed else ()

    def current_state(self, f: Facts) -> State:
        """The state as the facts stand, without deciding anything."""
        if any(w.last_probe_at is None for w in self.windows.values()):
            return State.STARTING
        if f.rolling_back:
            return State.ROLLING_BACK
        if f.active is None:
            return State.HOLD
        verdict = self.last_decision.verdict if self.last_decision else None
        return self._state(f, f.active, verdict)

    def _state(self, f: Facts, active: Color, verdict: Verdict | None) -> State:
        if f.paused:
            return State.PAUSED
        if self.hold is not None:
            return State.HOLD
        if f.qos_locked:
            return State.GUARD_WINDOW
        window = self.windows[active]
        if window.consecutive_failures > 0 or (
            verdict is not None
            and verdict.evidence.color == active
            and (verdict.severity is not None or verdict.pending is not None)
        ):
            return State.DEGRADED
        return State.STEADY

    def rollback_succeeded(self, source: Color) -> None:
        """The switch away from `source` is done and verified."""
        self.rolled_away_from = source
        self.hold = None
        self.policy.reset()
        self._edges.clear("dry_run", "p2:")

    def rollback_failed(
        self, reason: str, evidence: Evidence | None, severity: Severity | None
    ) -> Hold:
        """The switch failed and was undone: hold until an operator acts."""
        self.hold = Hold(reason, sticky=True, evidence=evidence, severity=severity)
        return self.hold

    def clear_hold(self) -> None:
        """An operator acted (resume, switch, rollback): automatic decisions may go on."""
        self.hold = None
        self._edges.clear("dry_run")
