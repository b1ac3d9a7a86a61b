"""The onsets of the rules' `for` across a restart: state.json's `onsets` (docs/contract.md §4).

A rule with a `for` (every P1 rule: `policy.p1_sustain`, 120 s by default) fires once its
condition has held that long. The rule table keeps each onset in monotonic time, which a
restart loses: every `for` would start afresh, and a guardd restarted more often than its
`for` (a crash loop, a watchdog kill, an upgrade) would never roll back on a P1 rule.

So guardd writes the onsets to state.json in wall time, with `seen`, the last whole second
at which they held (the document changes at most once a second while a condition is
pending, and not at all otherwise). The next start carries each one over
(`RuleTable.carry`) when guardd is back within the rule's `for` of `seen`: an outage longer
than the `for` itself could hide a whole healthy `for`, so that onset is dropped.
The onset continues on the first tick its rule holds, and is dropped by the first on which
its rule is judged and does not hold; time without a judgement (the outage, then the
`min_samples` a new window needs) counts against the same `for`. This is how Prometheus
keeps the `for` of its alerting rules across a restart, within an outage tolerance
(`--rules.alert.for-outage-tolerance`).

Pure: the caller gives the times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from guardd.core.rules import RuleTable
from guardd.core.types import COLORS, Color
from guardd.timestamps import parse_rfc3339, rfc3339

OnsetKey = tuple[str, Color]


class OnsetStamps:
    """Builds state.json's `onsets`, each onset's wall stamp made once: converted again on
    every tick, the clocks' jitter would change the document, and so rewrite the file."""

    def __init__(self) -> None:
        self._stamps: dict[tuple[str, Color, float], str] = {}

    def doc(self, table: RuleTable, mono: float, wall: float) -> dict[str, Any] | None:
        """`{"seen": <RFC 3339, whole second>, "onsets": [{"rule", "signal", "condition",
        "severity", "color", "since"}]}` for the rules with a `for` whose condition holds at
        monotonic `mono` (wall `wall`); None when there are none."""
        pending = table.pending_onsets()
        if not pending:
            self._stamps.clear()
            return None
        rules = {r.name: r for r in table.rules if r.for_s}
        stamps: dict[tuple[str, Color, float], str] = {}
        onsets: list[dict[str, Any]] = []
        for (name, color), since in sorted(pending.items()):
            rule = rules.get(name)
            if rule is None:
                continue  # no `for`: it fires as it holds, there is nothing to carry
            key = (name, color, since)
            stamp = self._stamps.get(key) or rfc3339(wall - (mono - since))
            stamps[key] = stamp
            onsets.append(
                {
                    "rule": name,
                    "signal": rule.signal,
                    "condition": rule.describe(),
                    "severity": rule.severity,
                    "color": color,
                    "since": stamp,
                }
            )
        self._stamps = stamps
        if not onsets:
            return None
        # When they were last seen to hold: the last tick that judged them, not now (a
        # replay builds the document of its guard's last tick at the next run's start).
        seen = wall - (mono - table.judged_at)
        return {"seen": rfc3339(math.floor(seen)), "onsets": onsets}


def carried(
    doc: object, table: RuleTable, mono: float, wall: float
) -> dict[OnsetKey, tuple[float, float]]:
    """The onsets of a saved `doc` (`OnsetStamps.doc`) to carry over at monotonic `mono`
    (wall `wall`), as `RuleTable.carry` takes them: (rule name, color) -> (monotonic
    onset, monotonic time it lapses). An onset whose rule is gone or changed (signal,
    condition, severity), or that is malformed (state.json is data), is not carried:
    its `for` starts afresh, as it did before onsets were kept."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("onsets"), list):
        return {}
    seen = _wall(doc.get("seen"))
    if seen is None:
        return {}
    # A wall clock stepped back meanwhile: the outage is not negative, only unknown to
    # be longer than nothing.
    outage = max(0.0, wall - seen)
    rules = {r.name: r for r in table.rules if r.for_s}
    out: dict[OnsetKey, tuple[float, float]] = {}
    for entry in doc["onsets"]:
        if not isinstance(entry, Mapping):
            continue
        rule = rules.get(entry.get("rule"))  # type: ignore[arg-type]
        color = entry.get("color")
        since = _wall(entry.get("since"))
        if rule is None or rule.for_s is None or since is None:
            continue
        c = next((k for k in COLORS if k == color), None)
        if c is None:
            continue
        if (entry.get("signal"), entry.get("condition"), entry.get("severity")) != (
            rule.signal,
            rule.describe(),
            rule.severity,
        ):
            continue
        left = rule.for_s - outage
        # (`seen` is floored to its second: an onset within that second is before it.)
        if left <= 0 or since >= seen + 1:
            continue
        out[rule.name, c] = (mono - (wall - since), mono + left)
    return out


def _wall(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        moment = parse_rfc3339(value)
    except ValueError:
        return None
    return moment if math.isfinite(moment) else None
