"""Events and hits over a sliding span, in memory that does not grow with the event rate.

Like `guardd.core.traffic`, the span is cut into slots (1 s each for spans up to 10
minutes; `span / 600` beyond). A slot holds how many events (log lines) and hits
(matching lines) it saw, and the first hit's text; running totals are updated as events
enter and as slots expire, so `add` is O(1), `counts` O(1) amortised and `first_hit`
O(slots), whatever the rate. An event at time `t` is counted while its slot is one of the
last `slots` ones: never once it is older than `span`, always while younger than
`span - slot`.
"""

from __future__ import annotations

import math
from typing import Final

#: Slots at most; a longer span gets wider slots so that memory stays bounded.
MAX_SLOTS: Final = 600


class CountWindow:
    """Events and hits of one source over the last `span_s` seconds (monotonic time).

    `created_at` is the monotonic time the window starts from. The caller bounds the text
    it hands `add` (only one text is kept per slot).
    """

    __slots__ = ("_current", "_events", "_first", "_hits", "_slot_s", "_slots", "_tot", "span_s")

    def __init__(self, span_s: float, created_at: float) -> None:
        if not (span_s > 0 and math.isfinite(span_s)):
            raise ValueError(f"span_s must be a positive number of seconds, not {span_s!r}")
        self.span_s = float(span_s)
        self._slots = min(math.ceil(self.span_s), MAX_SLOTS)
        self._slot_s = self.span_s / self._slots
        n = self._slots
        self._events = [0] * n
        self._hits = [0] * n
        self._first: list[str | None] = [None] * n
        # Totals over the window: [events, hits].
        self._tot = [0, 0]
        # The number (not the ring index) of the newest slot the window has moved to.
        self._current = math.floor(created_at / self._slot_s)

    @property
    def slot_s(self) -> float:
        """The width of one slot in seconds: the window's granularity."""
        return self._slot_s

    def add(self, at: float, events: int, hits: int = 0, first_hit: str | None = None) -> bool:
        """Count `events` events, `hits` of them hits, seen at monotonic time `at`.

        `first_hit` is the text of the first hit among them; it is kept if its slot holds
        none yet. Counts must satisfy `0 <= hits <= events` (else ValueError). Events
        older than the window (relative to the newest slot seen) are not counted: the
        result is False.
        """
        if not 0 <= hits <= events:
            raise ValueError(f"need 0 <= hits <= events, not hits={hits} events={events}")
        k = math.floor(at / self._slot_s)
        if k > self._current:
            self._advance(k)
        elif k <= self._current - self._slots:
            return False
        i = k % self._slots
        self._events[i] += events
        self._hits[i] += hits
        self._tot[0] += events
        self._tot[1] += hits
        if hits and first_hit is not None and self._first[i] is None:
            self._first[i] = first_hit
        return True

    def _advance(self, k: int) -> None:
        """Move the newest slot to `k`, emptying the slots that fall out of the window."""
        n = self._slots
        for slot in range(max(self._current + 1, k - n + 1), k + 1):
            i = slot % n
            self._tot[0] -= self._events[i]
            self._tot[1] -= self._hits[i]
            self._events[i] = self._hits[i] = 0
            self._first[i] = None
        self._current = k

    def counts(self, now: float) -> tuple[int, int]:
        """(events, hits) in the window at monotonic time `now`."""
        k = math.floor(now / self._slot_s)
        if k > self._current:
            self._advance(k)
        return self._tot[0], self._tot[1]

    def first_hit(self, now: float) -> str | None:
        """The text of the oldest hit still in the window at `now` (None if none kept)."""
        self.counts(now)
        n = self._slots
        for slot in range(self._current - n + 1, self._current + 1):
            text = self._first[slot % n]
            if text is not None:
                return text
        return None

    def footprint(self) -> int:
        """How many counters and texts the window holds (for tests of the memory bound)."""
        return 3 * self._slots + len(self._tot)
