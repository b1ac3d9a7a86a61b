"""The rule table: one function judges every rule, whatever signal it reads.

A rule is data (`Rule`): a signal, one of its statistics, a threshold, a severity, how
long the condition must hold (`for`, as in a Prometheus alerting rule) and how many
samples it needs before it may judge at all (`min_samples`). `RuleTable.evaluate` reads
one `Reading` per signal for a color and gives a `Verdict` with each rule's state.

The `[policy]` keys of docs/contract.md §2 are shorthand for the built-in rules of
`builtin_rules`, evaluated by the same code: a config without `[[rules]]` decides exactly
as guardd did before rules were data.

Evaluation order, which the built-in rules depend on (docs/contract.md §2 "Rules"):
rules are taken by severity, P0 then P1 then P2, and within a severity in table order.
The first rule of a severity whose condition has held for its `for` fires, and the
rules of lower severities are not judged on that tick (their `for` starts again when
they next hold). A rule that cannot judge (fewer than `min_samples`, its statistic
unknown, its signal stale or absent) is *inconclusive*: never read as healthy, never
firing, and its `for` starts again.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from guardd.core.signals import PROBE, Reading
from guardd.core.types import Color, Evidence, Severity

#: How a rule compares its statistic (docs/contract.md §2 `[[rules]]`).
#: `above`: value >= threshold; `below`: value <= threshold; `above_baseline`: value >=
#: threshold x the color's baseline of the same statistic; `above_standby`: value >
#: threshold x the other color's value (the `policy.latency_regression` rule).
Op = Literal["above", "below", "above_baseline", "above_standby"]
#: The same, as values: exactly one of them is a rule's threshold key.
OPS: Final[tuple[Op, ...]] = typing.get_args(Op)
SEVERITIES: Final[tuple[Severity, ...]] = ("P0", "P1", "P2")

RuleStateName = Literal["ok", "pending", "firing", "inconclusive"]
#: The names of the rules `[policy]` stands for.
BUILTIN_NAMES: Final = frozenset(
    {
        "consecutive_failures", "p0_error_ratio", "p1_error_ratio", "p1_latency",
        "latency_regression", "p2_error_ratio", "p2_latency",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the rule table.

    `threshold` is in the statistic's own unit (a ratio, milliseconds, a count) or, for
    `above_baseline`/`above_standby`, a factor. `for_s` is None when the rule has no
    `for` (it fires on the first tick its condition holds, and its evidence carries no
    `sustained_s`). `builtin` marks the rules `[policy]` stands for: their evidence keeps
    the shape it always had (no `signal`/`stat` keys).
    """

    name: str
    signal: str
    stat: str
    severity: Severity
    op: Op
    threshold: float | int
    for_s: float | None = None
    min_samples: int = 0
    dry_run: bool = False
    builtin: bool = False

    @property
    def rolls_back(self) -> bool:
        """Whether firing this rule calls for a rollback (P0, P1) rather than an alert."""
        return self.severity in ("P0", "P1")

    def describe(self) -> str:
        """`error_ratio >= 0.05`-style text for status and reasons."""
        t = _plain(self.threshold)
        return {
            "above": f"{self.stat} >= {t}",
            "below": f"{self.stat} <= {t}",
            "above_baseline": f"{self.stat} >= {t}x baseline",
            "above_standby": f"{self.stat} > {t}x standby",
        }[self.op]


