"""The block-counted percentile gives exactly what the walk over every bucket gave.

`reference_percentile` is the percentile as guardd computed it before buckets were also
counted in blocks: the nearest-rank walk over all ~460 log buckets. The window's
percentiles, through any mix of adds, expiries, evictions and resizes, must be the very
same floats, and its statistics the same values whether or not they were kept.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core import Outcome, SlidingWindow
from guardd.core.window import (
    _BUCKET_OF,
    _BUCKETS,
    _MAX_BUCKET_OF,
    _MIN_MS,
    _RATIO,
    _bucket,
    _bucket_of,
    block_percentiles,
)

QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def reference_percentile(buckets: list[int], n: int, q: float) -> float | None:
    """The nearest-rank `q` quantile (ms) as the full walk over the buckets gives it."""
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return float(_MIN_MS * _RATIO ** (index + 0.5))
    return float(_MIN_MS * _RATIO ** (_BUCKETS - 1 + 0.5))


def blocks_of(buckets: list[int]) -> list[int]:
    return [sum(buckets[i : i + 32]) for i in range(0, len(buckets), 32)]


# Latencies from 0 to past the last bucket (600 s), log-spread so every block is visited.
latencies = st.one_of(
    st.just(0.0),
    st.floats(-8.0, 3.2).map(lambda e: 10.0**e),
    st.floats(0.0001, 0.05),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.floats(0.0, 3.0), st.sampled_from(list(Outcome)), latencies),
        st.tuples(st.just("stats"), st.floats(0.0, 30.0)),
        st.tuples(st.just("resize"), st.floats(0.5, 40.0)),
        st.tuples(st.just("judge"), st.floats(0.0, 1.0)),
    ),
    max_size=250,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.integers(0, _BUCKETS - 1), st.integers(1, 50), max_size=40),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
)
def test_block_percentiles_are_the_walks(counts: dict[int, int], qs: list[float]) -> None:
    buckets = [0] * _BUCKETS
    for index, count in counts.items():
        buckets[index] = count
    n = sum(buckets)
    got = block_percentiles(buckets, blocks_of(buckets), n, tuple(qs))
    assert got == tuple(reference_percentile(buckets, n, q) for q in qs)


def test_every_bucket_and_rank_is_the_walks() -> None:
    # One sample per bucket: each rank lands on its own bucket, across every block edge.
    buckets = [1] * _BUCKETS
    blocks = blocks_of(buckets)
    for rank in range(1, _BUCKETS + 1):
        q = rank / _BUCKETS
        want = reference_percentile(buckets, _BUCKETS, q)
        assert block_percentiles(buckets, blocks, _BUCKETS, (q,)) == (want,)


@settings(max_examples=300, deadline=None)
@given(ops, st.floats(0.5, 20.0), st.integers(1, 60))
def test_window_percentiles_match_the_reference(
    steps: list[tuple[object, ...]], span: float, max_samples: int
) -> None:
    window = SlidingWindow(span, max_samples=max_samples)
    live: list[tuple[float, int]] = []  # (time, bucket) of the samples the window holds
    now = 0.0
    last: float | None = None

    def expire(at: float) -> None:
        while live and live[0][0] < at - span:
            live.pop(0)

    for step in steps:
        if step[0] == "add":
            _, gap, outcome, latency = step
            assert isinstance(gap, float) and isinstance(outcome, Outcome)
            assert isinstance(latency, float)
            now += gap
            window.add(now, outcome, latency)
            last = now
            live.append((now, _bucket(latency * 1000.0)))
            if len(live) > max_samples:
                live.pop(0)
            expire(now)
        elif step[0] == "stats":
            assert isinstance(step[1], float)
            now += step[1]
            expire(now)
        elif step[0] == "resize":
            assert isinstance(step[1], float)
            span = step[1]
            window.resize(span)
            if last is not None:
                expire(last)
        else:
            # A decision reads the same window twice: the kept statistics must still hold.
            window.stats(now)
        expire(now)  # what `stats(now)` forgets first
        buckets = [0] * _BUCKETS
        for _, b in live:
            buckets[b] += 1
        # What the rules read, taken before the statistics are (its own percentile path).
        key = window.rules_key(now)
        stats = window.stats(now)
        assert key == stats.rules_key()
        assert stats.samples == len(live)
        assert stats.p50_ms == reference_percentile(buckets, len(live), 0.50)
        assert stats.p95_ms == reference_percentile(buckets, len(live), 0.95)
        for q in QS:
            assert window.percentile(q) == reference_percentile(buckets, len(live), q)


def test_stats_are_kept_until_the_window_changes() -> None:
    window = SlidingWindow(10.0)
    window.add(0.0, Outcome.OK, 0.010)
    first = window.stats(1.0)
    assert window.stats(2.0) is first  # nothing came or went: the same statistics
    window.add(3.0, Outcome.HTTP_5XX, 0.500, "HTTP 503")
    second = window.stats(3.0)
    assert second is not first
    assert (second.samples, second.failures, second.consecutive_failures) == (2, 1, 1)
    assert second.last_error == "HTTP 503" and second.last_probe_at == 3.0
    assert second.p95_ms is not None and second.p95_ms > 400
    # The first sample expires: the statistics are taken again.
    third = window.stats(10.5)
    assert third is not second
    assert (third.samples, third.failures) == (1, 1)
    assert third.p50_ms == second.p95_ms
    # A resize that drops samples changes them too; one that drops none keeps them.
    assert window.stats(10.5) is third
    window.resize(20.0)
    assert window.stats(10.5) is third
    window.resize(0.5)
    assert window.stats(10.5).samples == 0
    assert window.stats(10.5).p50_ms is None


@pytest.mark.parametrize("max_samples", [1, 2, 3, 20])
def test_percentiles_that_jump_across_the_histogram_are_exact(max_samples: int) -> None:
    # The median moves between the first and the last bucket, far past one block, both
    # ways, as fast samples and timeouts take turns and old ones are evicted.
    window = SlidingWindow(1e9, max_samples=max_samples)
    live: list[int] = []
    rng = random.Random(max_samples)  # noqa: S311 - a reproducible mix, not a secret
    for i in range(400):
        latency = rng.choice((0.0, 0.00002, 0.01, 3.0, 700.0)) if i % 7 else 0.0
        window.add(float(i), Outcome.OK, latency)
        live = ([*live, _bucket(latency * 1000.0)])[-max_samples:]
        buckets = [0] * _BUCKETS
        for b in live:
            buckets[b] += 1
        stats = window.stats(float(i))
        assert stats.p50_ms == reference_percentile(buckets, len(live), 0.50)
        assert stats.p95_ms == reference_percentile(buckets, len(live), 0.95)


def test_the_remembered_bucket_of_a_latency_is_the_computed_one() -> None:
    """`SlidingWindow.add` takes a latency's bucket from `_BUCKET_OF` when it is there:
    through more distinct latencies than it keeps (so it starts over), each is the one
    `_bucket` computes, remembered or not."""
    rng = random.Random(3)  # noqa: S311 - repeatable, not a secret
    latencies = [round(rng.uniform(0.0, 2.0), 6) for _ in range(3 * _MAX_BUCKET_OF)]
    latencies += [0.0, -0.0, 1e-9, 600.0, 1e6, 5, 0.004, 0.004]
    for latency in latencies + latencies:
        assert _bucket_of(latency) == _bucket(latency * 1000.0)
        assert 0 < len(_BUCKET_OF) <= _MAX_BUCKET_OF
        assert _BUCKET_OF[latency] == _bucket(latency * 1000.0)
    window = SlidingWindow(1e9)
    for i, latency in enumerate(latencies):
        window.add(float(i), Outcome.OK, latency)
    buckets = [0] * _BUCKETS
    for latency in latencies:
        buckets[_bucket(latency * 1000.0)] += 1
    for q in QS:
        assert window.percentile(q) == reference_percentile(buckets, len(latencies), q)
