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

from guardd.core.slots import MAX_SLOTS, SlotWindow

__all__ = ["MAX_SLOTS", "CountWindow"]


class CountWindow(SlotWindow):
    """Events and hits of one source over the last `span_s` seconds (monotonic time).

    `created_at` is the monotonic time the window starts from. The caller bounds the text
    it hands `add` (only one text is kept per slot).
    """

    __slots__ = ("_events", "_first", "_hits", "_tot")

    def __init__(self, span_s: float, created_at: float) -> None:
        super().__init__(span_s, created_at)
        n = self._slots
        self._events = [0] * n
        self._hits = [0] * n
        self._first: list[str | None] = [None] * n
        # Totals over the window: [events, hits].
        self._tot = [0, 0]

    def add(self, at: float, events: int, hits: int = 0, first_hit: str | None = None) -> bool:
        """Count `events` events, `hits` of them hits, seen at monotonic time `at`.

        `first_hit` is the text of the first hit among them; it is kept if its slot holds
        none yet. Counts must satisfy `0 <= hits <= events` (else ValueError). Events
        older than the window (relative to the newest slot seen) are not counted: the
        result is False.
        """
        if not 0 <= hits <= events:
            raise ValueError(f"need 0 <= hits <= events, not hits={hits} events={events}")
        i = self._slot_at(at)
        if i is None:
            return False
        self._events[i] += events
        self._hits[i] += hits
        self._tot[0] += events
        self._tot[1] += hits
        if hits and first_hit is not None and self._first[i] is None:
            self._first[i] = first_hit
        return True

    def _clear(self, i: int) -> None:
        self._tot[0] -= self._events[i]
        self._tot[1] -= self._hits[i]
        self._events[i] = self._hits[i] = 0
        self._first[i] = None

    def counts(self, now: float) -> tuple[int, int]:
        """(events, hits) in the window at monotonic time `now`."""
        self._move_to(now)
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
