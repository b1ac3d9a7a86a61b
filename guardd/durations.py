"""Durations as guardd's config and guardctl write them: one grammar for both.

`"250ms"`, `"3s"`, `"5m"`, `"1h"`, `"1m30s"` (one or more number-unit parts, as Go's
`time.ParseDuration` takes them, which is what Prometheus and blackbox_exporter configs
read), or a plain number of seconds. Imported by guardctl, so it imports nothing heavy.
"""

from __future__ import annotations

import re
from typing import Final

# ASCII digits only: `\d` would take an Arabic-Indic ٣ as 3, which a count refuses.
_NUM = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"  # 2, 2.5, .5 (not "2.": a slip)
#: A plain number of seconds.
NUMBER: Final = re.compile(rf"^{_NUM}$")
# Spaces may stand between parts ("1m 30s") and before a unit ("5 ms"), never inside a
# number: "5 00ms" is a typo, not 500ms.
_DURATION: Final = re.compile(rf"^(?:{_NUM}[ \t]*(?:ms|h|m|s)[ \t]*)+$")
_DURATION_PART: Final = re.compile(rf"({_NUM})[ \t]*(ms|h|m|s)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HELP: Final = 'must be a duration such as "250ms", "3s", "1m30s" or seconds'


def parse_duration(value: object) -> float:
    """Seconds from `"250ms"`, `"3s"`, `"5m"`, `"1h"`, `"1m30s"` or a plain number of seconds.

    Raises `ValueError` for anything else (a negative string, an unknown unit, a bool).
    """
    if isinstance(value, bool):  # pydantic turns a ValueError into the operator's message
        raise ValueError(DURATION_HELP)  # noqa: TRY004
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if NUMBER.match(text):
            return float(text)
        if _DURATION.match(text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    raise ValueError(DURATION_HELP)


def format_duration(seconds: float) -> str:
    """`1000` -> `"16m40s"`: seconds written the way a config would say them."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{int(hours)}h" if hours else "", f"{int(minutes)}m" if minutes else ""]
    parts.append(f"{round(secs, 3):g}s" if secs or not (hours or minutes) else "")
    return "".join(parts)
