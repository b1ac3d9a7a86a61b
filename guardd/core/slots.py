"""The time slots of a sliding window whose memory does not grow with the event rate.

A span is cut into slots (`span / 120` for spans up to 2 minutes, 1 s each up to 10
minutes, `span / 600` beyond). A
window keeps its own data per slot and running totals; this base moves the window forward
and asks it to empty each slot that falls out. An event at time `t` is counted while its
slot is one of the last `slots` ones: never once it is older than `span`, always while
younger than `span - slot`.
"""

from __future__ import annotations

import math
from typing import Final

#: Slots at most; a longer span gets wider slots so that memory stays bounded.
MAX_SLOTS: Final = 600
#: Slots at least: a span shorter than this many seconds gets narrower slots. A window is
#: short of its span by up to a slot (its oldest slot emptied whole), so with 1 s slots a
#: 30 s window held 29-30 s of requests (3 % short) and a 5 s one 4-5 s (20 %): a ratio
#: rule read the newest requests of a burst's edge as a whole window and fired below its
#: threshold. At least 120 slots keep that under 1 % of any span.
MIN_SLOTS: Final = 120


class SlotWindow:
    """A ring of slots over the last `span_s` seconds of monotonic time.

    `created_at` is the monotonic time the window starts from. Subclasses hold their data
    per ring index and empty one index in `_clear`.
    """

    __slots__ = ("_current", "_slot_s", "_slots", "span_s")

    def __init__(self, span_s: float, created_at: float) -> None:
        if not (span_s > 0 and math.isfinite(span_s)):
            raise ValueError(f"span_s must be a positive number of seconds, not {span_s!r}")
        self.span_s = float(span_s)
        self._slots = min(max(math.ceil(self.span_s), MIN_SLOTS), MAX_SLOTS)
        self._slot_s = self.span_s / self._slots
        # The number (not the ring index) of the newest slot the window has moved to.
        self._current = math.floor(created_at / self._slot_s)

    @property
    def slot_s(self) -> float:
        """The width of one slot in seconds: the window's granularity."""
        return self._slot_s

    def _slot_at(self, at: float) -> int | None:
        """The ring index of monotonic time `at`, moving the window up to it; None for a
        time already older than the window (relative to the newest slot seen)."""
        k = math.floor(at / self._slot_s)
        if k > self._current:
            self._advance(k)
        elif k <= self._current - self._slots:
            return None
        return k % self._slots

    def _move_to(self, now: float) -> None:
        """Move the window up to monotonic `now`, emptying what falls out."""
        k = math.floor(now / self._slot_s)
        if k > self._current:
            self._advance(k)

    def _advance(self, k: int) -> None:
        n = self._slots
        for slot in range(max(self._current + 1, k - n + 1), k + 1):
            self._clear(slot % n)
        self._current = k

    def _clear(self, i: int) -> None:
        """Empty ring index `i`, taking its counts out of the running totals."""
        raise NotImplementedError
