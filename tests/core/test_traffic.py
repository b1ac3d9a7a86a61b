"""The traffic window: against a naive list of every request (hypothesis), and edge cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.signals import KIND_STATS
from guardd.core.slots import MAX_SLOTS, MIN_SLOTS
from guardd.core.traffic import CLASSES, TrafficWindow, status_class
from guardd.core.window import _BUCKETS


class NaiveWindow:
    """Every request in a list; the window rule spelled out on each one."""

    def __init__(self, span_s: float, created_at: float) -> None:
        self.span_s = span_s
        self.slots = min(max(math.ceil(span_s), MIN_SLOTS), MAX_SLOTS)
        self.slot_s = span_s / self.slots
        self.newest_slot = math.floor(created_at / self.slot_s)
        self.requests: list[tuple[float, int, float | None]] = []
        self.last_at = created_at

    def add(self, at: float, status: int, rt: float | None) -> bool:
        slot = math.floor(at / self.slot_s)
        if slot <= self.newest_slot - self.slots:
            return False
        self.newest_slot = max(self.newest_slot, slot)
        self.last_at = at if not self.requests else max(self.last_at, at)
        self.requests.append((at, status, rt))
        return True

    def live(self, now: float) -> list[tuple[float, int, float | None]]:
        newest = max(self.newest_slot, math.floor(now / self.slot_s))
        return [r for r in self.requests if math.floor(r[0] / self.slot_s) > newest - self.slots]


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


statuses = st.sampled_from([101, 200, 204, 301, 304, 404, 499, 500, 502, 503, 504])
steps = st.lists(
    st.tuples(
        st.floats(-3.0, 2.0),  # time since the previous step: negative is a late log line
        statuses,
        st.one_of(st.none(), st.floats(0.0, 30.0)),
        st.booleans(),  # read the window after this step
    ),
    max_size=250,
)


@settings(max_examples=300)
@given(steps, st.floats(0.5, 20.0), st.floats(0.0, 1e6))
def test_window_matches_a_list_of_every_request(
    plan: list[tuple[float, int, float | None, bool]], span: float, start: float
) -> None:
    window = TrafficWindow(span, created_at=start)
    model = NaiveWindow(span, start)
    clock = start
    now = start
    for gap, status, rt, look in plan:
        at = clock + gap
        clock = max(clock, at)
        now = max(now, clock)
        assert window.add(at, status, rt) == model.add(at, status, rt)
        if not look:
            continue
        reading = window.reading(now)
        live = model.live(now)
        stats = reading.stats
        assert set(stats) == KIND_STATS["access_log"]
        assert reading.samples == stats["requests"] == len(live)
        assert reading.window_s == span
        assert reading.last_at == model.last_at
        assert stats["rps"] == pytest.approx(len(live) / span)
        for cls in CLASSES:
            assert reading.detail[cls] == sum(status_class(s) == cls for _, s, _ in live)
        errors = sum(s >= 500 for _, s, _ in live)
        assert stats["error_ratio"] == (pytest.approx(errors / len(live)) if live else None)
        timed = [rt * 1000 for _, _, rt in live if rt is not None]
        if not timed:
            assert stats["p50_ms"] is stats["p95_ms"] is stats["p99_ms"] is stats["mean_ms"] is None
            continue
        # Latencies are kept in whole microseconds, so the mean is exact to that.
        assert stats["mean_ms"] == pytest.approx(sum(timed) / len(timed), abs=0.001)
        for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
            want = exact_percentile(timed, q)
            got = stats[key]
            assert got is not None
            # Within ~2 %, and below 0.01 ms everything is the lowest bucket.
            assert abs(got - want) <= 0.025 * want + 0.011, (key, got, want)


@settings(max_examples=50)
@given(st.floats(0.5, 7200.0), st.integers(1, 3000), st.integers(1, 50))
def test_memory_does_not_grow_with_the_request_rate(span: float, per_slot: int, seed: int) -> None:
    window = TrafficWindow(span, created_at=0.0)
    bound = (
        min(max(math.ceil(span), MIN_SLOTS), MAX_SLOTS) * (len(CLASSES) + 2 + _BUCKETS)
        + _BUCKETS
        + len(CLASSES)
    )
    for i in range(per_slot):
        # Spread over the whole span and the whole latency range: the worst case for memory.
        window.add((i * seed) % span, 200 + 100 * (i % 4), ((i * 7919) % 600_000) / 1000.0)
        assert window.footprint() <= bound
    assert window.reading(span).samples <= per_slot


def test_a_second_of_a_million_requests_holds_one_slot_of_counters() -> None:
    window = TrafficWindow(60.0, created_at=0.0)
    for i in range(1_000_000):
        window.add(10.0 + i / 2_000_000, 200 if i % 100 else 503, 0.005)
    reading = window.reading(10.9)
    assert reading.samples == 1_000_000
    assert reading.stats["error_ratio"] == pytest.approx(0.01)
    assert reading.stats["rps"] == pytest.approx(1_000_000 / 60.0)
    assert window.footprint() <= MIN_SLOTS * (len(CLASSES) + 2) + 1 + _BUCKETS + len(CLASSES)


def test_empty_window_reads_zero_requests_and_no_latency() -> None:
    reading = TrafficWindow(30.0, created_at=100.0).reading(105.0)
    assert reading.samples == 0
    assert reading.last_at == 100.0
    assert reading.stats == {
        "requests": 0,
        "rps": 0.0,
        "error_ratio": None,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "mean_ms": None,
    }
    assert reading.detail == dict.fromkeys(CLASSES, 0)


def test_requests_leave_after_the_span_and_last_at_stays() -> None:
    window = TrafficWindow(10.0, created_at=0.0)
    window.add(1.2, 502, 0.2)
    window.add(1.5, 200, None)
    assert window.reading(11.1).samples == 2  # (slots of 1/12 s: up to 1/12 s short)
    gone = window.reading(11.6)
    assert gone.samples == 0
    assert gone.last_at == 1.5
    assert gone.stats["error_ratio"] is None
    # A line logged late, older than the window, is not counted.
    assert window.add(0.5, 200, 0.1) is False
    assert window.reading(11.6).samples == 0


def test_untimed_requests_count_but_give_no_latency() -> None:
    window = TrafficWindow(5.0, created_at=0.0)
    window.add(1.0, 200, None)
    window.add(1.0, 500, None)
    reading = window.reading(1.0)
    assert reading.stats["requests"] == 2
    assert reading.stats["error_ratio"] == 0.5
    assert reading.stats["p50_ms"] is None
    assert reading.stats["mean_ms"] is None


@pytest.mark.parametrize("span", [5.0, 30.0, 60.0, 120.0, 300.0])
def test_a_window_holds_its_whole_span_to_within_a_percent(span: float) -> None:
    """Ten requests a second for twice the span, the window read between each two: it
    holds the requests of its span, short by at most 1 % of them (its oldest slot emptied
    whole; slots at most a 120th of the span up to 2 minutes), never more. With 1 s slots
    a 5 s window held 4 s of them at worst: a ratio rule read a burst's edge as a window."""
    window = TrafficWindow(span, created_at=0.0)
    rate = 10
    times = [i / rate for i in range(int(2 * span * rate))]
    for i, t in enumerate(times):
        window.add(t, 200, 0.001)
        now = t + (i % 7) / (7 * rate)  # at every phase of a slot, between two requests
        held = window.reading(now).samples
        in_span = sum(1 for u in times[: i + 1] if now - span < u <= now)
        assert in_span * 0.99 - 1 <= held <= in_span, (now, held, in_span)


