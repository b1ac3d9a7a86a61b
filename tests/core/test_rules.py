"""The rule table, row by row: thresholds, `for`, inconclusive, stale, dry run, P2."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from guardd.core.machine import Action, Alert, Facts, GuardMachine, Rollback
from guardd.core.policy import PolicySpec
from guardd.core.rules import Rule, RuleTable, Verdict
from guardd.core.signals import Reading
from guardd.core.types import COLORS, Color, Outcome


def reading(
    n: int, last_at: float | None = 0.0, window_s: float = 60.0, **stats: float | None
) -> Reading:
    return Reading(samples=n, window_s=window_s, stats=stats, last_at=last_at)


PROBE_OK = reading(10, consecutive_failures=0, error_ratio=0.0, p50_ms=5.0, p95_ms=9.0, samples=10)


def judge(
    table: RuleTable,
    now: float,
    traffic: Mapping[Color, Reading | None],
    baselines: Mapping[Color, Mapping[str, float | None]] | None = None,
    color: Color = "green",
) -> Verdict:
    def read(signal: str, c: Color) -> Reading | None:
        return PROBE_OK if signal == "probe" else traffic.get(c)

    def base(signal: str, c: Color) -> Mapping[str, float | None] | None:
        return (baselines or {}).get(c) if signal == "traffic" else None

    return table.evaluate(now, color, "blue" if color == "green" else "green", read, base)


def rule(**kw: object) -> Rule:
    fields: dict[str, object] = {
        "name": "traffic.error_ratio",
        "signal": "traffic",
        "stat": "error_ratio",
        "severity": "P0",
        "op": "above",
        "threshold": 0.05,
        "min_samples": 50,
    }
    fields.update(kw)
    return Rule(**fields)  # type: ignore[arg-type]


# (rule, value of the stat, fires?)
THRESHOLDS = [
    (rule(op="above", threshold=0.05), 0.19, True),
    (rule(op="above", threshold=0.05), 0.05, True),  # at the threshold: "at or above"
    (rule(op="above", threshold=0.05), 0.049, False),
    (rule(op="below", threshold=10.0, stat="rps", name="traffic.rps"), 2.0, True),
    (rule(op="below", threshold=10.0, stat="rps", name="traffic.rps"), 10.0, True),
    (rule(op="below", threshold=10.0, stat="rps", name="traffic.rps"), 10.5, False),
]


@pytest.mark.parametrize(("r", "value", "fires"), THRESHOLDS)
def test_above_and_below(r: Rule, value: float, fires: bool) -> None:
    table = RuleTable([r])
    verdict = judge(table, 0.0, {"green": reading(100, **{r.stat: value})})
    assert (verdict.severity == "P0") is fires
    state = verdict.states[0]
    assert state.state == ("firing" if fires else "ok")
    if fires:
        e = verdict.evidence.to_dict()
        assert e["rule"] == r.name and e["signal"] == "traffic" and e["stat"] == r.stat
        assert e["threshold"] == r.threshold and e["value"] == value and e["samples"] == 100
        # A traffic rule's evidence never shows the probe's figures as its own.
        assert "consecutive_failures" not in e and "p95_ms" not in e


def test_for_must_hold_the_whole_time_and_restarts_when_it_stops() -> None:
    table = RuleTable([rule(severity="P1", for_s=60.0)])
    bad, good = reading(100, error_ratio=0.2), reading(100, error_ratio=0.0)
    assert judge(table, 0.0, {"green": bad}).severity is None
    v = judge(table, 59.0, {"green": bad})
    assert v.severity is None and v.pending is not None
    assert v.states[0].state == "pending" and v.states[0].since == 0.0
    assert judge(table, 59.5, {"green": good}).severity is None  # stops holding: for restarts
    assert judge(table, 100.0, {"green": bad}).severity is None
    assert judge(table, 159.0, {"green": bad}).severity is None
    v = judge(table, 160.0, {"green": bad})
    assert v.severity == "P1"
    assert v.evidence.extra["sustained_s"] == 60.0 and v.evidence.extra["sustain_s"] == 60.0


@pytest.mark.parametrize(
    ("traffic", "why"),
    [
        (reading(12, error_ratio=0.9), "12 of 50 samples"),
        (None, "no data"),
        (reading(100, error_ratio=None), "no error_ratio"),
    ],
)
def test_inconclusive_never_fires_and_is_never_healthy(traffic: Reading | None, why: str) -> None:
    table = RuleTable([rule(severity="P1", for_s=10.0)])
    judge(table, 0.0, {"green": reading(100, error_ratio=0.9)})  # an onset...
    v = judge(table, 5.0, {"green": traffic})
    assert v.severity is None and v.insufficient_data and v.reason == "insufficient data"
    assert v.states[0].state == "inconclusive" and v.states[0].why == why
    # ... which an inconclusive tick restarts.
    assert judge(table, 11.0, {"green": reading(100, error_ratio=0.9)}).severity is None


def test_a_stale_signal_makes_its_rules_inconclusive() -> None:
    table = RuleTable([rule()], stale_after={"traffic": 300.0})
    bad = reading(100, last_at=0.0, error_ratio=0.5)
    assert judge(table, 300.0, {"green": bad}).severity == "P0"
    v = judge(table, 301.0, {"green": bad})
    assert v.severity is None and v.states[0].why == "signal stale"


def test_a_dry_run_rule_reports_what_it_would_do_and_never_fires() -> None:
    table = RuleTable([rule(dry_run=True)])
    v = judge(table, 0.0, {"green": reading(100, error_ratio=0.5)})
    assert v.severity is None and not v.failing
    assert [r.name for r, _ in v.dry_runs] == ["traffic.error_ratio"]
    assert v.states[0].state == "firing" and v.states[0].dry_run


def test_above_baseline_compares_with_the_color_s_baseline() -> None:
    table = RuleTable([rule(stat="p95_ms", op="above_baseline", threshold=2.0, severity="P1")])
    slow: dict[Color, Reading | None] = {"green": reading(100, p95_ms=300.0)}
    v = judge(table, 0.0, slow)
    assert v.severity is None and v.states[0].why == "no baseline"  # never fires on nothing
    v = judge(table, 0.0, slow, baselines={"green": {"p95_ms": 100.0}})
    assert v.severity == "P1"
    e = v.evidence.to_dict()
    assert e["value"] == 3.0 and e["baseline_p95_ms"] == 100.0 and e["p95_ms"] == 300.0
    assert judge(table, 0.0, slow, baselines={"green": {"p95_ms": 200.0}}).severity is None


def test_a_higher_severity_restarts_the_for_of_lower_ones() -> None:
    p0 = rule(name="p0", stat="p99_ms", threshold=1000.0, min_samples=0)
    p1 = rule(name="p1", severity="P1", for_s=30.0)
    table = RuleTable([p1, p0])  # table order within a severity; severities in order
    both = reading(100, error_ratio=0.5, p99_ms=2000.0)
    only_p1 = reading(100, error_ratio=0.5, p99_ms=10.0)
    judge(table, 0.0, {"green": only_p1})
    v = judge(table, 20.0, {"green": both})
    assert v.severity == "P0" and v.evidence.rule == "p0"
    # P1 was not judged while P0 fired: its 30 s start again when it next holds.
    assert judge(table, 40.0, {"green": only_p1}).severity is None
    assert judge(table, 70.0, {"green": only_p1}).severity == "P1"


@pytest.mark.parametrize("for_s", [None, 30.0], ids=["no-for", "for-30s"])
def test_a_rule_outranked_by_a_firing_one_shows_pending_and_why_with_no_onset(
    for_s: float | None,
) -> None:
    p0 = rule(name="p0", stat="p99_ms", threshold=1000.0, min_samples=0)
    p2 = rule(name="p2", severity="P2", for_s=for_s)
    table = RuleTable([p0, p2])
    both = reading(100, error_ratio=0.5, p99_ms=2000.0)
    only_p2 = reading(100, error_ratio=0.5, p99_ms=10.0)
    v = judge(table, 20.0, {"green": both})
    assert v.severity == "P0"
    fired, outranked = v.states
    assert (fired.state, fired.since) == ("firing", 20.0)
    # Its condition holds, but it was not judged: neither firing nor an onset to show.
    assert (outranked.state, outranked.since, outranked.why, outranked.value) == (
        "pending", None, "outranked by P0 p0", 0.5,
    )  # fmt: skip
    # Once P0 stops, it is judged again, its onset from then.
    after = judge(table, 40.0, {"green": only_p2}).states[1]
    assert (after.state, after.since, after.why) == (
        "firing" if for_s is None else "pending", 40.0, None,
    )  # fmt: skip


@pytest.mark.parametrize("for_s", [None, 30.0], ids=["no-for", "for-30s"])
def test_a_rule_of_the_same_severity_after_the_one_that_fired_never_shows_a_firing_with_no_onset(
    for_s: float | None,
) -> None:
    first = rule(name="first", severity="P2", stat="p99_ms", threshold=1000.0, min_samples=0)
    second = rule(name="second", severity="P2", for_s=for_s)
    table = RuleTable([first, second])
    both = reading(100, error_ratio=0.5, p99_ms=2000.0)
    v = judge(table, 20.0, {"green": both})
    assert v.evidence.rule == "first"
    fired, after = v.states
    assert (fired.state, fired.since) == ("firing", 20.0)
    # Not judged this tick and no onset of its own: pending, and why, as an outranked one.
    assert (after.state, after.since, after.why) == (
        "pending", None, "outranked by P2 first",
    )  # fmt: skip


def test_a_rule_of_the_same_severity_keeps_its_onset_and_shows_firing_once_past_its_for() -> None:
    first = rule(name="first", severity="P2", stat="p99_ms", threshold=1000.0, min_samples=0)
    second = rule(name="second", severity="P2", for_s=10.0)
    table = RuleTable([first, second])
    only_second = reading(100, error_ratio=0.5, p99_ms=10.0)
    both = reading(100, error_ratio=0.5, p99_ms=2000.0)
    assert judge(table, 0.0, {"green": only_second}).states[1].state == "pending"
    v = judge(table, 5.0, {"green": both})
    assert v.evidence.rule == "first"
    assert (v.states[1].state, v.states[1].since, v.states[1].why) == ("pending", 0.0, None)
    v = judge(table, 15.0, {"green": both})
    assert v.evidence.rule == "first"
    # Its condition has held for its `for` from its own onset: it says firing, since then.
    assert (v.states[1].state, v.states[1].since, v.states[1].why) == ("firing", 0.0, None)


def test_a_rule_outranked_whose_condition_does_not_hold_is_ok() -> None:
    table = RuleTable([rule(name="p0", min_samples=0), rule(name="p2", severity="P2", op="below")])
    v = judge(table, 0.0, {"green": reading(100, error_ratio=0.5)})
    assert [(s.state, s.why) for s in v.states] == [("firing", None), ("ok", None)]


def test_colors_keep_their_own_onsets() -> None:
    table = RuleTable([rule(severity="P1", for_s=10.0)])
    bad = reading(100, error_ratio=0.5)
    judge(table, 0.0, {"blue": bad}, color="blue")
    assert judge(table, 10.0, {"green": bad}).severity is None  # green's own 10 s begin now
    assert judge(table, 10.0, {"blue": bad}, color="blue").severity == "P1"


# ---- in the machine: what the rules make the guard do ---------------------------------------


def machine_with(*rules: Rule, stale: Mapping[str, float] | None = None) -> GuardMachine:
    spec = PolicySpec(rules=rules, stale_after=dict(stale or {}))
    m = GuardMachine(spec, probe_interval=1.0)
    for n in range(10):
        for c in COLORS:
            m.observe(c, float(n), Outcome.OK, 0.01)
    return m


def facts(now: float, traffic: Reading | None) -> Facts:
    readings: dict[str, dict[Color, Reading]] = {}
    if traffic is not None:
        readings["traffic"] = {"green": traffic}
    return Facts(now=now, active="green", readings=readings)


def decided(
    m: GuardMachine,
    seconds: range,
    ratio: Callable[[int], float],
    last_at: Callable[[int], float] = float,
) -> list[Action]:
    """A decision at each of `seconds`, both colors probed healthy then, on a traffic
    reading of 100 requests with the error ratio `ratio(n)`, taken at `last_at(n)`."""
    actions: list[Action] = []
    for n in seconds:
        for c in COLORS:
            m.observe(c, float(n), Outcome.OK, 0.01)
        reading_n = reading(100, last_at=last_at(n), error_ratio=ratio(n))
        actions += m.decide(facts(float(n), reading_n)).actions
    return actions


def test_a_p2_rule_alerts_once_per_episode_and_never_rolls_back() -> None:
    m = machine_with(rule(severity="P2", threshold=0.03))
    (alert,) = decided(m, range(10, 20), lambda _: 0.05)
    assert isinstance(alert, Alert)
    assert alert.severity == "P2" and "traffic.error_ratio" in alert.reason


def test_a_p2_rule_above_and_below_its_threshold_by_turns_is_one_episode() -> None:
    m = machine_with(rule(severity="P2", threshold=0.03))
    actions = decided(m, range(10, 50), lambda n: 0.05 if n % 2 else 0.01)
    assert [type(a) for a in actions] == [Alert]


def test_a_signal_stale_by_turns_is_one_episode() -> None:
    m = machine_with(rule(), stale={"traffic": 5.0})
    # Fresh one tick in ten, 8 s old (stale after 5 s) at the others.
    (alert,) = decided(m, range(10, 60), lambda _: 0.0, lambda n: n - (0 if n % 10 == 0 else 8))
    assert isinstance(alert, Alert) and "signal traffic is stale" in alert.reason


def test_a_p0_traffic_rule_rolls_back_with_evidence_naming_it() -> None:
    m = machine_with(rule())
    d = m.decide(facts(9.0, reading(812, last_at=9.0, error_ratio=0.19)))
    (rollback,) = d.actions
    assert isinstance(rollback, Rollback) and rollback.target == "blue"
    e = rollback.evidence.to_dict()
    assert (e["rule"], e["signal"], e["stat"], e["value"], e["samples"]) == (
        "traffic.error_ratio", "traffic", "error_ratio", 0.19, 812,
    )  # fmt: skip


def test_a_dry_run_rule_journals_would_roll_back_once_and_never_switches() -> None:
    m = machine_with(rule(dry_run=True))
    said: list[Alert] = []
    for n in range(9, 15):
        m.observe("blue", float(n), Outcome.OK, 0.01)
        m.observe("green", float(n), Outcome.OK, 0.01)
        d = m.decide(facts(float(n), reading(100, last_at=float(n), error_ratio=0.5)))
        assert not any(isinstance(a, Rollback) for a in d.actions)
        said += [a for a in d.actions if isinstance(a, Alert)]
    assert len(said) == 1
    assert said[0].reason.startswith("dry run: rule traffic.error_ratio would roll back green")
    # Healthy for a moment, then failing again: the same episode.
    m.decide(facts(15.0, reading(100, last_at=15.0, error_ratio=0.0)))
    assert not m.decide(facts(16.0, reading(100, last_at=16.0, error_ratio=0.5))).actions
    # Healthy for a whole window (60 s, the default), then failing: a new episode.
    quiet = m.spec.window
    m.decide(facts(17.0, reading(100, last_at=17.0, error_ratio=0.0)))
    m.decide(facts(17.0 + quiet, reading(100, last_at=17.0 + quiet, error_ratio=0.0)))
    later = 18.0 + quiet
    for c in COLORS:
        m.observe(c, later, Outcome.OK, 0.01)
    again = m.decide(facts(later, reading(100, last_at=later, error_ratio=0.5)))
    assert [type(a) for a in again.actions] == [Alert]


def test_a_stale_signal_is_alerted_once_and_never_rolls_back() -> None:
    m = machine_with(rule(), stale={"traffic": 30.0})
    old = reading(100, last_at=0.0, error_ratio=0.9)
    actions: list[Action] = []
    for n in range(31, 40):
        m.observe("blue", float(n), Outcome.OK, 0.01)
        m.observe("green", float(n), Outcome.OK, 0.01)
        actions += m.decide(facts(float(n), old)).actions
    assert len(actions) == 1 and isinstance(actions[0], Alert)
    assert "signal traffic is stale" in actions[0].reason
    assert m.verdicts["green"].states[-1].why == "signal stale"


@pytest.mark.parametrize("moved_to", COLORS)
def test_a_switch_forgets_the_onsets_of_the_color_traffic_moved_to_only(moved_to: Color) -> None:
    # Both colors hold a P1 condition with onsets at 0 s; traffic then moves to one.
    table = RuleTable([rule(severity="P1", for_s=10.0)])
    bad = reading(100, error_ratio=0.2)
    for color in COLORS:
        assert judge(table, 0.0, {"blue": bad, "green": bad}, color=color).states[0].since == 0.0
    table.reset(moved_to)
    stayed: Color = "blue" if moved_to == "green" else "green"
    # The color traffic left has held its condition since 0 s, and fires on time...
    kept = judge(table, 10.0, {"blue": bad, "green": bad}, color=stayed)
    assert (kept.states[0].state, kept.states[0].since, kept.severity) == ("firing", 0.0, "P1")
    # ... while the `for` of the color it moved to counts from its first judging after.
    fresh = judge(table, 10.0, {"blue": bad, "green": bad}, color=moved_to)
    assert (fresh.states[0].state, fresh.states[0].since, fresh.severity) == ("pending", 10.0, None)
    assert table.onsets(stayed) and table.onsets(moved_to)
