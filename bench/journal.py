"""Reading guardd's journal lines for the times of its decisions."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def event_time(events: list[dict[str, Any]], name: str, after: float = 0.0) -> float | None:
    """Wall time of the first event `name` at or after `after`, or None."""
    for e in events:
        if e.get("event") != name:
            continue
        t = datetime.fromisoformat(str(e["ts"])).timestamp()
        if t >= after:
            return t
    return None