def test_long_spans_use_wider_slots() -> None:
    window = TrafficWindow(3600.0, created_at=0.0)
    assert window.slot_s == 6.0
    window.add(1.0, 200, 0.01)
    assert window.reading(3599.0).samples == 1
    assert window.reading(3601.0).samples == 0


@pytest.mark.parametrize("status", [0, 99, 600, 999, -200])
def test_impossible_status_is_refused_and_changes_nothing(status: int) -> None:
    window = TrafficWindow(5.0, created_at=0.0)
    with pytest.raises(ValueError, match="not within 100"):
        window.add(1.0, status, 0.1)
    with pytest.raises(ValueError, match="not within 100"):
        status_class(status)
    assert window.reading(1.0).samples == 0


@pytest.mark.parametrize("rt", [-0.001, math.inf, math.nan, 1e308, 86_400.5])
def test_impossible_latency_is_refused_and_changes_nothing(rt: float) -> None:
    window = TrafficWindow(5.0, created_at=0.0)
    with pytest.raises(ValueError, match="request time"):
        window.add(1.0, 200, rt)
    assert window.reading(1.0).samples == 0


@pytest.mark.parametrize("span", [0.0, -1.0, math.inf, math.nan])
def test_span_must_be_a_positive_finite_number(span: float) -> None:
    with pytest.raises(ValueError, match="span_s"):
        TrafficWindow(span, created_at=0.0)
