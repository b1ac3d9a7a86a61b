"""The rollback budget: how many automatic rollbacks fell within `policy.budget_window`.

Owns the history of automatic rollbacks (monotonic seconds) and the moment an operator's
`resumed` last refilled the budget. It is fed journal entries, both as they are written
and, at start, read back from the journal; it performs no I/O and reads no clock.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from guardd.core.types import GUARDD


class RollbackBudget:
    """Automatic rollbacks counted against `policy.max_rollbacks`.

    The budget runs on the monotonic clock, so that a step of the wall clock can neither
    spend it nor refill it.
    """

    def __init__(self) -> None:
        self._auto_rollbacks: deque[float] = deque()
        self._since = -math.inf

    def count(self, entry: dict[str, Any], at: float) -> None:
        """Count an automatic rollback, or an operator's `resumed`, at monotonic `at`."""
        if entry.get("event") == "rollback_completed" and entry.get("by") == GUARDD:
            self._auto_rollbacks.append(at)
        elif entry.get("event") == "resumed":
            self._since = at
            self._auto_rollbacks.clear()

    def spent(self, now: float, window: float) -> int:
        """Automatic rollbacks in the `window` seconds before monotonic `now` (and since
        the last `resumed`); older ones are forgotten."""
        horizon = max(now - window, self._since)
        while self._auto_rollbacks and self._auto_rollbacks[0] < horizon:
            self._auto_rollbacks.popleft()
        return len(self._auto_rollbacks)
