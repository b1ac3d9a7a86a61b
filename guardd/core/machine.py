"""The guard state machine: probe results and facts in, a state and actions out.

The machine never switches anything itself. It tells the supervisor to `Rollback`,
to `Hold`, or to raise an `Alert`; the supervisor acts at the edge and reports back
with `rollback_succeeded` or `rollback_failed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guardd.core.policy import Policy, PolicySpec, Verdict, probe_reading
from guardd.core.rules import Rule
from guardd.core.signals import PROBE, Reading
from guardd.core.types import COLORS, Color, Evidence, Outcome, Severity, State, other
from guardd.core.window import ProbeKey, SlidingWindow, WindowStats

# A color whose last probe is older than this many intervals is not vouched for.
STALE_INTERVALS = 3
# Looked up once: an enum member read off its class costs more than a whole comparison.
_OUTCOME_OK = Outcome.OK

#: `GuardMachine.moving_key`: seen healthy, front door stale, each window stale, the runs
#: of successes (active >= n, active > 0, standby >= n, standby > 0), what the rules read
#: of the active window and of the standby's.
MovingKey = tuple[bool, bool, bool | None, bool, bool, bool, bool, bool, bool, ProbeKey, ProbeKey]


@dataclass(frozen=True, slots=True)
class Facts:
    """What the edges know at decision time."""

    now: float
    active: Color | None
    qos_locked: bool = False
    paused: bool = False
    rollbacks_in_budget: int = 0
    rolling_back: bool = False
    # `switch.verify_url` is set and probed continuously: the front door is evidence.
    front_door_watched: bool = False
    # The readings of the signals other than `probe`, by signal name and color.
    readings: Mapping[str, Mapping[Color, Reading]] = field(default_factory=dict)
    # Why the switch target names no color when it could not even be read (a symlink put
    # in place of a state file, a file made unreadable); None when it was read.
    target_unreadable: str | None = None


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
    # "mismatch": held because the front door and the probes disagree; lasts as long
    # as they do (or until an operator acts), whatever the policy says meanwhile.
    cause: str = "policy"


@dataclass(frozen=True, slots=True)
class Alert:
    """Tell people; change nothing."""

    severity: Severity | None
    reason: str
    evidence: Evidence | None = None


@dataclass(frozen=True, slots=True)
class Reapply:
    """Have the service run what the switch target names again (nginx: test + reload)."""

    color: Color
    reason: str


@dataclass(slots=True)
class FrontDoor:
    """The answers through the front door (`switch.verify_url`): the current streak."""

    ok: bool | None = None  # the last answer passed; None before the first
    streak: int = 0  # answers in a row alike, the last included
    answers: int = 0  # answers ever counted
    last_at: float | None = None
    last_error: str | None = None

    def add(self, now: float, ok: bool, error: str | None) -> None:
        """Count one answer at monotonic `now`."""
        self.streak = self.streak + 1 if ok == self.ok else 1
        self.ok = ok
        self.answers += 1
        self.last_at = now
        self.last_error = None if ok else error

    def restart(self) -> None:
        """Forget the streak and the last error: what came before a switch says nothing
        about after it (a rollback's front door serves another color now)."""
        self.ok = None
        self.streak = 0
        self.last_error = None


Action = Rollback | Hold | Alert | Reapply


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one decision tick."""

    state: State
    verdict: Verdict | None
    actions: tuple[Action, ...] = ()
    blocked_by: str | None = None


@dataclass(slots=True)
class _Edges:
    """Conditions already reported, so that each is journaled once per episode.

    An episode ends once its condition has stayed clear for `keep_firing_for` seconds (the
    policy window), as Prometheus's `keep_firing_for` keeps an alert firing: a condition that
    clears for a moment and comes back (a slow target going stale between its answers, a
    probe failing every other round) is one episode, not an alert per flap. An operator's act
    or a completed rollback ends episodes at once (`clear`).
    """

    keep_firing_for: float
    raised: set[str] = field(default_factory=set)
    # Raised keys whose condition is clear, each with the monotonic time it last cleared.
    # Not kept across a restart: after one, a clear episode is waited out afresh, which
    # can only merge two episodes, never alert one twice.
    quiet: dict[str, float] = field(default_factory=dict)

    def first(self, key: str, now: float) -> bool:
        """Whether the condition `key`, present at `now`, starts an episode."""
        if key not in self.raised:
            self.raised.add(key)
            return True
        since = self.quiet.pop(key, None) if self.quiet else None
        # Ended, though no decision since saw it end (`repeat_key` skipped them).
        return since is not None and now - since >= self.keep_firing_for

    def settle(self, now: float, *prefixes: str) -> None:
        """The conditions under `prefixes` are clear at `now`: end those clear for long
        enough, start the wait of the others."""
        if not (self.raised and any(k.startswith(prefixes) for k in self.raised)):
            return  # most ticks: nothing raised to settle
        quiet = self.quiet
        for key in [k for k in self.raised if k.startswith(prefixes)]:
            since = quiet.setdefault(key, now)
            if now - since >= self.keep_firing_for:
                self.raised.discard(key)
                del quiet[key]

    def keep(self, key: str) -> None:
        """The condition `key` is not clear yet, though it raises nothing now."""
        if self.quiet:
            self.quiet.pop(key, None)

    def ending(self, now: float) -> bool:
        """Whether an episode waiting to end has waited long enough at `now`."""
        return any(now - since >= self.keep_firing_for for since in self.quiet.values())

    def clear(self, *prefixes: str) -> None:
        """End the episodes under `prefixes` now."""
        # Most ticks have nothing to clear: the set is then kept as it is.
        if self.raised and any(k.startswith(prefixes) for k in self.raised):
            self.raised = {k for k in self.raised if not k.startswith(prefixes)}
            self.quiet = {k: t for k, t in self.quiet.items() if k in self.raised}


# The key of the lost-protection episode in `_Edges`: journaled once, re-armed on recovery.
NO_TARGET = "no_target"
# The keys of a front-door mismatch's episode (`mismatch:<color>`): re-applied and paged
# for once, over as the front door and the probes have agreed for `keep_firing_for`.
MISMATCH = "mismatch:"


@dataclass(frozen=True, slots=True)
class Memory:
    """Everything the machine remembers besides its probe windows: state.json keeps it.

    The windows are measurements, taken again after a restart; the onsets of the rules'
    `for` are kept beside this (`guardd.onsets`, state.json's `onsets`); whatever else
    steers a decision is here, so that a restart alone never changes one
    (docs/contract.md §4).
    """

    hold: Hold | None = None
    rolled_away_from: Color | None = None
    raised: frozenset[str] = frozenset()
    # The colors seen healthy, each with the identity of what was probed then: a color
    # whose probe URLs changed since (a typo fixed while guardd was down) is unseen again.
    seen_healthy: Mapping[Color, str] = field(default_factory=dict)
    # A front-door mismatch already re-applied for, and about which color: after a
    # restart it is held for, not re-applied again.
    mismatch: str | None = None
    mismatch_color: Color | None = None
    # Why its re-apply did not run or failed (`GuardMachine.reapply_failed`); None if it ran.
    reapply_failed: str | None = None
    # Per signal and color, the statistics of the color traffic last left, over its last
    # window: what `above_baseline` rules compare with (docs/contract.md §2).
    baselines: Mapping[str, Mapping[Color, Mapping[str, float | None]]] = field(
        default_factory=dict
    )

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
                "cause": hold.cause,
            },
            "rolled_away_from": self.rolled_away_from,
            "raised": sorted(self.raised),
            "seen_healthy": dict(sorted(self.seen_healthy.items())),
            "mismatch": self.mismatch,
            "mismatch_color": self.mismatch_color,
            "reapply_failed": self.reapply_failed,
            "baselines": {
                sig: {c: dict(stats) for c, stats in sorted(by_color.items())}
                for sig, by_color in sorted(self.baselines.items())
            },
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
                cause=h["cause"] if h.get("cause") in ("policy", "mismatch") else "policy",
            )
        away = doc.get("rolled_away_from")
        raised = doc.get("raised")
        seen = doc.get("seen_healthy")
        mismatch = doc.get("mismatch")
        mismatch_color = doc.get("mismatch_color")
        failed = doc.get("reapply_failed")
        return cls(
            hold=hold,
            rolled_away_from=away if away in COLORS else None,
            raised=frozenset(k for k in raised if isinstance(k, str))
            if isinstance(raised, list)
            else frozenset(),
            seen_healthy={c: v for c, v in seen.items() if c in COLORS and isinstance(v, str)}
            if isinstance(seen, dict)
            else {},
            mismatch=mismatch if isinstance(mismatch, str) else None,
            mismatch_color=mismatch_color if mismatch_color in COLORS else None,
            reapply_failed=failed if isinstance(failed, str) else None,
            baselines=_baselines_from_json(doc.get("baselines")),
        )


def _baselines_from_json(doc: object) -> dict[str, dict[Color, dict[str, float | None]]]:
    # What cannot be read is not a baseline: `above_baseline` rules stay inconclusive.
    out: dict[str, dict[Color, dict[str, float | None]]] = {}
    if not isinstance(doc, dict):
        return out
    for sig, by_color in doc.items():
        if not isinstance(sig, str) or not isinstance(by_color, dict):
            continue
        for color, stats in by_color.items():
            if color not in COLORS or not isinstance(stats, dict):
                continue
            out.setdefault(sig, {})[color] = {
                k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
                for k, v in stats.items()
                if isinstance(k, str)
            }
    return out


def _would(rule: Rule, evidence: Evidence, machine: GuardMachine, active: Color) -> str:
    what = (
        f"would roll back {active} -> {machine.rollback_target(active)}"
        if rule.rolls_back
        else "would alert"
    )
    value = f"{evidence.value:.4g}" if isinstance(evidence.value, float) else evidence.value
    return (
        f"dry run: rule {rule.name} {what} ({rule.severity} {rule.describe()}: "
        f"value {value}, {evidence.samples} samples)"
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
        self._edges = _Edges(spec.window)
        # Colors that passed a probe since start (or since their URLs last changed): a
        # color never seen healthy may just have a wrong probe URL.
        self.seen_healthy: set[Color] = set()
        # What each color's probes look at (an opaque digest of its URLs, set by the
        # service), so that a remembered "seen healthy" is dropped when the URLs changed.
        self.probe_identity: dict[Color, str] = {}
        self.front_door = FrontDoor()
        # The front door and the active color's probes disagree: what, about which color,
        # and the front door's answer count when the target was re-applied for it.
        self.mismatch: str | None = None
        self._mismatch_color: Color | None = None
        self._reapplied_at = 0
        self._reapply_failed: str | None = None
        self.baselines: dict[str, dict[Color, dict[str, float | None]]] = {}
        # The other signals' readings at the last tick: a baseline is taken from them.
        self._readings: Mapping[str, Mapping[Color, Reading]] = {}
        # The last verdict on each color (status, metrics): the standby is judged too.
        self.verdicts: dict[Color, Verdict] = {}
        # The colors probed since this start: `starting` until both were.
        self._probed: set[Color] = set()

    def reconfigure(
        self, spec: PolicySpec, probe_interval: float, keep: frozenset[Color] = frozenset(COLORS)
    ) -> None:
        """Apply a reloaded policy; windows of colors not in `keep` start afresh."""
        self.spec = spec
        self.probe_interval = probe_interval
        old, self.policy = self.policy, Policy(spec)
        # A reload never restarts a `for`: the onsets of rules it left as they were stay.
        self.policy.table.adopt(old.table)
        self._edges.keep_firing_for = spec.window
        for color in COLORS:
            if color in keep:
                self.windows[color].resize(spec.window)
            else:
                self.windows[color] = SlidingWindow(spec.window)
                self.seen_healthy.discard(color)
                self.policy.reset(color)  # its onsets were of the URLs it had

    def judge_afresh(self, color: Color) -> None:
        """Forget `color`'s probe window: what it did before an operator's switch to it.

        Ratio and latency rules are then inconclusive until `min_samples` new probes, and
        consecutive failures count from zero; nothing is read as healthy meanwhile.
        """
        self.windows[color] = SlidingWindow(self.spec.window)
        # Its verdict was made of the window just forgotten: shown on, it would call the
        # color `ok` on evidence it no longer has. The next full tick judges it again.
        self.verdicts.pop(color, None)

    def observe(
        self, color: Color, now: float, outcome: Outcome, latency_s: float, error: str | None = None
    ) -> None:
        """Record one probe round of `color`."""
        self.windows[color].add(now, outcome, latency_s, error)
        self._probed.add(color)
        if outcome is _OUTCOME_OK:
            self.seen_healthy.add(color)

    def observe_front_door(self, now: float, ok: bool, error: str | None = None) -> None:
        """Record one answer through the front door."""
        self.front_door.add(now, ok, error)

    def front_door_view(self, f: Facts) -> bool | None:
        """True if the front door's last answer passed, False if it failed; None if the
        front door is not watched, not answered yet, or its last answer is stale."""
        fd = self.front_door
        if not f.front_door_watched or fd.ok is None or self.front_door_stale(f.now):
            return None
        return fd.ok

    def front_door_stale(self, now: float) -> bool:
        """Whether the front door's last answer is too old to vouch for (or there is none),
        by the same rule as a color's probes (`is_stale`)."""
        last = self.front_door.last_at
        return last is None or now - last > STALE_INTERVALS * self.probe_interval

    def disagreement(self, f: Facts, active: Color) -> str | None:
        """What the front door and `active`'s own probes disagree on, if they do.

        Either side must have said the same thing `consecutive_failures` times in a row,
        so that one odd answer, or the moment between a failure and its probe, is not
        read as a disagreement.
        """
        view = self.front_door_view(f)
        if view is None or self.is_stale(active, f.now):
            return None
        n = self.spec.consecutive_failures
        fd, w = self.front_door, self.windows[active]
        if fd.streak < n:
            return None
        if not view and w.consecutive_successes >= n:
            return (
                f"the front door fails ({fd.last_error or 'no answer'}) "
                f"while the probes of {active} pass"
            )
        if view and w.consecutive_failures >= n:
            if active not in self.seen_healthy:
                return (
                    f"probe of {active} fails ({w.last_error}) but the front door serves "
                    f"fine: check `upstreams.{active}.url`"
                )
            return f"the front door serves while the probes of {active} fail ({w.last_error})"
        return None

    def _agrees(self, f: Facts, active: Color) -> bool:
        """Whether the front door and `active`'s probes have agreed for a full streak."""
        view = self.front_door_view(f)
        if view is None or self.front_door.streak < self.spec.consecutive_failures:
            return False
        w = self.windows[active]
        return (w.consecutive_successes > 0) == view

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

    def vouched(self, color: Color, now: float) -> bool:
        """Whether `color`'s probes vouch for it: its last probe fresh and passing, and its
        window holding `min_samples` probes (what the ratio rules judge on)."""
        return self.healthy(color, now) is True and self.stats(color, now).samples >= (
            self.spec.min_samples
        )

    def promotable(self, color: Color, now: float) -> bool:
        """The promotion gate: `promote_successes` fresh passing probes in a row, and a
        window that holds `min_samples` (`judged`) and is clean enough that the P1 ratio
        rule would not send traffic straight back."""
        return (
            self.healthy(color, now) is True
            and self.windows[color].consecutive_successes >= self.spec.promote_successes
            and self.judged(color, now) is None
            and self.window_would_fire(color, now, self.spec.p1_error_ratio) is None
        )

    def judged(self, color: Color, now: float) -> str | None:
        """Why `color`'s window cannot be judged yet (`3 of 5 samples`), or None when it
        holds `min_samples`. A gate never opens on a window that cannot tell: one started
        afresh (a restart, traffic moved) holds none of the failures it saw before."""
        samples = self.stats(color, now).samples
        if samples >= self.spec.min_samples:
            return None
        return f"{samples} of {self.spec.min_samples} samples"

    def window_would_fire(self, color: Color, now: float, threshold: float) -> float | None:
        """The window's failed-probe ratio if it is judged and at or above `threshold`."""
        stats = self.stats(color, now)
        ratio = stats.error_ratio
        if stats.samples >= self.spec.min_samples and ratio is not None and ratio >= threshold:
            return ratio
        return None

    def memory(self) -> Memory:
        """What must survive a restart for the next decision to come out the same."""
        return Memory(
            self.hold,
            self.rolled_away_from,
            frozenset(self._edges.raised),
            {c: self.probe_identity.get(c, "") for c in COLORS if c in self.seen_healthy},
            self.mismatch,
            self._mismatch_color,
            self._reapply_failed,
            {sig: dict(by_color) for sig, by_color in self.baselines.items()},
        )

    def restore(self, memory: Memory) -> None:
        """Adopt the memory of an earlier run (at start-up, before the first decision)."""
        self.hold = memory.hold
        self.rolled_away_from = memory.rolled_away_from
        self._edges.raised = set(memory.raised)
        self.seen_healthy = {
            c for c, ident in memory.seen_healthy.items() if ident == self.probe_identity.get(c, "")
        }
        self.mismatch, self._mismatch_color = memory.mismatch, memory.mismatch_color
        self._reapply_failed = memory.reapply_failed
        self.baselines = {
            sig: {c: dict(stats) for c, stats in by_color.items()}
            for sig, by_color in memory.baselines.items()
        }
        # The re-apply happened before the restart; the front door's answers count anew.
        self._reapplied_at = 0

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

    def repeat_key(
        self, now: float, active: Color | None, qos_locked: bool, paused: bool, front_door: bool
    ) -> tuple[MovingKey, tuple[object, ...]] | None:
        """What a decision at monotonic `now` reads, when it reads nothing more: decisions
        on equal keys decide alike. The arguments are the `Facts` fields of that decision
        (`front_door`: `front_door_watched`), its other facts being no readings of other
        signals and no switch under way. None when a decision may read more than a key holds.

        A decision that took no action leaves the machine as a second decision on the same
        key would leave it (what it clears stays cleared, its verdicts are the ones kept).
        So a later decision whose key equals the key taken just after that one would take
        no action and change nothing either, whatever time has passed: every use of `now`
        is in the key (each color's staleness, the front door's) or gives nothing (a
        verdict the policy keeps judges no rule, and never fails, so that
        `rollbacks_in_budget` is not read either).

        The key is a pair: first `moving_key(now, active, front_door)`, what probe rounds
        (`observe`) and the passing of time can change, then the rest, which only a
        decision, a front-door answer, a switch, a restart or a reload changes. So between
        two keys with nothing but `observe` in between, the moving parts alone tell whether
        the keys are equal (`guardd replay` compares just those then).

        None: no active color, no probe of a color yet, a `stale_after` (the ages of
        readings), a verdict the policy would judge anew (a rule holds, an onset runs, the
        windows read otherwise than when it was kept). Reading the windows at `now` forgets
        their samples older than their span, as a decision would.
        """
        if active is None or self.policy.table.stale_after:
            return None
        windows = self.windows
        wa, ws = windows[active], windows["green" if active == "blue" else "blue"]
        if wa.last_probe_at is None or ws.last_probe_at is None:
            return None
        moving = self.moving_key(now, active, front_door)
        mine, theirs = moving[-2], moving[-1]
        policy = self.policy
        # Each kept entry holds the key it was kept under: the same entry, the same reading
        # of both windows by the rules (the windows' readings are in `moving`, and only a
        # decision or a switch changes what the policy keeps).
        ka = policy.kept(active, mine, theirs)
        if ka is None:
            return None
        ks = policy.kept(other(active), theirs, mine)
        if ks is None:
            return None
        fd = self.front_door
        raised = self._edges.raised
        return moving, (
            active,
            qos_locked,
            paused,
            self.spec,
            policy,
            self.probe_interval,
            self.hold,
            self.rolled_away_from,
            frozenset(raised) if raised else None,
            tuple(sorted(self._edges.quiet.items())) if self._edges.quiet else None,
            self.mismatch,
            self._mismatch_color,
            self._reapplied_at,
            self._reapply_failed,
            (fd.ok, fd.streak, fd.answers, fd.last_error) if front_door else None,
            # Each window (a new one is judged afresh); what the rules read is in `ka`/`ks`.
            wa,
            ws,
            ka,
            ks,
        )

    def moving_key(self, now: float, active: Color, front_door: bool) -> MovingKey:
        """The part of `repeat_key` that `observe` and the passing of time can change: whether
        an alert's episode waiting to end has waited long enough, whether `active` was seen
        healthy, the front door's staleness (when `front_door` is watched),
        each window's staleness at `now` and the runs of successes the front door is
        compared with, then what the rules read of each window (`active`'s, the other's: the
        last two items). Nothing else in `repeat_key` changes with them.
        """
        windows = self.windows
        wa, ws = windows[active], windows["green" if active == "blue" else "blue"]
        last_a, last_s = wa.last_probe_at, ws.last_probe_at
        stale = STALE_INTERVALS * self.probe_interval
        n = self.spec.consecutive_failures
        ca, cs = wa.consecutive_successes, ws.consecutive_successes
        edges = self._edges
        return (
            edges.ending(now) if edges.quiet else False,
            active in self.seen_healthy,
            self.front_door_stale(now) if front_door else None,
            last_a is None or now - last_a > stale,
            last_s is None or now - last_s > stale,
            ca >= n,
            ca > 0,
            cs >= n,
            cs > 0,
            wa.rules_key(now),
            ws.rules_key(now),
        )

    def decide(self, facts: Facts) -> Decision:
        """One decision tick."""
        decision = self._decide(facts)
        self.last_decision = decision
        return decision

    @property
    def starting(self) -> bool:
        """Whether a color has not been probed yet since this start."""
        return len(self._probed) < len(COLORS)

    def _decide(self, f: Facts) -> Decision:
        if self.starting:
            return Decision(State.STARTING, None)
        if f.rolling_back:
            return Decision(State.ROLLING_BACK, None)
        if not f.qos_locked:
            self.rolled_away_from = None
        if f.active is None:
            why = (
                "the switch target names neither blue nor green"
                if f.target_unreadable is None
                else f"the switch target cannot be read ({f.target_unreadable})"
            )
            hold = Hold(why, sticky=False)
            return Decision(State.HOLD, None, self._enter_hold(hold))
        if any(w.last_probe_at is None for w in self.windows.values()):
            # A color judged afresh (traffic moved to it, its probe URLs reloaded) has no
            # probe of its own yet: nothing is decided on an empty window until it has, and
            # the state is what the facts say (a rollback's guard window, not `starting`).
            return Decision(self._state(f, f.active, None), None)

        active = f.active
        self._readings = f.readings
        standby = other(active)
        # Each window read once for both judgements.
        mine, theirs = self.stats(active, f.now), self.stats(standby, f.now)
        verdict = self._judge(f, active, mine, theirs)
        # The standby is judged too (status and metrics show every rule on both colors);
        # its onsets are its own, and nothing is decided from them.
        self.verdicts = {active: verdict, standby: self._judge(f, standby, theirs, mine)}
        actions: list[Action] = self._signal_alerts(f, active, verdict)
        lost = self.protection_lost(active, f.now)
        if lost is not None:
            if self._edges.first(NO_TARGET, f.now):
                actions.append(
                    Alert(
                        None,
                        f"no safe rollback: {lost}; if {active} fails, guardd holds "
                        "instead of rolling back",
                    )
                )
        elif self.healthy(self.rollback_target(active), f.now) is True:
            # Over only once the target passes again and goes on passing for a window, so
            # a target hovering at the threshold, or so slow that it goes stale between
            # its answers, is one episode, not an alert per probe.
            self._edges.settle(f.now, NO_TARGET)
        else:
            self._edges.keep(NO_TARGET)
        if verdict.severity == "P2":
            if self._edges.first(f"p2:{verdict.evidence.rule}", f.now):
                actions.append(Alert("P2", verdict.reason, verdict.evidence))
        else:
            self._edges.settle(f.now, "p2:")

        blocked: str | None = None
        if verdict.failing:
            blocked, more = self._on_failing(f, active, verdict)
            actions.extend(more)
        else:
            self._edges.settle(f.now, "dry_run", "unproven:")
            # A P1 rule whose `for` started again once the P0 above it stopped still fails its
            # threshold: the hold lasts through it, one episode rather than two.
            # And only on the active color's own evidence: started again, guardd's windows
            # are empty, and a hold kept in state.json must not end (and be journaled anew
            # a moment later) because nothing has failed yet.
            if (
                self.hold is not None
                and not self.hold.sticky
                and self.hold.cause != "mismatch"
                and not verdict.failing_or_pending
                and self.vouched(active, f.now)
            ):
                self.hold = None
        if not any(isinstance(a, Rollback) for a in actions):
            actions.extend(self._watch_front_door(f, active))
        return Decision(self._state(f, active, verdict), verdict, tuple(actions), blocked)

    def _judge(self, f: Facts, color: Color, stats: WindowStats, standby: WindowStats) -> Verdict:
        return self.policy.evaluate(
            f.now,
            color,
            stats,
            standby,
            readings=f.readings,
            baselines=self.baseline,
        )

    def baseline(self, signal: str, color: Color) -> Mapping[str, float | None] | None:
        """The baseline statistics of `signal` for `color`, if one was taken."""
        return self.baselines.get(signal, {}).get(color)

    def traffic_moved(self, source: Color, target: Color, now: float) -> None:
        """Traffic left `source` for `target`: `source`'s last window is `target`'s baseline.

        Every signal with samples on `source` gives one (the probe included); a signal
        with none leaves `target`'s earlier baseline, if any, in place.
        """
        if source == target:
            return
        readings: dict[str, Reading | None] = {
            PROBE: probe_reading(self.stats(source, now), self.spec.window)
        }
        for name, by_color in self._readings.items():
            readings[name] = by_color.get(source)
        for name, reading in readings.items():
            if reading is not None and reading.samples > 0:
                self.baselines.setdefault(name, {})[target] = dict(reading.stats)

    def stale_signals(self, color: Color, now: float) -> list[str]:
        """The signals with a `stale_after` that have said nothing of `color` for longer,
        as of the readings of the last tick."""
        table = self.policy.table
        return [
            name
            for name in sorted(table.stale_after)
            if table.is_stale(name, self._readings.get(name, {}).get(color), now)
        ]

    def _signal_alerts(self, f: Facts, active: Color, verdict: Verdict) -> list[Action]:
        """Alerts about the rules themselves: a stale signal, a dry-run rule that would act.

        Each is raised once per episode (kept across restarts with the other edges).
        """
        actions: list[Action] = []
        table = self.policy.table
        raised = self._edges.raised
        if (
            not table.stale_after
            and not verdict.dry_runs
            and not (raised and any(k.startswith("dryrule:") for k in raised))
        ):
            return actions  # no signal can be stale, no dry-run rule would act or did
        stale = self.stale_signals(active, f.now)
        for name, limit in sorted(table.stale_after.items()):
            key = f"stale:{name}"
            if name in stale:
                if self._edges.first(key, f.now):
                    said = (
                        f"nothing from it about {active} for more than {limit:g}s"
                        if self._readings.get(name, {}).get(active) is not None
                        else f"it has no reading of {active}"
                    )
                    actions.append(
                        Alert(
                            None,
                            f"signal {name} is stale: {said}; its rules are inconclusive",
                        )
                    )
            else:
                self._edges.settle(f.now, key)
        would = {rule.name for rule, _ in verdict.dry_runs}
        for key in [k for k in self._edges.raised if k.startswith("dryrule:")]:
            if key.removeprefix("dryrule:") not in would:
                self._edges.settle(f.now, key)
        for rule, evidence in verdict.dry_runs:
            if self._edges.first(f"dryrule:{rule.name}", f.now):
                actions.append(Alert(rule.severity, _would(rule, evidence, self, active), evidence))
        return actions

    def _watch_front_door(self, f: Facts, active: Color) -> list[Action]:
        """Re-apply the switch target once when the front door and the probes disagree;
        hold and page if they still do after that.

        One episode lasts until they have agreed for `keep_firing_for` (the policy
        window), as `_Edges` has it: a front door that flaps between agreeing and not is
        re-applied (an nginx reload) and paged for once, not at every flap. Its hold lasts
        as long, but stops no rollback while they agree (`_on_failing`).
        """
        found = self.disagreement(f, active)
        if f.paused or self.spec.dry_run:
            # Shown, never acted on; a new episode (with its re-apply) opens on resume.
            self.mismatch, self._mismatch_color = found, None
            return []
        if found is None:
            if self.mismatch is not None and (
                self._mismatch_color != active or self._agrees(f, active)
            ):
                # Agreeing again: no longer a warning; the episode waits to end.
                self.mismatch = self._mismatch_color = None
            return [] if self.mismatch is not None else self._mismatch_settles(f.now, active)
        if self.mismatch is None or self._mismatch_color != active:
            self.mismatch, self._mismatch_color = found, active
            if self._edges.first(MISMATCH + active, f.now):
                self._reapplied_at, self._reapply_failed = self.front_door.answers, None
                return [
                    Alert(None, f"mismatch: {found}; re-applying the switch target ({active})"),
                    Reapply(active, found),
                ]
            # Back before its episode ended: re-applied already, and paged for.
        self.mismatch = found
        if self.front_door.answers - self._reapplied_at < self.spec.consecutive_failures:
            # The re-applied target has not been answered for long enough yet. (Nor has it
            # when the re-apply failed: holding at once would hold sooner in a run than
            # after a restart, whose front door counts its answers anew.)
            return []
        if self.hold is not None:
            # Already held for another reason, which says more; or for this mismatch, in
            # words that stand for the episode: a front door whose answers change (a 502,
            # a 503, a timeout; another color named) is not paged again for each of them.
            return []
        failed = self._reapply_failed
        hold = Hold(
            f"mismatch persists after re-applying {active}: {found}"
            if failed is None
            else f"mismatch persists, {failed}: {found}",  # never claiming a re-apply
            sticky=False,
            cause="mismatch",
        )
        return list(self._enter_hold(hold))

    def _mismatch_settles(self, now: float, active: Color) -> list[Action]:
        """The front door and the probes of `active` agree at `now`: end the mismatch's
        episode, and its hold, once they have agreed for long enough."""
        edges = self._edges
        if not (edges.raised and any(k.startswith(MISMATCH) for k in edges.raised)):
            return []
        edges.settle(now, MISMATCH)
        if any(k.startswith(MISMATCH) for k in edges.raised):
            return []  # not for long enough yet
        self._reapply_failed = None
        if self.hold is not None and self.hold.cause == "mismatch":
            self.hold = None
        return [Alert(None, f"the front door and the probes of {active} agree again")]

    def reapply_failed(self, why: str) -> None:
        """The `Reapply` the last decision asked for did not run, or failed (`why`: what
        the edge said, e.g. `re-applying blue failed at test: ...`): the hold that follows
        says so, never "after re-applying"."""
        if self.mismatch is not None:
            self._reapply_failed = why

    def _on_failing(
        self, f: Facts, active: Color, verdict: Verdict
    ) -> tuple[str | None, list[Action]]:
        assert verdict.severity in ("P0", "P1")  # noqa: S101 - guarded by verdict.failing
        severity: Severity = verdict.severity
        if f.paused:
            return "paused", []
        if self.hold is not None and (
            # A mismatch's hold stops a rollback only while they disagree: the front door
            # failing too now agrees that users are failing.
            self.hold.sticky or (self.hold.cause == "mismatch" and self.mismatch is not None)
        ):
            return "hold", []
        target = self.rollback_target(active)
        if f.front_door_watched and active not in self.seen_healthy:
            # Never seen healthy: the probe itself may be wrong (a typo in the URL). Only
            # the front door failing too proves that production is really failing.
            view = self.front_door_view(f)
            if view is not False:
                if view is True and self._edges.first(f"unproven:{active}", f.now):
                    return "front_door", [
                        Alert(
                            severity,
                            f"probe of {active} fails but the front door serves fine: "
                            f"check `upstreams.{active}.url`; not rolling back",
                            verdict.evidence,
                        )
                    ]
                return "front_door", []
        if self.spec.dry_run:
            if self._edges.first("dry_run", f.now):
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
        if self.starting:
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
        # A color whose probes stopped coming back (an upstream that accepts and never
        # answers, under a long probe.timeout) is not known to serve: never `steady`; nor
        # one whose rule held before a restart and cannot be judged again yet.
        if (
            window.consecutive_failures > 0
            or self.is_stale(active, f.now)
            or self.policy.table.carrying(active)
            or (
                verdict is not None
                and verdict.evidence.color == active
                and (verdict.severity is not None or verdict.pending is not None)
            )
        ):
            return State.DEGRADED
        return State.STEADY

    def guard_window_passed(self) -> None:
        """The guard window after the last rollback passed, its SLOs held: the color rolled
        away from may be rolled back to again (the anti-flap hold lasts that window, not
        whatever QoS lock is held after it: an operator's freeze blocks deploys, and must
        not keep traffic on a failing color)."""
        self.rolled_away_from = None

    def rollback_succeeded(self, source: Color) -> None:
        """The switch away from `source` is done and verified."""
        self.rolled_away_from = source
        self.hold = None
        # The target's onsets go; the source's stay, so that its rules (shown in status,
        # never decided from while it is the standby) keep the onset the rollback came of.
        self.policy.reset(other(source))
        self._edges.clear("dry_run", "p2:")

    def rollback_failed(
        self, reason: str, evidence: Evidence | None, severity: Severity | None
    ) -> Hold:
        """The switch failed and was undone: hold until an operator acts."""
        self.hold = Hold(reason, sticky=True, evidence=evidence, severity=severity)
        return self.hold

    def hold_until_resumed(self, reason: str) -> Hold:
        """Hold for `reason` until an operator acts (`clear_hold`): guardd cannot tell
        whether deciding alone is what was wanted (its saved state is lost)."""
        self.hold = Hold(reason, sticky=True)
        return self.hold

    def clear_hold(self) -> None:
        """An operator acted (resume, switch, rollback): automatic decisions may go on."""
        self.hold = None
        # A mismatch that still stands is found, re-applied and held for afresh.
        self._edges.clear("dry_run", MISMATCH)
        self.mismatch = self._mismatch_color = self._reapply_failed = None

    def switched(self) -> None:
        """Traffic moved (or was found moved): earlier front-door answers are old news."""
        self.front_door.restart()
        self._edges.clear(MISMATCH)
        self.mismatch = self._mismatch_color = self._reapply_failed = None
        if self.hold is not None and self.hold.cause == "mismatch":
            self.hold = None
