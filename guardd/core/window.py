"""A time-based sliding window of probe results with bounded memory and O(1) updates.

Latency percentiles come from a log-bucketed histogram that is updated as samples
enter and leave, so a sample costs O(1) and a percentile O(sqrt(buckets)) with no
sorting (block counts), p50 and p95 a step or two (a cursor each that follows the
samples); each reported percentile is within about 2 % of the exact nearest-rank value.
The window's statistics are kept until the window next changes: a decision tick that
reads them several times pays for them once.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from math import ceil
from typing import Final

from guardd.core.types import Outcome

_MIN_MS: Final = 0.01
_RATIO: Final = 1.04
_LOG_RATIO: Final = math.log(_RATIO)
_BUCKETS: Final = int(math.log(600_000 / _MIN_MS) / _LOG_RATIO) + 1
_OK, _5XX, _FAIL = 0, 1, 2


#: The outcomes `SlidingWindow.add` tells apart, looked up once (an enum member read off
#: its class costs more than the rest of a comparison).
_OUTCOME_OK: Final = Outcome.OK
_OUTCOME_5XX: Final = Outcome.HTTP_5XX


def _bucket(latency_ms: float) -> int:
    if latency_ms <= _MIN_MS:
        return 0
    return min(int(math.log(latency_ms / _MIN_MS) / _LOG_RATIO), _BUCKETS - 1)


def _bucket_value(index: int) -> float:
    # The geometric middle of the bucket keeps the relative error symmetric.
    return float(_MIN_MS * _RATIO ** (index + 0.5))


#: The most probes a window keeps, its oldest forgotten first: at 10 probes a second, 27
#: minutes of them. A count of probes a rule needs in a window is bounded by it in the
#: config (`guardd.config.ProbeCount`), or the rule could never conclude.
MAX_SAMPLES: Final = 16_384

#: The bucket of each latency (s) met lately: recorded latencies are rounded to the
#: microsecond, so a replay meets the same ones again and again. Starts over once full.
_BUCKET_OF: dict[float, int] = {}
_MAX_BUCKET_OF: Final = 1024


def _bucket_of(latency_s: float) -> int:
    """`_bucket` of `latency_s` in milliseconds, remembered in `_BUCKET_OF`."""
    bucket = _bucket(latency_s * 1000.0)
    if len(_BUCKET_OF) >= _MAX_BUCKET_OF:
        _BUCKET_OF.clear()
    _BUCKET_OF[latency_s] = bucket
    return bucket


# Each bucket's value, computed once by the same expression (so the very same float).
_VALUES: Final[tuple[float, ...]] = tuple(_bucket_value(i) for i in range(_BUCKETS))
# Buckets are also counted in blocks of 2**_SHIFT: a percentile walks the ~15 block
# totals, then the 32 buckets of one block, instead of all ~460 buckets.
_SHIFT: Final = 5
_BLOCK: Final = 1 << _SHIFT
_BLOCKS: Final = (_BUCKETS + _BLOCK - 1) >> _SHIFT


def histogram_percentile(buckets: list[int], n: int, q: float) -> float | None:
    """The nearest-rank `q` quantile (ms) of `n` latencies counted in log `buckets`."""
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return _bucket_value(index)
    return _bucket_value(_BUCKETS - 1)  # pragma: no cover - counts always sum to n


def block_percentiles(
    buckets: list[int], blocks: list[int], n: int, qs: tuple[float, ...]
) -> tuple[float | None, ...]:
    """`histogram_percentile(buckets, n, q)` for each of `qs`, the very same floats, in
    O(blocks + block size): `blocks[k]` must hold the total of buckets k*32 .. k*32+31."""
    if n == 0:
        return (None,) * len(qs)
    cum = list(accumulate(blocks))
    out: list[float | None] = []
    for q in qs:
        rank = max(1, math.ceil(q * n))
        # The first block whose running total reaches `rank`, then the first bucket in it.
        block = bisect_left(cum, rank)
        if block == len(cum):  # pragma: no cover - counts always sum to n
            out.append(_VALUES[-1])
            continue
        start = block << _SHIFT
        inner = list(
            accumulate(buckets[start : start + _BLOCK], initial=cum[block] - blocks[block])
        )
        out.append(_VALUES[start + bisect_left(inner, rank, 1) - 1])
    return tuple(out)


def _seat(buckets: list[int], blocks: list[int], rank: int) -> tuple[int, int]:
    """The nearest-rank bucket of `rank` by the block counts, with the samples under it."""
    cum = list(accumulate(blocks))
    block = bisect_left(cum, rank)
    start = block << _SHIFT
    inner = list(accumulate(buckets[start : start + _BLOCK], initial=cum[block] - blocks[block]))
    k = bisect_left(inner, rank, 1)
    return start + k - 1, inner[k - 1]


def _walk(
    buckets: list[int], blocks: list[int], index: int, below: int, rank: int
) -> tuple[int, int]:
    """Move a cursor (`index`, and `below`: the samples in the buckets under it) to the
    nearest-rank bucket of `rank` (1 <= rank <= samples): the first bucket at which the
    running count reaches `rank`. A percentile moves little between two samples, so this
    is a step or two; a long way is taken by the block counts instead."""
    steps = 0
    while below >= rank:
        index -= 1
        below -= buckets[index]
        steps += 1
        if steps > _BLOCK:
            return _seat(buckets, blocks, rank)
    while below + buckets[index] < rank:
        below += buckets[index]
        index += 1
        steps += 1
        if steps > _BLOCK:
            return _seat(buckets, blocks, rank)
    return index, below


#: What of a probe window the rules can read: samples, failures, consecutive failures, p50
#: and p95 in ms, the last error (`WindowStats.rules_key`).
ProbeKey = tuple[int, int, int, float | None, float | None, str | None]


@dataclass(frozen=True, slots=True)
class WindowStats:
    """A snapshot of one color's window at a moment."""

    samples: int
    failures: int
    errors_5xx: int
    consecutive_failures: int
    consecutive_successes: int
    p50_ms: float | None
    p95_ms: float | None
    last_probe_at: float | None
    last_outcome: Outcome | None
    last_error: str | None

    def rules_key(self) -> ProbeKey:
        """What the rules can read of these statistics (all but `last_probe_at`)."""
        return (
            self.samples,
            self.failures,
            self.consecutive_failures,
            self.p50_ms,
            self.p95_ms,
            self.last_error,
        )

    @property
    def error_ratio(self) -> float | None:
        """Failed probes (any outcome but ok) over samples; None with no samples."""
        return self.failures / self.samples if self.samples else None

    @property
    def ratio_5xx(self) -> float | None:
        """Probes answered with a 5xx over samples; None with no samples."""
        return self.errors_5xx / self.samples if self.samples else None

    @property
    def health_ratio(self) -> float | None:
        """Probes that passed over samples; None with no samples."""
        return (self.samples - self.failures) / self.samples if self.samples else None


