"""The severity table: each rule fires on its threshold and carries its evidence."""

from __future__ import annotations

import pytest

from guardd.core import Outcome, Policy, PolicySpec, SlidingWindow

SPEC = PolicySpec(
    consecutive_failures=3,
    window=60,
    min_samples=5,
    p0_error_ratio=0.5,
    p1_error_ratio=0.1,
    p1_latency=2.0,
    p1_sustain=10.0,
    p2_error_ratio=0.03,
    p2_latency=1.0,
)


def window_of(outcomes: str, latency: float = 0.01, start: float = 0.0) -> SlidingWindow:
    """'.' ok, 'x' 5xx, 't' timeout; one sample a second from `start`."""
    w = SlidingWindow(SPEC.window)
    kinds = {".": Outcome.OK, "x": Outcome.HTTP_5XX, "t": Outcome.TIMEOUT}
    for i, c in enumerate(outcomes):
        w.add(start + i, kinds[c], latency)
    return w


@pytest.mark.parametrize(
    ("outcomes", "severity", "rule"),
    [
        ("..........", None, "healthy"),
        ("xxx", "P0", "consecutive_failures"),  # no minimum of samples for a run
        ("ttt", "P0", "consecutive_failures"),
        ("..", None, "insufficient_data"),
        ("x.x", None, "insufficient_data"),
        ("xx.xx.xx.", "P0", "p0_error_ratio"),  # 67 %: never three in a row
        (".........x" * 2 + "." * 10, "P2", "p2_error_ratio"),  # 2/30 = 6.7 %: above p2, below p1
    ],
)
def test_rules(outcomes: str, severity: str | None, rule: str) -> None:
    w = window_of(outcomes)
    now = float(len(outcomes))
    verdict = Policy(SPEC).evaluate(now, "green", w.stats(now), None)
    assert verdict.severity == severity
    assert verdict.evidence.rule == rule
    assert verdict.evidence.color == "green"
    assert verdict.evidence.samples == w.stats(now).samples


def test_p2_is_alert_only() -> None:
    w = window_of("." * 24 + "x")  # 4 %
    verdict = Policy(SPEC).evaluate(25.0, "green", w.stats(25.0), None)
    assert verdict.severity == "P2"
    assert not verdict.failing
    assert verdict.evidence.rule == "p2_error_ratio"
    assert verdict.evidence.threshold == 0.03


def test_p1_fires_only_once_sustained() -> None:
    policy = Policy(SPEC)
    w = SlidingWindow(SPEC.window)
    severities = []
    for t in range(30):
        w.add(float(t), Outcome.HTTP_5XX if t % 5 == 0 else Outcome.OK, 0.01)  # 20 %
        severities.append(policy.evaluate(float(t), "green", w.stats(float(t)), None).severity)
    first_p1 = severities.index("P1")
    verdict = policy.evaluate(float(first_p1), "green", w.stats(float(first_p1)), None)
    assert verdict.severity == "P1"
    assert verdict.evidence.rule == "p1_error_ratio"
    assert verdict.evidence.extra["sustained_s"] >= SPEC.p1_sustain
    assert all(s != "P1" for s in severities[:first_p1])
    assert first_p1 >= SPEC.min_samples - 1 + SPEC.p1_sustain


def test_p1_sustain_resets_when_condition_clears() -> None:
    policy = Policy(SPEC)
    slow = window_of("." * 10, latency=3.0)
    assert policy.evaluate(10.0, "green", slow.stats(10.0), None).pending is not None
    fast = window_of("." * 10, latency=0.01, start=100.0)
    assert policy.evaluate(110.0, "green", fast.stats(110.0), None).pending is None
    assert policy.evaluate(112.0, "green", slow.stats(12.0), None).severity != "P1"


def test_latency_regression_against_standby() -> None:
    spec = PolicySpec(
        min_samples=5, latency_regression=3.0, p1_sustain=0.0, p1_latency=30.0, p2_latency=20.0
    )
    active = window_of("." * 10, latency=0.4)
    standby = window_of("." * 10, latency=0.1)
    verdict = Policy(spec).evaluate(10.0, "green", active.stats(10.0), standby.stats(10.0))
    assert verdict.severity == "P1"
    assert verdict.evidence.rule == "latency_regression"
    assert verdict.evidence.value == pytest.approx(4.0, rel=0.05)