@dataclass(frozen=True, slots=True)
class RuleState:
    """What one rule says about one color at one tick (status, metrics, `--json`).

    `since` is the monotonic onset of a pending or firing condition; `why` says what an
    inconclusive rule lacks (`3 of 5 samples`, `signal stale`, `no baseline`), or why a
    rule whose condition holds is only `pending`, with no onset: a rule of a higher
    severity fired first (`outranked by P0 5xx-p0`), and its `for` starts when that stops.
    """

    rule: str
    severity: Severity
    state: RuleStateName
    value: float | int | None
    samples: int
    min_samples: int
    since: float | None = None
    why: str | None = None
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the rules say about one color now.

    `severity` is None when no rule fires; `pending` is the first rule whose condition
    holds but not yet for its `for`; `insufficient_data` is true when nothing fires and
    some rule could not judge. `dry_runs` holds the evidence of `dry_run` rules that would
    fire (never acted on); `states` every rule's state, in table order.
    """

    severity: Severity | None
    evidence: Evidence
    pending: Evidence | None = None
    insufficient_data: bool = False
    dry_runs: tuple[tuple[Rule, Evidence], ...] = ()
    states: tuple[RuleState, ...] = ()
    # The rule that fired, if one did.
    rule: Rule | None = None

    @property
    def failing(self) -> bool:
        """Whether the verdict calls for a rollback (P0 or P1)."""
        return self.severity in ("P0", "P1")

    @property
    def failing_or_pending(self) -> bool:
        """Whether a P0/P1 rule fires, or its condition holds and waits for its `for`
        (dry runs aside): the color still fails a threshold that calls for a rollback, so a
        hold, and the QoS lock a hold took, do not end on it (fail closed)."""
        return self.failing or any(
            st.state == "pending" and st.severity in ("P0", "P1") and not st.dry_run
            for st in self.states
        )

    @property
    def reason(self) -> str:
        """A one-line human account of the verdict."""
        e = self.evidence
        if self.severity is None:
            return "healthy" if not self.insufficient_data else "insufficient data"
        rule = self.rule
        if rule is None or rule.builtin:
            # The built-in rules' words, as they always were (journal lines, notifications).
            return f"{self.severity} {e.rule}: {_fmt(e.value)} >= {_fmt(e.threshold)} on {e.color}"
        v, t = _fmt(e.value), _fmt(e.threshold)
        said = {
            "above": f"{rule.stat} {v} >= {t}",
            "below": f"{rule.stat} {v} <= {t}",
            "above_baseline": f"{rule.stat} at {v}x its baseline (>= {t}x)",
            "above_standby": f"{rule.stat} at {v}x the standby's (> {t}x)",
        }[rule.op]
        return f"{self.severity} {e.rule}: {said} on {e.color}"


def _plain(v: float | int) -> str:
    # 10000 rather than 1e+04: a threshold is read back against the config.
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _fmt(v: float | int | None) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def builtin_rules(
    *,
    consecutive_failures: int,
    min_samples: int,
    p0_error_ratio: float,
    p1_error_ratio: float,
    p1_latency_s: float,
    p1_sustain_s: float,
    p2_error_ratio: float,
    p2_latency_s: float,
    latency_regression: float,
) -> tuple[Rule, ...]:
    """The rules the `[policy]` keys stand for, over the `probe` signal, in their order.

    The severity table is the runbooks' (5xx > 50 % P0, 10-50 % P1, 3-10 % P2; latency
    > 30 s P1, 10-30 s P2), with a run of `consecutive_failures` as the fast P0 path that
    needs no minimum of samples. Latencies are compared in milliseconds.
    """
    p = PROBE
    rules = [
        Rule("consecutive_failures", p, "consecutive_failures", "P0", "above",
             consecutive_failures, builtin=True),
        Rule("p0_error_ratio", p, "error_ratio", "P0", "above", p0_error_ratio,
             min_samples=min_samples, builtin=True),
        Rule("p1_error_ratio", p, "error_ratio", "P1", "above", p1_error_ratio,
             for_s=p1_sustain_s, min_samples=min_samples, builtin=True),
        Rule("p1_latency", p, "p95_ms", "P1", "above", p1_latency_s * 1000.0,
             for_s=p1_sustain_s, min_samples=min_samples, builtin=True),
    ]  # fmt: skip
    if latency_regression > 0:
        rules.append(
            Rule("latency_regression", p, "p95_ms", "P1", "above_standby", latency_regression,
                 for_s=p1_sustain_s, min_samples=min_samples, builtin=True)
        )  # fmt: skip
    rules += [
        Rule("p2_error_ratio", p, "error_ratio", "P2", "above", p2_error_ratio,
             min_samples=min_samples, builtin=True),
        Rule("p2_latency", p, "p95_ms", "P2", "above", p2_latency_s * 1000.0,
             min_samples=min_samples, builtin=True),
    ]  # fmt: skip
    return tuple(rules)


#: Where a rule reads: `(signal, color) -> Reading | None` (None: the signal has nothing).
Readings = Callable[[str, Color], Reading | None]
#: The baseline of a signal for a color: its statistics when traffic last left the other color.
Baselines = Callable[[str, Color], Mapping[str, float | None] | None]


def _no_baseline(_signal: str, _color: Color) -> None:
    return None


@dataclass(slots=True)
class _Judged:
    rule: Rule
    reading: Reading | None
    value: float | int | None
    holds: bool
    why: str | None  # set when inconclusive
    detail: Mapping[str, Any] | None = None  # what a firing rule adds to its evidence


class RuleTable:
    """The rule table and the onsets of the conditions that hold, per rule and color.

    `stale_after` maps a signal name to the age (s) past which its readings are stale.
    """

    def __init__(self, rules: Iterable[Rule], stale_after: Mapping[str, float] | None = None):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.stale_after: Mapping[str, float] = dict(stale_after or {})
        self._since: dict[tuple[str, Color], float] = {}
        # Onsets of an earlier run (`carry`), each with the monotonic time it lapses:
        # taken up by the first tick on which its rule holds, dropped by one on which it
        # is judged and does not.
        self._carried: dict[tuple[str, Color], tuple[float, float]] = {}
        #: The monotonic `now` of the last `evaluate`: when the onsets were last seen to hold.
        self.judged_at = -math.inf
        # With one state per rule name, a tick on which no rule holds needs none of the
        # severity order: every rule is `ok` or `inconclusive` and nothing fires.
        self._distinct = len({r.name for r in self.rules}) == len(self.rules)
        # Per rule (by index) and color: the key and the state `_quiet` made last.
        self._kept_states: dict[tuple[int, Color], tuple[tuple[Any, ...], RuleState]] = {}

    def reset(self, color: Color) -> None:
        """Forget the onsets of `color`, which traffic just moved to: what held on it as the
        standby says nothing of it serving. The other color's onsets stay: its conditions
        have held since then, and `status` says since when."""
        for key in [k for k in self._since if k[1] == color]:
            del self._since[key]
        for key in [k for k in self._carried if k[1] == color]:
            del self._carried[key]

    def onsets(self, color: Color) -> bool:
        """Whether any rule has an onset on `color` (its condition held at its last judging),
        or one carried over from an earlier run."""
        return any(c == color for _, c in self._since) or self.carrying(color)

    def carrying(self, color: Color) -> bool:
        """Whether an onset of an earlier run waits on `color` for its rule to judge."""
        return bool(self._carried) and any(c == color for _, c in self._carried)

    def pending_onsets(self) -> dict[tuple[str, Color], float]:
        """Each (rule name, color) whose condition holds, with its monotonic onset (s)."""
        return dict(self._since)

    def carry(self, onsets: Mapping[tuple[str, Color], tuple[float, float]]) -> None:
        """Take up the onsets of an earlier run (a restart's, a reload's): per (rule name,
        color), (monotonic onset, monotonic time it lapses). Each continues on the first
        tick its rule holds before it lapses; a tick on which its rule is judged and does
        not hold drops it. (How the `for` of Prometheus' alerting rules survives a restart:
        https://prometheus.io/docs/prometheus/latest/configuration/alerting_rules/.)"""
        names = {r.name for r in self.rules}
        self._carried.update((k, v) for k, v in onsets.items() if k[0] in names)

    def adopt(self, old: RuleTable) -> None:
        """On a reload: keep the onsets of `old` (carried ones too) whose rule is unchanged
        (same name, same definition); a rule changed in any way starts its `for` afresh."""
        rules = set(self.rules)
        same = {r.name for r in old.rules if r in rules}
        self._since = {k: v for k, v in old._since.items() if k[0] in same}
        self._carried = {k: v for k, v in old._carried.items() if k[0] in same}

    def _onset(self, key: tuple[str, Color], now: float) -> float:
        since = self._since.get(key)
        if since is None:
            carried = self._carried.pop(key, None) if self._carried else None
            since = carried[0] if carried is not None and now <= carried[1] else now
            self._since[key] = since
        return since

    def _ended(self, j: _Judged, color: Color) -> None:
        # A rule judged not to hold: its onset ends, and so does one carried over (a rule
        # that could not judge keeps a carried onset until it can, or it lapses).
        key = (j.rule.name, color)
        self._since.pop(key, None)
        if self._carried and j.why is None:
            self._carried.pop(key, None)

    def is_stale(self, signal: str, reading: Reading | None, now: float) -> bool:
        """Whether `signal` has given nothing for longer than its `stale_after`."""
        limit = self.stale_after.get(signal)
        if limit is None:
            return False
        return reading is None or reading.last_at is None or now - reading.last_at > limit

    def evaluate(
        self,
        now: float,
        color: Color,
        standby: Color,
        readings: Readings,
        baselines: Baselines = _no_baseline,
    ) -> Verdict:
        """Judge every rule on `color` at monotonic `now` (s).

        `standby` is the other color, read by `above_standby` rules. The probe reading
        must exist: the verdict's evidence when nothing fires is built from it.
        """
        self.judged_at = now
        judge = self._judge
        judged = [judge(r, now, color, standby, readings, baselines=baselines) for r in self.rules]
        if self._distinct and not any(j.holds for j in judged):
            return self._quiet(judged, color, readings)
        states: dict[str, RuleState] = {}
        fired: tuple[Rule, Evidence] | None = None
        pending: Evidence | None = None
        for severity in SEVERITIES:
            level = [j for j in judged if j.rule.severity == severity and not j.rule.dry_run]
            if fired is not None:
                outranked = f"outranked by {fired[0].severity} {fired[0].name}"
                for j in level:
                    self._since.pop((j.rule.name, color), None)
                    states[j.rule.name] = self._state(j, None, outranked=outranked)
                continue
            for j in level:
                if not j.holds:
                    self._ended(j, color)
            for j in level:
                if not j.holds:
                    states[j.rule.name] = self._state(j, None)
                    continue
                if fired is not None:
                    # A rule of this severity fired first: this one keeps an onset it
                    # already had, but a new one starts only on a tick it is judged.
                    # Without one it shows as an outranked rule does, never as firing
                    # with no time it began.
                    had = self._since.get((j.rule.name, color))
                    states[j.rule.name] = (
                        self._state(j, None, outranked=f"outranked by {severity} {fired[0].name}")
                        if had is None
                        else self._state(j, had, firing=now - had >= (j.rule.for_s or 0.0))
                    )
                    continue
                since = self._onset((j.rule.name, color), now)
                evidence = self._evidence(j, color, now - since)
                if now - since >= (j.rule.for_s or 0.0):
                    fired = (j.rule, evidence)
                    states[j.rule.name] = self._state(j, since, firing=True)
                else:
                    pending = pending or evidence
                    states[j.rule.name] = self._state(j, since)
        dry_runs = self._dry_runs(judged, color, now, states)
        ordered = tuple(states[r.name] for r in self.rules)
        if fired is not None:
            rule, evidence = fired
            return Verdict(
                rule.severity,
                evidence,
                pending=pending,
                dry_runs=dry_runs,
                states=ordered,
                rule=rule,
            )
        lacking, evidence = _quiet_evidence(judged, readings(PROBE, color), color)
        return Verdict(
            None,
            evidence,
            pending=pending,
            insufficient_data=lacking is not None,
            dry_runs=dry_runs,
            states=ordered,
        )

    def _quiet(self, judged: list[_Judged], color: Color, readings: Readings) -> Verdict:
        # What the full walk of `evaluate` comes to when no rule holds: every onset of
        # `color` ends, each rule is `ok` or `inconclusive`, nothing is pending or fires.
        if self._since or self._carried:
            for j in judged:
                self._ended(j, color)
        lacking, evidence = _quiet_evidence(judged, readings(PROBE, color), color)
        # A rule's state without an onset is its value, samples and why: the one made
        # last time is given again while those are the same (and so is the value's type
        # and, for a float, its sign: 0 and 0.0 and -0.0 show differently).
        kept = self._kept_states
        states: list[RuleState] = []
        for index, j in enumerate(judged):
            v = j.value
            key = (
                v.__class__,
                v,
                math.copysign(1.0, v) if isinstance(v, float) else 0.0,
                j.reading.samples if j.reading is not None else 0,
                j.why,
            )
            made = kept.get((index, color))
            if made is None or made[0] != key:
                made = kept[index, color] = (key, self._state(j, None))
            states.append(made[1])
        return Verdict(
            None,
            evidence,
            insufficient_data=lacking is not None,
            states=tuple(states),
        )

    def _dry_runs(
        self, judged: list[_Judged], color: Color, now: float, states: dict[str, RuleState]
    ) -> tuple[tuple[Rule, Evidence], ...]:
        # Judged like the others, with their own onsets, but never part of the verdict.
        found: list[tuple[Rule, Evidence]] = []
        for j in judged:
            if not j.rule.dry_run:
                continue
            if not j.holds:
                self._ended(j, color)
                states[j.rule.name] = self._state(j, None)
                continue
            since = self._onset((j.rule.name, color), now)
            firing = now - since >= (j.rule.for_s or 0.0)
            states[j.rule.name] = self._state(j, since, firing=firing)
            if firing:
                found.append((j.rule, self._evidence(j, color, now - since)))
        return tuple(found)

    def _judge(
        self,
        rule: Rule,
        now: float,
        color: Color,
        standby: Color,
        readings: Readings,
        *,
        baselines: Baselines,
    ) -> _Judged:
        reading = readings(rule.signal, color)
        if reading is None:
            return _Judged(rule, None, None, False, "no data")
        if self.is_stale(rule.signal, reading, now):
            return _Judged(rule, reading, None, False, "signal stale")
        if reading.samples < rule.min_samples:
            return _Judged(
                rule, reading, None, False, f"{reading.samples} of {rule.min_samples} samples"
            )
        value = reading.stats.get(rule.stat)
        if value is None:
            return _Judged(rule, reading, None, False, f"no {rule.stat}")
        if rule.op == "above":
            return _Judged(rule, reading, value, value >= rule.threshold, None)
        if rule.op == "below":
            return _Judged(rule, reading, value, value <= rule.threshold, None)
        if rule.op == "above_baseline":
            base = baselines(rule.signal, color)
            ref = base.get(rule.stat) if base is not None else None
            if ref is None or ref <= 0:
                return _Judged(rule, reading, value, False, "no baseline")
            ratio = value / ref
            return _Judged(
                rule, reading, ratio, ratio >= rule.threshold, None,
                {f"baseline_{rule.stat}": round(ref, 4), rule.stat: _round(value)},
            )  # fmt: skip
        # above_standby: the other color must have enough samples to be compared with;
        # until it has, the comparison simply does not hold (as `latency_regression` was).
        other = readings(rule.signal, standby)
        ref = other.stats.get(rule.stat) if other is not None else None
        if other is None or other.samples < rule.min_samples or not ref or not value:
            return _Judged(rule, reading, None, False, None)
        ratio = value / ref
        return _Judged(
            rule, reading, ratio, value > rule.threshold * ref, None,
            {f"standby_{rule.stat}": round(ref, 4)},
        )  # fmt: skip

    @staticmethod
    def _state(
        j: _Judged, since: float | None, *, firing: bool = False, outranked: str | None = None
    ) -> RuleState:
        # `outranked`: why a rule was not judged this tick (a higher severity fired first).
        # Its condition may hold, but it neither fires nor has an onset: `pending`, `why`.
        r = j.rule
        why = j.why
        if why is not None:
            name: RuleStateName = "inconclusive"
        elif not j.holds:
            name = "ok"
        elif outranked is not None:
            name, why = "pending", outranked
        elif firing or not r.for_s:
            name = "firing"
        else:
            name = "pending"
        return RuleState(
            r.name,
            r.severity,
            name,
            _round(j.value),
            j.reading.samples if j.reading is not None else 0,
            r.min_samples,
            since,
            why,
            r.dry_run,
        )

    @staticmethod
    def _evidence(j: _Judged, color: Color, sustained: float) -> Evidence:
        assert j.reading is not None  # noqa: S101 - only judged readings hold
        r = j.rule
        extra: dict[str, Any] = {} if r.builtin else {"signal": r.signal, "stat": r.stat}
        if j.detail:
            extra.update(j.detail)
        evidence = _base_evidence(
            j.reading, r, color, name=r.name, threshold=r.threshold, value=j.value, extra=extra
        )
        if r.for_s is not None:
            evidence = replace(
                evidence,
                extra={**evidence.extra, "sustained_s": round(sustained, 3), "sustain_s": r.for_s},
            )
        return evidence


def _quiet_evidence(
    judged: list[_Judged], probe: Reading | None, color: Color
) -> tuple[_Judged | None, Evidence]:
    """The evidence of a tick on which nothing fired: the first rule that could not
    judge (preferring one whose signal gave a reading), else the probe's healthy window."""
    if probe is None:  # pragma: no cover - the guard always has a probe reading
        raise ValueError("the probe reading is missing")
    unjudged = [j for j in judged if j.why is not None and not j.rule.dry_run]
    lacking = next((j for j in unjudged if j.reading is not None), None)
    lacking = lacking or next(iter(unjudged), None)
    if lacking is None:
        return None, _base_evidence(
            probe, None, color, name="healthy", threshold=None,
            value=probe.stats.get("error_ratio"),
        )  # fmt: skip
    reading = lacking.reading or probe
    evidence = _base_evidence(
        reading, lacking.rule, color, name="insufficient_data",
        threshold=lacking.rule.min_samples,
        value=lacking.reading.samples if lacking.reading is not None else 0,
        extra=None if lacking.rule.builtin else {"why": lacking.why},
    )  # fmt: skip
    return lacking, evidence


def _base_evidence(
    reading: Reading,
    rule: Rule | None,
    color: Color,
    *,
    name: str,
    threshold: float | int | None,
    value: float | int | None,
    extra: Mapping[str, Any] | None = None,
) -> Evidence:
    extra = dict(extra or {})
    last_error = reading.detail.get("last_error")
    if last_error is not None and name not in ("healthy", "insufficient_data"):
        # What the color last said when it failed: `HTTP 503 status=DOWN db=DOWN`.
        extra["last_error"] = last_error
    for key, v in reading.detail.items():
        if key != "last_error":
            extra.setdefault(key, v)
    if rule is not None and not rule.builtin and name == "insufficient_data":
        extra.setdefault("signal", rule.signal)
    stats = reading.stats
    is_probe = (rule is None or rule.signal == PROBE) and "consecutive_failures" in stats
    cf = stats.get("consecutive_failures") if is_probe else None
    return Evidence(
        rule=name,
        threshold=threshold,
        value=value,
        samples=reading.samples,
        color=color,
        consecutive_failures=int(cf) if cf is not None else None,
        error_ratio=stats.get("error_ratio") if is_probe else None,
        p50_ms=stats.get("p50_ms") if is_probe else None,
        p95_ms=stats.get("p95_ms") if is_probe else None,
        window_s=reading.window_s,
        extra=extra,
    )


def _round(v: float | int | None) -> float | int | None:
    return round(v, 4) if isinstance(v, float) else v
