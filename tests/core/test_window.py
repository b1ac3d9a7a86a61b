"""The sliding window: invariants against a brute-force model (hypothesis) and edge cases."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core import Outcome, SlidingWindow

OUTCOMES = list(Outcome)


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


samples = st.lists(
    st.tuples(st.floats(0.0, 5.0), st.sampled_from(OUTCOMES), st.floats(0.0001, 30.0)),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(samples, st.floats(0.5, 20.0))
def test_window_matches_brute_force(steps: list[tuple[float, Outcome, float]], span: float) -> None:
    window = SlidingWindow(span)
    now = 0.0
    taken: list[tuple[float, Outcome, float]] = []
    for gap, outcome, latency in steps:
        now += gap
        window.add(now, outcome, latency)
        taken.append((now, outcome, latency))
        live = [s for s in taken if s[0] >= now - span]
        stats = window.stats(now)
        assert stats.samples == len(live)
        assert stats.failures == sum(o is not Outcome.OK for _, o, _ in live)
        assert stats.errors_5xx == sum(o is Outcome.HTTP_5XX for _, o, _ in live)
        run = 0
        for _, o, _ in reversed(taken):
            if o is Outcome.OK:
                break
            run += 1
        assert stats.consecutive_failures == run
        for q, got in ((0.5, stats.p50_ms), (0.95, stats.p95_ms)):
            want = exact_percentile([lat * 1000 for _, _, lat in live], q)
            assert got is not None
            assert abs(got - want) <= 0.025 * want + 0.01


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 50), st.integers(1, 500))
def test_memory_is_bounded(max_samples: int, n: int) -> None:
    window = SlidingWindow(1e9, max_samples=max_samples)
    for i in range(n):
        window.add(float(i), Outcome.OK, 0.01)
    assert window.stats(float(n)).samples == min(n, max_samples)
    assert sum(window._buckets) == min(n, max_samples)


def test_empty_window_has_no_ratios() -> None:
    stats = SlidingWindow(60).stats(0.0)
    assert stats.samples == 0
    assert stats.error_ratio is None and stats.p95_ms is None and stats.last_probe_at is None


def test_samples_expire_with_time_not_count() -> None:
    window = SlidingWindow(10)
    window.add(0.0, Outcome.HTTP_5XX, 0.1)
    window.add(5.0, Outcome.OK, 0.1)
    assert window.stats(9.0).samples == 2
    assert window.stats(10.5).samples == 1
    assert window.stats(10.5).failures == 0
    # Consecutive counts are about the run, not the window.
    assert window.stats(100.0).consecutive_successes == 1


def test_resize_keeps_what_fits() -> None:
    window = SlidingWindow(60)
    for t in range(10):
        window.add(float(t), Outcome.OK, 0.01)
    window.resize(3.0)
    assert window.stats(9.0).samples == 4