class SlidingWindow:
    """Probe results of one color over the last `span` seconds (at most `max_samples`).

    The counters (`consecutive_*`, `last_*`) are written by `add` only: `stats` keeps its
    answer until a sample is added or forgotten.
    """

    __slots__ = (
        "_5xx",
        "_b50",
        "_b95",
        "_blocks",
        "_buckets",
        "_fail",
        "_i50",
        "_i95",
        "_items",
        "_stats",
        "consecutive_failures",
        "consecutive_successes",
        "last_error",
        "last_outcome",
        "last_probe_at",
        "max_samples",
        "span",
    )

    def __init__(self, span: float, max_samples: int = MAX_SAMPLES) -> None:
        self.span = span
        self.max_samples = max_samples
        self._items: deque[tuple[float, int, int]] = deque()
        self._buckets = [0] * _BUCKETS
        self._blocks = [0] * _BLOCKS
        self._fail = 0
        self._5xx = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.last_probe_at: float | None = None
        self.last_outcome: Outcome | None = None
        self.last_error: str | None = None
        # The statistics as of the last change; None once a sample came or went.
        self._stats: WindowStats | None = None
        # A cursor per percentile `stats` gives: its bucket, and the samples under it.
        self._i50 = self._b50 = self._i95 = self._b95 = 0

    def add(self, now: float, outcome: Outcome, latency_s: float, error: str | None = None) -> None:
        """Record one probe result taken at monotonic time `now`."""
        # A replay adds a million samples: every name it can, local; the bucket of a
        # latency seen lately, remembered.
        bucket = _BUCKET_OF.get(latency_s)
        if bucket is None:
            bucket = _bucket_of(latency_s)
        if outcome is _OUTCOME_OK:
            kind = _OK
            self.consecutive_successes += 1
            self.consecutive_failures = 0
        else:
            kind = _5XX if outcome is _OUTCOME_5XX else _FAIL
            self._fail += 1
            self._5xx += kind == _5XX
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            self.last_error = error or outcome.value
        items = self._items
        items.append((now, kind, bucket))
        buckets, blocks = self._buckets, self._blocks
        buckets[bucket] += 1
        blocks[bucket >> _SHIFT] += 1
        self._stats = None
        i50, i95 = self._i50, self._i95
        if bucket < i50:
            self._b50 += 1
        if bucket < i95:
            self._b95 += 1
        self.last_probe_at = now
        self.last_outcome = outcome
        if len(items) > self.max_samples:
            self._drop_oldest()
        horizon = now - self.span
        # `expire`, with `_drop_oldest` inlined (a sample in, usually one out).
        while items and items[0][0] < horizon:
            _, kind, bucket = items.popleft()
            buckets[bucket] -= 1
            blocks[bucket >> _SHIFT] -= 1
            if bucket < i50:
                self._b50 -= 1
            if bucket < i95:
                self._b95 -= 1
            if kind != _OK:
                self._fail -= 1
                self._5xx -= kind == _5XX

    def expire(self, now: float) -> None:
        """Forget samples older than the span."""
        horizon = now - self.span
        items = self._items
        while items and items[0][0] < horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, kind, bucket = self._items.popleft()
        self._buckets[bucket] -= 1
        self._blocks[bucket >> _SHIFT] -= 1
        self._stats = None
        if bucket < self._i50:
            self._b50 -= 1
        if bucket < self._i95:
            self._b95 -= 1
        if kind != _OK:
            self._fail -= 1
            self._5xx -= kind == _5XX

    def resize(self, span: float) -> None:
        """Change the span, keeping the samples that still fit (config reload)."""
        self.span = span
        if self.last_probe_at is not None:
            self.expire(self.last_probe_at)

    @property
    def failure_ratio(self) -> float:
        """Failed probes over samples right now; 0.0 with no samples (for gauges)."""
        return self._fail / len(self._items) if self._items else 0.0

    def percentile(self, q: float) -> float | None:
        """The nearest-rank `q` quantile of latency in milliseconds, approximately."""
        return block_percentiles(self._buckets, self._blocks, len(self._items), (q,))[0]

    def _percentiles(self, n: int) -> tuple[float, float]:
        """p50 and p95 (ms) of the `n` >= 1 samples, by the cursors."""
        # The ranks as `histogram_percentile` takes them (at least 1 as n >= 1), so the
        # very same buckets; a cursor still on its bucket does not move.
        buckets = self._buckets
        i, below, rank = self._i50, self._b50, ceil(0.50 * n)
        if not below < rank <= below + buckets[i]:
            i, self._b50 = _walk(buckets, self._blocks, i, below, rank)
            self._i50 = i
        p50 = _VALUES[i]
        i, below, rank = self._i95, self._b95, ceil(0.95 * n)
        if not below < rank <= below + buckets[i]:
            i, self._b95 = _walk(buckets, self._blocks, i, below, rank)
            self._i95 = i
        return p50, _VALUES[i]

    def stats(self, now: float) -> WindowStats:
        """The window as it stands at `now` (the same object until a sample comes or goes)."""
        items = self._items
        if items and items[0][0] < now - self.span:
            self.expire(now)
        stats = self._stats
        if stats is None:
            n = len(items)
            p50, p95 = self._percentiles(n) if n else (None, None)
            # Positional, in the fields' order: a call with keywords costs a quarter more,
            # and this runs at nearly every decision tick, for each color.
            stats = self._stats = WindowStats(
                n,
                self._fail,
                self._5xx,
                self.consecutive_failures,
                self.consecutive_successes,
                p50,
                p95,
                self.last_probe_at,
                self.last_outcome,
                self.last_error,
            )
        return stats

    def rules_key(self, now: float) -> ProbeKey:
        """What the rules read of the window at `now` (`stats(now).rules_key()`), without
        building the statistics (a replay asks at every tick)."""
        items = self._items
        if items and items[0][0] < now - self.span:
            self.expire(now)
        stats = self._stats
        if stats is not None:
            return stats.rules_key()
        n = len(items)
        if not n:
            return (0, self._fail, self.consecutive_failures, None, None, self.last_error)
        # `_percentiles`, its usual case inlined (each cursor still on its bucket).
        buckets = self._buckets
        i50, i95 = self._i50, self._i95
        b50, b95 = self._b50, self._b95
        r50, r95 = ceil(0.50 * n), ceil(0.95 * n)
        if b50 < r50 <= b50 + buckets[i50] and b95 < r95 <= b95 + buckets[i95]:
            p50, p95 = _VALUES[i50], _VALUES[i95]
        else:
            p50, p95 = self._percentiles(n)
        return (n, self._fail, self.consecutive_failures, p50, p95, self.last_error)
