"""One color's real requests over a sliding span, in memory that does not grow with traffic.

The span is cut into slots (`span / 120` up to 2 minutes, 1 s each up to 10 minutes,
`span / 600` beyond: `guardd.core.slots`). A
slot holds its requests' count per status class, the number of requests that had a
latency, their latency summed in whole microseconds, and a sparse log-bucketed latency
histogram (the buckets of `guardd.core.window`). Running totals are updated as a request
enters and as a slot expires, so `add` is O(1) and a reading O(latency buckets), whatever
the request rate: memory is bounded by slots x buckets, never by requests.

A request at time `t` is in the window at `now` while its slot is one of the last `slots`
ones, i.e. it is counted while it is younger than about `span`: never once it is older
than `span`, always while it is younger than `span - slot`.
"""

from __future__ import annotations

from typing import Final

from guardd.core.signals import Reading
from guardd.core.slots import SlotWindow
from guardd.core.window import _BUCKETS, _bucket, histogram_percentile

#: The longest request time a line can say (s): nginx's `$request_time` is bounded by its
#: timeouts, far below a day. `1e308` passed the finite check and overflowed the
#: microseconds it is bucketed in (a traceback in replay; the live adapter restarted).
MAX_REQUEST_TIME_S: Final = 86_400.0
#: The status classes counted, in the order of `detail`; `1xx` is there for upgrades (101).
CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
_5XX: Final = 4
# Latency (us) -> bucket for the values seen most: nginx logs whole milliseconds, so a few
# thousand entries spare most requests a logarithm. Bounded: past the cap, no new entries.
_BUCKET_CACHE_MAX: Final = 4096
_bucket_of_us: dict[int, int] = {}


def status_class(status: int) -> str:
    """`"2xx"` for 200 ... 299 and so on; ValueError outside 100 ... 599."""
    if not 100 <= status <= 599:
        raise ValueError(f"HTTP status {status} is not within 100 ... 599")
    return CLASSES[status // 100 - 1]


class TrafficWindow(SlotWindow):
    """The requests of one color over the last `span_s` seconds (monotonic time).

    `created_at` is the monotonic time the window starts from: the reading's `last_at`
    until the first request arrives, so that a signal that never saw a request goes stale.
    """

    __slots__ = (
        "_classes",
        "_empty",
        "_hists",
        "_sum_us",
        "_timed",
        "_tot_classes",
        "_tot_hist",
        "_tot_sum_us",
        "_tot_timed",
        "last_at",
    )

    def __init__(self, span_s: float, created_at: float) -> None:
        super().__init__(span_s, created_at)
        n = self._slots
        self._classes = [[0] * len(CLASSES) for _ in range(n)]
        self._timed = [0] * n
        self._sum_us = [0] * n
        self._hists: list[dict[int, int]] = [{} for _ in range(n)]
        self._tot_classes = [0] * len(CLASSES)
        self._tot_timed = 0
        self._tot_sum_us = 0
        self._tot_hist = [0] * _BUCKETS
        #: Monotonic time of the newest request, or `created_at` before the first.
        self.last_at = created_at
        self._empty = True

    def add(self, at: float, status: int, request_time_s: float | None) -> bool:
        """Count one request that ended at monotonic time `at`.

        `status` is its HTTP status (100 ... 599, else ValueError); `request_time_s` its
        latency in seconds (finite, >= 0, else ValueError), or None if it has none. A
        request already older than the window (relative to the newest slot seen) is not
        counted: the result is False.
        """
        cls = status // 100 - 1
        if not 0 <= cls < len(CLASSES):
            raise ValueError(f"HTTP status {status} is not within 100 ... 599")
        if request_time_s is not None and not 0.0 <= request_time_s <= MAX_REQUEST_TIME_S:
            raise ValueError(
                f"request time {request_time_s!r} is not a time a request took "
                f"(0 to {MAX_REQUEST_TIME_S:g} s)"
            )
        i = self._slot_at(at)
        if i is None:
            return False
        self._classes[i][cls] += 1
        self._tot_classes[cls] += 1
        if request_time_s is not None:
            us = int(request_time_s * 1_000_000 + 0.5)
            b = _bucket_of_us.get(us)
            if b is None:
                b = _bucket(us / 1000.0)
                if len(_bucket_of_us) < _BUCKET_CACHE_MAX:
                    _bucket_of_us[us] = b
            self._timed[i] += 1
            self._sum_us[i] += us
            hist = self._hists[i]
            hist[b] = hist.get(b, 0) + 1
            self._tot_timed += 1
            self._tot_sum_us += us
            self._tot_hist[b] += 1
        self.last_at = at if self._empty else max(self.last_at, at)
        self._empty = False
        return True

    def _clear(self, i: int) -> None:
        counts = self._classes[i]
        for c, count in enumerate(counts):
            if count:
                self._tot_classes[c] -= count
                counts[c] = 0
        if self._timed[i]:
            self._tot_timed -= self._timed[i]
            self._tot_sum_us -= self._sum_us[i]
            self._timed[i] = 0
            self._sum_us[i] = 0
            for b, count in self._hists[i].items():
                self._tot_hist[b] -= count
            self._hists[i] = {}

    def _percentile(self, q: float) -> float | None:
        return histogram_percentile(self._tot_hist, self._tot_timed, q)

    def reading(self, now: float) -> Reading:
        """The window at monotonic time `now`.

        Stats: `requests` (count in the window), `rps` (requests / span_s), `error_ratio`
        (5xx / requests; None with no requests), `p50_ms`, `p95_ms`, `p99_ms`, `mean_ms`
        (latency of the timed requests, ms; None with none; percentiles within ~2 %).
        `detail` holds the count per status class (`"1xx"` ... `"5xx"`).
        """
        self._move_to(now)
        requests = sum(self._tot_classes)
        timed = self._tot_timed
        stats: dict[str, float | None] = {
            "requests": requests,
            "rps": requests / self.span_s,
            "error_ratio": self._tot_classes[_5XX] / requests if requests else None,
            "p50_ms": self._percentile(0.50),
            "p95_ms": self._percentile(0.95),
            "p99_ms": self._percentile(0.99),
            "mean_ms": self._tot_sum_us / timed / 1000.0 if timed else None,
        }
        return Reading(
            samples=requests,
            window_s=self.span_s,
            stats=stats,
            last_at=self.last_at,
            detail=dict(zip(CLASSES, self._tot_classes, strict=True)),
        )

    def footprint(self) -> int:
        """How many counters the window holds (for tests of the memory bound)."""
        return (
            self._slots * (len(CLASSES) + 2)
            + sum(len(h) for h in self._hists)
            + len(self._tot_hist)
            + len(CLASSES)
        )
