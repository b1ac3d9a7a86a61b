"""The time format of guardd's files and answers: UTC RFC 3339 with milliseconds.

Its own module, holding only the standard library, so that guardctl reads a lock's
`until` without importing the journal.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = ["parse_rfc3339", "rfc3339", "until_wall"]


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with milliseconds, as every journal line carries."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 string; one without an offset is UTC.

    Raises `ValueError` for text that is not an ISO 8601 date and time.
    """
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def until_wall(until: object) -> float:
    """When a lock with this `until` ends (seconds since the epoch): infinity for a lock
    until unlocked (None) and for an `until` that cannot be read, taken as the longest so
    that no lock is ever shortened by mistake."""
    if not isinstance(until, str):
        return math.inf
    try:
        return parse_rfc3339(until)
    except ValueError:
        return math.inf
