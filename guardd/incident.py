"""The timeline of one incident, built from journal lines alone (docs/contract.md §1).

An incident is one `rollback_started` and what the journal holds around it: the change
before it (`promote`, `switch`, `external_switch`), the first failing evidence, the
decision and its rule, the switch and its verification (`rollback_completed` or
`rollback_failed`, and any other line with its `rollback_id`), the QoS lock, its
extensions and its release, and every operator action in between. Pure: no I/O, so that
it reads the same from the daemon's history or from `events.jsonl` with the daemon down.

Incident ids are `INC-YYYYMMDD-N`: the UTC date of the `rollback_started` line and its
ordinal (from 1) among the `rollback_started` lines of that date in the journal. The
journal is append-only, so the id of a rollback never changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from guardd.timestamps import parse_rfc3339

__all__ = ["NoIncident", "build", "incident_ids"]

Event = Mapping[str, Any]

# The changes an incident can follow: traffic moved to a new release.
_CHANGES: Final = frozenset({"promote", "switch", "external_switch"})
# Where guardd itself or the switch target acted, not an operator.
_NOT_OPERATORS: Final = frozenset({"guardd", "external"})
_INC: Final = re.compile(r"INC-(\d{8})-(\d+)", re.IGNORECASE)


class NoIncident(LookupError):
    """No incident in the journal matches; the message says what was looked for."""


def _ts(event: Event) -> float | None:
    value = event.get("ts")
    if not isinstance(value, str):
        return None
    try:
        return parse_rfc3339(value)
    except ValueError:
        return None


def _day(event: Event) -> str | None:
    at = _ts(event)
    return None if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y%m%d")


def incident_ids(events: Sequence[Event]) -> dict[str, str]:
    """`rollback_started` id -> `INC-YYYYMMDD-N`, for every rollback in `events`.

    `events` must be the whole journal, oldest first: the ordinal counts the rollbacks of
    the day that precede it.
    """
    ids: dict[str, str] = {}
    per_day: dict[str, int] = {}
    for event in events:
        rid = event.get("id")
        day = _day(event)
        if event.get("event") != "rollback_started" or not isinstance(rid, str) or day is None:
            continue
        per_day[day] = per_day.get(day, 0) + 1
        ids[rid] = f"INC-{day}-{per_day[day]}"
    return ids


def _find(events: Sequence[Event], ids: Mapping[str, str], key: str | None) -> int:
    """The index in `events` of the `rollback_started` that `key` names (None: the last)."""
    starts = [
        i
        for i, e in enumerate(events)
        if e.get("event") == "rollback_started" and isinstance(e.get("id"), str)
    ]
    if not starts:
        raise NoIncident("no rollback in the journal")
    if key is None:
        return starts[-1]
    wanted = key.strip().lower()
    if _INC.fullmatch(wanted):
        for i in starts:
            if ids[events[i]["id"]].lower() == wanted:
                return i
        raise NoIncident(f"no incident {key} in the journal")
    matches = [i for i in starts if str(events[i]["id"]).lower().startswith(wanted)]
    if len(wanted) >= 4 and len(matches) == 1:
        return matches[0]
    if len(matches) > 1 and len(wanted) >= 4:
        raise NoIncident(f"rollback id {key!r} is ambiguous: give more of it")
    raise NoIncident(f"no rollback {key!r} in the journal (give a rollback id or INC-YYYYMMDD-N)")


def _seconds(later: Event | None, earlier: Event | None) -> float | None:
    if later is None or earlier is None:
        return None
    a, b = _ts(later), _ts(earlier)
    return None if a is None or b is None else round(a - b, 3)


def _step(event: Event, kind: str, start: float | None) -> dict[str, Any]:
    at = _ts(event)
    evidence = event.get("evidence")
    return {
        "ts": event.get("ts"),
        "t_s": None if at is None or start is None else round(at - start, 3),
        "kind": kind,
        "event": event.get("event"),
        "from": event.get("from"),
        "to": event.get("to"),
        "severity": event.get("severity"),
        "rule": evidence.get("rule") if isinstance(evidence, Mapping) else None,
        "by": event.get("by"),
        "reason": event.get("reason"),
        "duration_ms": event.get("duration_ms"),
        "id": event.get("id"),
    }


def _kind(event: Event, rollback_id: str) -> str:
    """What part of the incident a line is (docs/contract.md §1, `incident --json`)."""
    name = event.get("event")
    if event.get("id") == rollback_id:
        return "decision"
    if event.get("rollback_id") == rollback_id:
        return "switch"
    if name in ("qos_locked", "qos_extended", "qos_released"):
        return "lock"
    if event.get("by") not in _NOT_OPERATORS and event.get("by") is not None:
        return "operator"
    if name in _CHANGES:
        return "change"
    if event.get("severity") is not None or name in ("alert", "hold"):
        return "evidence"
    return "other"


def _first_evidence(events: Sequence[Event], since: int, at: int) -> int:
    """Where the failure first showed: the first alert or hold with a severity about the
    failing color from `since` on; the decision (`at`) itself when nothing warned before it.

    An operator's `resumed` out of a `hold` acknowledged whatever warned before it: an
    earlier episode (a hold since resolved) is not this incident's start. A `resumed` that
    ended a pause acknowledged nothing: what failed while guardd was paused is this
    incident's start, and a pause only delayed the decision.
    """
    failing = events[at].get("from")
    since = next(
        (
            i + 1
            for i in range(at - 1, since - 1, -1)
            if events[i].get("event") == "resumed" and _resumed_from(events, i, since) == "hold"
        ),
        since,
    )
    return next(
        (
            i
            for i in range(since, at)
            if events[i].get("event") in ("alert", "hold")
            and events[i].get("severity") is not None
            and events[i].get("from") in (failing, None)
        ),
        at,
    )


def _resumed_from(events: Sequence[Event], resumed: int, since: int) -> str | None:
    """What the `resumed` at `resumed` ended: `hold` or `paused` (the last of either before
    it, from `since` on), or None."""
    return next(
        (
            name
            for i in range(resumed - 1, since - 1, -1)
            if (name := events[i].get("event")) in ("hold", "paused")
        ),
        None,
    )


def build(events: Sequence[Event], key: str | None = None) -> dict[str, Any]:
    """The incident `key` names (a rollback id, a prefix of one, or an INC id; None: the last).

    `events` is the whole journal, oldest first. Returns the docs/contract.md §1
    `incident --json` object; raises `NoIncident`.
    """
    ids = incident_ids(events)
    at = _find(events, ids, key)
    decision = events[at]
    rollback_id = str(decision["id"])
    failing = decision.get("from")
    # The change it follows: the last one since the previous incident's decision.
    floor = 0
    for i in range(at - 1, -1, -1):
        if events[i].get("event") == "rollback_started":
            floor = i + 1
            break
    change_at = next(
        (i for i in range(at - 1, floor - 1, -1) if events[i].get("event") in _CHANGES), None
    )
    change = events[change_at] if change_at is not None else None
    first_at = _first_evidence(events, floor if change_at is None else change_at + 1, at)
    first = events[first_at]
    # Its end: the release of the lock it took, or the next incident, or the journal's end.
    closed: Event | None = None
    locked: Event | None = None
    released: Event | None = None
    extended: list[Event] = []
    end_at = len(events)
    for i in range(at + 1, len(events)):
        event = events[i]
        name = event.get("event")
        if name == "rollback_started":
            end_at = i
            break
        if event.get("rollback_id") == rollback_id and name in (
            "rollback_completed",
            "rollback_failed",
        ):
            closed = closed or event
        elif name == "qos_locked" and closed is not None and locked is None:
            locked = event
        elif name == "qos_extended" and locked is not None and released is None:
            extended.append(event)
        elif name == "qos_released" and locked is not None and released is None:
            released = event
            end_at = i + 1
            break
        elif closed is not None and closed.get("event") == "rollback_failed" and name in _CHANGES:
            # After a failed rollback, whatever moves traffic ends it.
            end_at = i + 1
            break
    start = _ts(first)
    steps = []
    if change is not None:
        steps.append(_step(change, "change", start))
    steps += [_step(e, _kind(e, rollback_id), start) for e in events[first_at:end_at]]
    completed = (
        closed if closed is not None and closed.get("event") == "rollback_completed" else None
    )
    duration_ms = completed.get("duration_ms") if completed is not None else None
    evidence = decision.get("evidence")
    if completed is None:
        outcome = "failed" if closed is not None else "in_progress"
    else:
        outcome = "recovered" if released is not None else "guard_window"
    return {
        "id": ids[rollback_id],
        "rollback_id": rollback_id,
        "guard": decision.get("guard"),
        "from": failing,
        "to": decision.get("to"),
        "severity": decision.get("severity"),
        "rule": evidence.get("rule") if isinstance(evidence, Mapping) else None,
        "evidence": dict(evidence) if isinstance(evidence, Mapping) else None,
        "cause": decision.get("reason"),
        "by": decision.get("by"),
        "outcome": outcome,
        "times": {
            "change": change.get("ts") if change is not None else None,
            "start": first.get("ts"),
            "detected": decision.get("ts"),
            "rolled_back": completed.get("ts") if completed is not None else None,
            "failed": closed.get("ts") if closed is not None and completed is None else None,
            "locked": locked.get("ts") if locked is not None else None,
            "recovered": released.get("ts") if released is not None else None,
        },
        "durations_s": {
            "since_change": _seconds(decision, change),
            "time_to_detect": _seconds(decision, first),
            "switch": round(duration_ms / 1000, 3)
            if isinstance(duration_ms, int | float) and not isinstance(duration_ms, bool)
            else None,
            "time_to_recover": _seconds(completed, decision),
            "time_under_lock": _seconds(released, locked),
            "total": _seconds(released or completed or closed, first),
        },
        "lock": {
            "locked_at": locked.get("ts") if locked is not None else None,
            "until": (extended[-1] if extended else locked).get("until")
            if locked is not None
            else None,
            "extended": len(extended),
            "released_at": released.get("ts") if released is not None else None,
            "released_by": released.get("by") if released is not None else None,
            "release_reason": released.get("reason") if released is not None else None,
        },
        "steps": steps,
    }
