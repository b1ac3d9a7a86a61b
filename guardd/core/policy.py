"""The guard's policy: `[policy]` and `[[rules]]` as one rule table over the signals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from guardd.core.rules import Baselines, Rule, RuleTable, Verdict, builtin_rules
from guardd.core.signals import PROBE, Reading
from guardd.core.types import Color, other
from guardd.core.window import ProbeKey, WindowStats

__all__ = ["Policy", "PolicySpec", "Verdict", "probe_key", "probe_reading", "spec_rules"]


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """The thresholds of docs/contract.md §2 `[policy]`, in seconds and ratios."""

    rollback_to: str = "previous"
    consecutive_failures: int = 3
    window: float = 60.0
    min_samples: int = 5
    p0_error_ratio: float = 0.50
    p1_error_ratio: float = 0.10
    p1_latency: float = 30.0
    p1_sustain: float = 120.0
    p2_error_ratio: float = 0.03
    p2_latency: float = 10.0
    latency_regression: float = 0.0
    promote_successes: int = 5
    max_rollbacks: int = 3
    budget_window: float = 3600.0
    dry_run: bool = False
    # `policy.builtin_rules = false`: the rules above are not in the table; `[[rules]]` is.
    builtin_rules: bool = True
    # `[[rules]]`, compiled, in table order; they follow the built-in rules.
    rules: tuple[Rule, ...] = ()
    # Each signal's `stale_after` (s); a signal not named here is never stale.
    stale_after: Mapping[str, float] = field(default_factory=dict)


def probe_key(stats: WindowStats | None) -> ProbeKey | None:
    """What the rules can read of a probe window (`probe_reading` but for `last_at`)."""
    return None if stats is None else stats.rules_key()


class Policy:
    """The rule table of one guard: `[policy]`'s built-in rules, then `[[rules]]`.

    Remembers, per rule and color, since when each condition has held (the `for`).

    A quiet verdict (no rule holds, so no onset and no `now` enters it) is kept per color
    and given again while the probe windows read the same, when the rules read nothing
    else: the same inputs give the same verdict, without judging every rule again.
    """

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.table = RuleTable(spec_rules(spec), spec.stale_after)
        # Only rules that read nothing but the probe window (no other signal, no
        # baseline, no staleness, which depend on more than the window) may be kept.
        self._keeps = PROBE not in self.table.stale_after and all(
            r.signal == PROBE and r.op != "above_baseline" for r in self.table.rules
        )
        # The standby's window enters a verdict only through `above_standby` rules.
        self._reads_standby = any(r.op == "above_standby" for r in self.table.rules)
        self._quiet: dict[Color, tuple[tuple[ProbeKey | None, ...], Verdict]] = {}
        self._readings: dict[Color, tuple[WindowStats, Reading]] = {}

    def reset(self, color: Color) -> None:
        """Forget the sustained-condition onsets of `color`, which traffic moved to."""
        self.table.reset(color)
        self._quiet.clear()

    def evaluate(
        self,
        now: float,
        color: Color,
        active: WindowStats,
        standby: WindowStats | None,
        *,
        readings: Mapping[str, Mapping[Color, Reading]] | None = None,
        baselines: Baselines | None = None,
    ) -> Verdict:
        """Judge `color` at monotonic `now` (s) on every rule.

        `active` is the probe window of `color`, `standby` the other color's (read by
        `latency_regression`); `readings` holds the other signals' readings by name and
        color, as the edges took them for this tick.
        """
        key: tuple[ProbeKey | None, ...] = ()
        if self._keeps:
            key = self._key(active, standby)
            kept = self._quiet.get(color)
            if kept is not None and kept[0] == key and not self.table.onsets(color):
                return kept[1]
        probe = {color: self._probe_reading(color, active)}
        if standby is not None:
            probe[other(color)] = self._probe_reading(other(color), standby)
        signals = readings or {}

        def read(signal: str, c: Color) -> Reading | None:
            if signal == PROBE:
                return probe.get(c)
            return signals.get(signal, {}).get(c)

        kwargs = {} if baselines is None else {"baselines": baselines}
        verdict = self.table.evaluate(now, color, other(color), read, **kwargs)
        if self._keeps and _quiet(verdict):
            self._quiet[color] = (key, verdict)
        else:
            self._quiet.pop(color, None)
        return verdict

    def _key(self, active: WindowStats, standby: WindowStats | None) -> tuple[ProbeKey | None, ...]:
        return (probe_key(active), probe_key(standby) if self._reads_standby else None)

    def kept(
        self, color: Color, active: ProbeKey | None, standby: ProbeKey | None
    ) -> tuple[object, Verdict] | None:
        """What `evaluate` keeps for `color` and would give again without judging any rule
        (so whatever `now`), as (its key, the verdict), when the windows read `active` and
        `standby` (`probe_key` of each); None when it would judge (nothing kept, windows
        that read otherwise, an onset, rules that read more than the windows)."""
        if not self._keeps:
            return None
        kept = self._quiet.get(color)
        if (
            kept is None
            or kept[0] != (active, standby if self._reads_standby else None)
            or self.table.onsets(color)
        ):
            return None
        return kept

    def _probe_reading(self, color: Color, stats: WindowStats) -> Reading:
        # A window's statistics are one object until it changes: so is its reading.
        made = self._readings.get(color)
        if made is None or made[0] is not stats:
            made = self._readings[color] = (stats, probe_reading(stats, self.spec.window))
        return made[1]


def _quiet(verdict: Verdict) -> bool:
    """Whether no rule held: every rule `ok` or `inconclusive`, so no onset was kept and
    nothing in the verdict depends on the time it was taken."""
    return (
        verdict.severity is None
        and verdict.pending is None
        and not verdict.dry_runs
        and all(st.state in ("ok", "inconclusive") for st in verdict.states)
    )


def spec_rules(spec: PolicySpec) -> tuple[Rule, ...]:
    """The rules a policy stands for: the built-in rules (unless turned off), then its own."""
    builtin = (
        builtin_rules(
            consecutive_failures=spec.consecutive_failures,
            min_samples=spec.min_samples,
            p0_error_ratio=spec.p0_error_ratio,
            p1_error_ratio=spec.p1_error_ratio,
            p1_latency_s=spec.p1_latency,
            p1_sustain_s=spec.p1_sustain,
            p2_error_ratio=spec.p2_error_ratio,
            p2_latency_s=spec.p2_latency,
            latency_regression=spec.latency_regression,
        )
        if spec.builtin_rules
        else ()
    )
    return builtin + spec.rules


def probe_reading(stats: WindowStats, window_s: float) -> Reading:
    """The `probe` signal's reading of one color: its probe window as the rules see it."""
    return Reading(
        samples=stats.samples,
        window_s=window_s,
        stats={
            "consecutive_failures": stats.consecutive_failures,
            "error_ratio": stats.error_ratio,
            "p50_ms": stats.p50_ms,
            "p95_ms": stats.p95_ms,
            "samples": stats.samples,
        },
        last_at=stats.last_probe_at,
        detail={} if stats.last_error is None else {"last_error": stats.last_error},
    )
