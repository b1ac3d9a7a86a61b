"""Human text for guardctl: the status table, the history and the QoS lock.

Everything here takes the JSON shapes guardd sends and returns plain lines; only the
standard library is used, so that guardctl starts fast. Text that came from outside
(upstream errors, operators' reasons) is escaped so it cannot drive the terminal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

from guardd.core.types import COLORS, TRAFFIC_MOVES

__all__ = [
    "clean",
    "render_change",
    "render_history",
    "render_incident",
    "render_journal_line",
    "render_qos",
    "render_status",
    "render_watch_line",
    "use_color",
    "watch_key",
]

_RESET: Final = "\x1b[0m"
_GREEN: Final = "\x1b[32m"
_YELLOW: Final = "\x1b[33m"
_RED: Final = "\x1b[1;31m"
_BOLD: Final = "\x1b[1m"
_MAX_ERROR_CHARS: Final = 40
# A decision's last answer, on a line of its own: room for `body does not match
# expect_json: status is "DEGRADED", expected "UP"`, bounded against a hostile upstream's.
_MAX_EVIDENCE_ERROR_CHARS: Final = 160
_NONE: Final = "-"


def use_color(stream: TextIO) -> bool:
    """Whether to write ANSI colors: only to a terminal, and never when `NO_COLOR` is set."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Paint:
    """Wraps text in ANSI codes, or leaves it alone when color is off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, code: str | None) -> str:
        return f"{code}{text}{_RESET}" if self.enabled and code else text


def clean(value: object) -> str:
    """`value` as text that cannot drive the terminal: control characters escaped."""
    # Control characters from an upstream's error or an operator's reason must not
    # reach the terminal raw: an escape sequence could rewrite what the operator sees.
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _text(value: object) -> str:
    return _NONE if value is None or value == "" else clean(value)


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _text(value)


def _ms(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _NONE
    return f"{value:.1f}ms" if value < 1000 else f"{value / 1000:.2f}s"


def _ratio(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _NONE
    return f"{value * 100:.1f}%"


def _duration(value: object) -> str:
    """Seconds as an operator reads them: 0.4s, 42s, 13m32s, 5h07m, 2d03h."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _NONE
    if value < 1:
        return f"{value * 1000:.0f}ms" if value < 0.1 else f"{value:.1f}s"
    if value < 10:
        return f"{value:.1f}s"
    seconds = round(value)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _interval(value: object) -> str:
    """A configured interval, written the way the config spells it: 250ms, 1s, 5m00s."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return _NONE
    if value < 1:
        return f"{value * 1000:.0f}ms"
    return f"{value:g}s" if value < 60 else _duration(value)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _healthy(upstream: Mapping[str, Any]) -> tuple[str, str | None]:
    # Stale wins over whatever `healthy` says: guardd cannot vouch for old news.
    if upstream.get("stale"):
        return "stale", _YELLOW
    healthy = upstream.get("healthy")
    if healthy is True:
        return "yes", _GREEN
    if healthy is False:
        return "NO", _RED
    return _NONE, None


_HEADERS: Final = (
    "",
    "COLOR",
    "HEALTHY",
    "FAILS",
    "ERR%",
    "SAMPLES",
    "P50",
    "P95",
    "LAST ERROR",
    "AGE",
)
# Numbers are right-aligned so that their digits line up.
_RIGHT: Final = frozenset({"FAILS", "ERR%", "SAMPLES", "P50", "P95", "AGE"})


def _table(
    rows: Sequence[Sequence[tuple[str, str | None]]],
    paint: _Paint,
    headers: Sequence[str] = _HEADERS,
    right: frozenset[str] = _RIGHT,
) -> list[str]:
    widths = [max(len(h), *(len(row[i][0]) for row in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in [[(h, None) for h in headers], *rows]:
        cells = []
        for (text, code), header, width in zip(row, headers, widths, strict=True):
            padded = text.rjust(width) if header in right else text.ljust(width)
            cells.append(paint(padded, code))
        lines.append("  ".join(cells).rstrip())
    return lines


def _rule_cell(state: object) -> tuple[str, str | None]:
    if not isinstance(state, Mapping):
        return _NONE, None
    name = state.get("state")
    since = state.get("since")
    when = f" since {_clock(since)}" if since else ""
    if name == "firing":
        return f"FIRING{when}", _RED
    if name == "pending":
        why = f": {clean(state.get('why'))}" if state.get("why") else ""
        return f"pending{when}{why}", _YELLOW
    if name == "inconclusive":
        return f"inconclusive: {clean(state.get('why'))}", _YELLOW
    return _text(name), None


def _traffic(stats: object) -> str:
    if not isinstance(stats, Mapping):
        return "no data"
    text = (
        f"{_number(stats.get('rps'))} req/s, {_ratio(stats.get('error_ratio'))} 5xx, "
        f"p95 {_ms(stats.get('p95_ms'))} ({_text(stats.get('samples'))} requests)"
    )
    base = stats.get("baseline")
    if isinstance(base, Mapping):
        text += f"; baseline {_ratio(base.get('error_ratio'))} 5xx, p95 {_ms(base.get('p95_ms'))}"
    return text


def _values(stats: object) -> str:
    """A signal's statistics as they are (kinds other than access_log)."""
    if not isinstance(stats, Mapping):
        return "no data"
    shown = [
        f"{clean(k)} {_number(v)}"
        for k, v in stats.items()
        if k not in ("samples", "window_s", "baseline")
    ]
    return f"{', '.join(shown)} ({_text(stats.get('samples'))} samples)"


def _signal_lines(signals: object) -> list[str]:
    if not isinstance(signals, Mapping) or not signals:
        return []
    lines = []
    for name, doc in sorted(signals.items()):
        if not isinstance(doc, Mapping):
            continue
        head = f"signal {clean(name)} ({_text(doc.get('kind'))}): {_text(doc.get('state'))}"
        if doc.get("problem"):
            head += f"; PROBLEM: {clean(doc['problem'])}"
        if doc.get("stale"):
            head += "; STALE"
        lines.append(head)
        if doc.get("kind") == "log_match":
            files = doc.get("colors")
            files = files if isinstance(files, Mapping) else {}
            lines += [f"  {c:<6}{_log_match(doc.get(c), files.get(c))}" for c in COLORS]
            continue
        if doc.get("problem") and doc.get("kind") == "access_log":
            # Nothing counted is no "0 req/s": what users got is unknown while it reads
            # nothing of use (a missing log, lines that fit no color).
            lines += [f"  {c:<6}unknown: the signal gives nothing" for c in COLORS]
            continue
        show = _traffic if doc.get("kind") == "access_log" else _values
        lines += [f"  {c:<6}{show(doc.get(c))}" for c in COLORS]
    return [*lines, ""]


def _log_match(stats: object, file: object) -> str:
    """`3 matches (0.05/s) in 812 lines; reading /var/log/app.log` for a log_match color."""
    if not isinstance(stats, Mapping):
        return "no log"
    text = (
        f"{_text(stats.get('count'))} matches ({_number(stats.get('rate'))}/s) "
        f"in {_text(stats.get('samples'))} lines"
    )
    if isinstance(file, Mapping):
        text += f"; {_text(file.get('state'))}"
    return text


def _rules_table(rules: object, active: object, paint: _Paint) -> list[str]:
    if not isinstance(rules, list) or not rules:
        return []
    # Which column is live: the standby is judged too, but a rule firing there only says
    # why traffic left it (or why a promote would be refused), not that users are hurt.
    headers = [
        "RULE",
        "SEV",
        "WHEN",
        *(
            c.upper() + (" (active)" if c == active else " (standby)" if active else "")
            for c in COLORS
        ),
    ]
    rows = []
    for rule in rules:
        if not isinstance(rule, Mapping):
            continue
        when = clean(rule.get("condition"))
        for_s = rule.get("for_s")
        if isinstance(for_s, int | float) and for_s > 0:
            when += f" for {_duration(for_s)}"
        name = clean(rule.get("rule")) + (" (dry run)" if rule.get("dry_run") else "")
        rows.append(
            [(name, None), (_text(rule.get("severity")), None), (when, None)]
            + [_rule_cell(rule.get(c)) for c in COLORS]
        )
    return [*_table(rows, paint, headers, frozenset()), ""] if rows else []


def _upstream_row(
    color: str, upstream: Mapping[str, Any], active: bool
) -> list[tuple[str, str | None]]:
    last_error = upstream.get("last_error")
    return [
        ("*" if active else "", _BOLD if active else None),
        (clean(color), _BOLD if active else None),
        _healthy(upstream),
        (_text(upstream.get("consecutive_failures")), None),
        (_ratio(upstream.get("error_ratio")), None),
        (_text(upstream.get("samples")), None),
        (_ms(upstream.get("p50_ms")), None),
        (_ms(upstream.get("p95_ms")), None),
        (_shorten(_text(last_error), _MAX_ERROR_CHARS), None),
        (_duration(upstream.get("last_probe_age_s")), None),
    ]


def _evidence(evidence: object) -> str:
    """` [rule=R threshold=T value=V samples=N]`, then what the failing color last answered
    when the evidence has it (`; last answer: HTTP 503 ...`): the figures alone do not say
    what a 3 a.m. reader needs first, what the upstream said."""
    if not isinstance(evidence, Mapping):
        return ""
    parts = [
        f"{key}={_number(evidence[key])}"
        for key in ("rule", "threshold", "value", "samples")
        if key in evidence
    ]
    return (f" [{' '.join(parts)}]" if parts else "") + _last_answer(evidence)


def _last_answer(evidence: object) -> str:
    """`; last answer: <what the failing color last answered>` from an event's evidence,
    bounded and cleaned; "" when it holds none. `last_error` is the color's last failed
    answer: when its probes pass again (`consecutive_failures` 0, a rule on the window's
    ratio firing still) it is said as that, never as its last answer."""
    if not isinstance(evidence, Mapping):
        return ""
    last_error = evidence.get("last_error")
    if not isinstance(last_error, str) or not last_error:
        return ""
    said = _shorten(clean(last_error), _MAX_EVIDENCE_ERROR_CHARS)
    if evidence.get("consecutive_failures") == 0:
        return f"; last failed answer: {said} (its answers since passed)"
    return f"; last answer: {said}"


def _decision(decision: object) -> str:
    if not isinstance(decision, Mapping):
        return _NONE
    head = " ".join(
        clean(decision[k]) for k in ("ts", "action", "severity") if decision.get(k) is not None
    )
    if decision.get("not_taken"):
        head += f" (not taken here: {clean(decision['not_taken'])})"
    reason = decision.get("reason")
    return f"{head}{': ' + clean(reason) if reason else ''}{_evidence(decision.get('evidence'))}"


#: The events that move traffic (or set out to): `from->to`, an end unknown or none left
#: blank (`green->`: a switch target that names no color now).
_MOVES = TRAFFIC_MOVES | {"rollback_started", "rollback_failed"}


def _move(event: Mapping[str, Any]) -> str:
    source, target = event.get("from"), event.get("to")
    if source is None and target is None:
        return _NONE
    if source is not None and target is not None:
        return f"{clean(source)}->{clean(target)}"
    if event.get("event") not in _MOVES:
        # The one color an event is about (`started` found green active, a lock extended
        # on blue): never `blue->`, which reads as traffic leaving blue.
        return clean(source if source is not None else target)
    return f"{'' if source is None else clean(source)}->{'' if target is None else clean(target)}"


def _event(event: object) -> str:
    if not isinstance(event, Mapping):
        return _NONE
    parts = [_text(event.get("ts")), _text(event.get("event"))]
    if (move := _move(event)) != _NONE:
        parts.append(move)
    if event.get("severity") is not None:
        parts.append(clean(event["severity"]))
    if event.get("by") is not None:
        parts.append(f"by {clean(event['by'])}")
    reason = event.get("reason")
    return " ".join(parts) + (f": {clean(reason)}" if reason else "")


def _lock(qos: object) -> tuple[str, str | None]:
    if not isinstance(qos, Mapping) or qos.get("unknown") or qos.get("locked") is None:
        # Fail closed: a lock that cannot be told (a fleet node without etcd) blocks.
        why = qos.get("warning") if isinstance(qos, Mapping) else None
        return f"UNKNOWN, deploys not allowed ({_text(why or 'not reported')})", _RED
    if not qos.get("locked"):
        return "none, deploys allowed", None
    details = [f"until {clean(qos['until'])}" if qos.get("until") else "no expiry"]
    if qos.get("by"):
        details.append(f"by {clean(qos['by'])}")
    window = qos.get("window")
    if isinstance(window, Mapping):
        beneath = "guardd's guard window beneath it" if window.get("beneath") else "guard window"
        watched = (
            f"{beneath}: {_duration(window.get('left_s'))} left to watch, "
            f"{_number(window.get('samples'))} probes, {_number(window.get('failures'))} failed"
        )
        fired, blind = window.get("fired"), window.get("blind")
        # A rule that fired, or a signal that could not tell, fails the window whatever
        # comes next: the until is no time to plan a deploy by, it moves when judged.
        why = [f"{clean(f)} fired" for f in fired] if isinstance(fired, list) else []
        why += [f"{clean(b)} could not tell" for b in blind] if isinstance(blind, list) else []
        if why:
            watched += f"; not met ({', '.join(why)}): it is extended at its end"
        details.append(watched)
    return f"HELD: {_text(qos.get('reason'))} ({', '.join(details)})", _YELLOW


def _lock_word(qos: object) -> str:
    """`locked`, `free`, or `unknown` (the lock cannot be told: never `free`)."""
    if not isinstance(qos, Mapping) or qos.get("unknown") or qos.get("locked") is None:
        return "unknown"
    return "locked" if qos.get("locked") else "free"


def _state_code(state: object) -> str | None:
    if state == "steady":
        return _GREEN
    return _RED if state == "hold" else _YELLOW


def render_status(status: Mapping[str, Any], *, color: bool = False) -> str:
    """The `guardctl status` text: a table of the colors, then the guard's state."""
    paint = _Paint(color)
    active = status.get("active")
    upstreams = status.get("upstreams")
    upstreams = upstreams if isinstance(upstreams, Mapping) else {}
    names = [c for c in COLORS if c in upstreams] + sorted(set(upstreams) - set(COLORS))
    rows = [
        _upstream_row(name, upstreams[name], name == active)
        for name in names
        if isinstance(upstreams[name], Mapping)
    ]
    lines = [*_table(rows, paint), ""] if rows else ["no upstream data yet", ""]
    lines += _rules_table(status.get("rules"), active, paint)
    lines += _signal_lines(status.get("signals"))

    def field(name: str, value: str, code: str | None = None) -> None:
        lines.append(f"{name:<15}{paint(value, code)}")

    state = status.get("state")
    field("guard", _text(status.get("guard")))
    field("state", _text(state), _state_code(state))
    standby = status.get("standby")
    field("active", _text(active) + (f" (standby {clean(standby)})" if standby else ""))
    target = status.get("rollback_to")
    field(
        "rollback to", _text(target) + (" (already active)" if target and target == active else "")
    )
    if status.get("no_rollback_target"):
        field("WARNING", "no safe rollback: " + clean(status["no_rollback_target"]), _YELLOW)
    if isinstance(door := status.get("front_door"), Mapping):
        field("front door", *_front_door(door))
    field("qos lock", *_lock(status.get("qos")))
    fleet = status.get("fleet")
    if isinstance(fleet, Mapping):
        field("fleet", _fleet_line(fleet))
    if status.get("paused"):
        reason = status.get("paused_reason")
        field("paused", "yes" + (f": {clean(reason)}" if reason else ""), _YELLOW)
    else:
        field("paused", "no")
    if status.get("hold_reason"):
        field("hold reason", clean(status["hold_reason"]), _RED)
    warnings = status.get("warnings")
    for warning in warnings if isinstance(warnings, list) else ():
        field("WARNING", clean(warning), _YELLOW)
    storage = status.get("storage")
    if isinstance(storage, Mapping) and (storage.get("ok") is False or storage.get("errors")):
        field(
            "storage",
            f"{_text(storage.get('errors'))} write errors, last: "
            f"{_text(storage.get('last_error'))}",
            _RED,
        )
    field("last decision", _decision(status.get("last_decision")))
    field("last event", _event(status.get("last_event")))
    about = [_text(status.get("version")), f"up {_duration(status.get('uptime_s'))}"]
    if status.get("probe_interval_s") is not None:
        about.append(f"probing every {_interval(status['probe_interval_s'])}")
    field("version", ", ".join(about))
    return "\n".join(lines) + "\n"


def _front_door(door: Mapping[str, Any]) -> tuple[str, str | None]:
    """`passing (12 in a row)`, `FAILING (3 in a row): HTTP 502`, or `stale`: what
    users reach through nginx, as `switch.verify_url` answers it."""
    streak = f"{_text(door.get('streak'))} in a row"
    if door.get("last_probe_age_s") is None:
        return "not answered yet", _YELLOW
    if door.get("stale") or door.get("healthy") is None:
        return f"stale: no answer for {_duration(door.get('last_probe_age_s'))}", _YELLOW
    if door.get("healthy"):
        return f"passing ({streak})", None
    return f"FAILING ({streak}): {_text(door.get('last_error'))}", _RED


def _fleet_line(fleet: Mapping[str, Any]) -> str:
    """`node lb-a (leader lb-b), desired blue generation 5, applied 5` (or etcd's state)."""
    leader = fleet.get("leader")
    node = _text(fleet.get("node"))
    if fleet.get("etcd_reachable") is not True:
        # Who leads is part of the fleet's state: unknown too (the last read is stale).
        return f"node {node}, etcd not answering: the fleet's state (its leader too) is UNKNOWN"
    who = (
        f"node {node} (leader)"
        if leader == fleet.get("node")
        else f"node {node} (leader {_text(leader)})"
    )
    decided = (
        f"desired {_text(fleet.get('desired'))} generation {_text(fleet.get('generation'))}"
        if fleet.get("desired")
        else "no desired color yet"
    )
    return f"{who}, {decided}, applied here {_text(fleet.get('applied'))}"


def render_history(events: Sequence[Mapping[str, Any]], *, color: bool = False) -> str:
    """One line per journal event, oldest first: ts, event, from->to, severity, by, reason
    (and what the failing color last answered, when its evidence says)."""
    if not events:
        return "no events\n"
    paint = _Paint(color)
    rows = [
        (
            _text(e.get("ts")),
            _text(e.get("event")),
            _move(e),
            _text(e.get("severity")),
            _text(e.get("by")),
            clean(e.get("reason") or "") + _last_answer(e.get("evidence")),
        )
        for e in events
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row, event in zip(rows, events, strict=True):
        cells = [text.ljust(width) for text, width in zip(row, widths, strict=False)]
        severity = event.get("severity")
        cells[3] = paint(cells[3], _RED if severity == "P0" else _YELLOW if severity else None)
        lines.append("  ".join([*cells, row[5]]).rstrip())
    return "\n".join(lines) + "\n"


def render_qos(
    lock: Mapping[str, Any], path: str, *, color: bool = False, note: str | None = None
) -> str:
    """The `guardctl qos status` text for a lock in the `{"locked": ..., ...}` shape.

    `note` follows the `until` time (e.g. that it has passed).
    """
    paint = _Paint(color)
    if not lock.get("locked"):
        return f"{paint('no QoS lock', _GREEN)}: deploys allowed ({clean(path)})\n"
    lines = [f"{paint('QoS lock HELD', _YELLOW)}: deploys blocked"]
    for label, key in (
        ("reason", "reason"),
        ("until", "until"),
        ("locked at", "locked_at"),
        ("by", "by"),
    ):
        value = _text(lock.get(key))
        if key == "until" and note:
            value += f" ({clean(note)})"
        lines.append(f"  {label:<11}{value}")
    lines.append(f"  {'file':<11}{clean(path)}")
    return "\n".join(lines) + "\n"


def render_change(cmd: str, result: Mapping[str, Any]) -> str:
    """What a change did, from guardd's answer: the active color, the journal entry, the lock."""
    message = result.get("message")
    lines = [
        clean(message) if isinstance(message, str) and message else f"{cmd.replace('_', ' ')}: done"
    ]
    if "active" in result:
        lines.append(f"  {'active':<10}{_text(result['active'])}")
    if isinstance(result.get("event"), Mapping):
        lines.append(f"  {'journal':<10}{_event(result['event'])}")
    if "locked" in result:
        lines.append(f"  {'qos lock':<10}{_lock(result)[0]}")
    if "paused" in result:
        lines.append(f"  {'paused':<10}{'yes' if result['paused'] else 'no'}")
    return "\n".join(lines) + "\n"


def watch_key(status: Mapping[str, Any], *, with_event: bool = True) -> tuple[object, ...]:
    """What `status --watch` counts as a change: not latencies, ratios or probe ages; a new
    last journal event too, unless not `with_event`."""
    upstreams = status.get("upstreams")
    upstreams = upstreams if isinstance(upstreams, Mapping) else {}
    colors = tuple(
        _healthy(up)[0] if isinstance(up := upstreams.get(c), Mapping) else None for c in COLORS
    )
    qos = status.get("qos")
    last = status.get("last_event")
    return (
        status.get("state"),
        status.get("active"),
        colors,
        _lock_word(qos),
        bool(status.get("paused")),
        bool(status.get("dry_run")),
        status.get("hold_reason"),
        (last.get("id") or last.get("ts")) if with_event and isinstance(last, Mapping) else None,
    )


def render_watch_line(status: Mapping[str, Any], now: str) -> str:
    """One line of `status --watch` off a terminal: the state of the guard and its colors."""
    upstreams = status.get("upstreams")
    upstreams = upstreams if isinstance(upstreams, Mapping) else {}
    parts = [
        f"{now} state={_text(status.get('state'))} active={_text(status.get('active'))}",
    ]
    for color in COLORS:
        up = upstreams.get(color)
        if isinstance(up, Mapping):
            fails = _text(up.get("consecutive_failures"))
            parts.append(f"{color}={_healthy(up)[0]}(fails {fails})")
    parts.append(f"qos={_lock_word(status.get('qos'))}")
    if status.get("paused"):
        parts.append("paused")
    if status.get("dry_run"):
        parts.append("dry-run")
    if status.get("hold_reason"):
        parts.append(f"hold={clean(status['hold_reason'])!r}")
    return " ".join(parts) + "\n"


def render_journal_line(event: Mapping[str, Any], now: str) -> str:
    """A journal event as `status --watch` prints it off a terminal."""
    return f"{now} journal: {_event(event)}\n"


def _clock(ts: object) -> str:
    """The time of day of an RFC 3339 stamp (`18:01:02.123`), the whole stamp if odd."""
    text = _text(ts)
    return text[11:23] if len(text) >= 23 and text[10] == "T" else text


_KIND_LABEL: Final = {
    "change": "change",
    "evidence": "evidence",
    "decision": "decision",
    "switch": "switch",
    "lock": "qos lock",
    "operator": "operator",
    "other": "",
}


def _step_line(step: Mapping[str, Any], *, markdown: bool, cause: object = None) -> str:
    t = step.get("t_s")
    if isinstance(t, int | float) and not isinstance(t, bool):
        offset = f"+{_duration(t)}" if t >= 0 else f"-{_duration(-t)}"
    else:
        offset = _NONE
    bits = [_text(step.get("event"))]
    if (move := _move(step)) != _NONE:
        bits.append(move)
    if step.get("severity"):
        bits.append(clean(step["severity"]))
    if step.get("rule"):
        bits.append(f"rule {clean(step['rule'])}")
    if step.get("by"):
        bits.append(f"by {clean(step['by'])}")
    if step.get("event") == "rollback_completed":
        took = step.get("duration_ms")
        took_s = (
            took / 1000 if isinstance(took, int | float) and not isinstance(took, bool) else None
        )
        bits.append(f"(switched and verified{' in ' + _duration(took_s) if took_s else ''})")
    reason = step.get("reason")
    if step.get("kind") != "decision" and reason == cause:
        reason = None  # the cause, said once at the decision
    what = " ".join(bits) + (f": {_md(reason) if markdown else clean(reason)}" if reason else "")
    label = _KIND_LABEL.get(str(step.get("kind")), "")
    when = _clock(step.get("ts"))
    if markdown:
        return f"- `{when}` ({offset}) {label + ' - ' if label else ''}{what}"
    return f"  {when}  {offset:>8}  {label:<9} {what}"


def _md(value: object) -> str:
    """Text from outside as Markdown that renders as itself (no links, code or emphasis)."""
    text = clean(value).replace("\\", "\\\\")
    for c in "`*_~|<[]":
        text = text.replace(c, "\\" + c)
    return text


def render_incident(incident: Mapping[str, Any], *, markdown: bool = False) -> str:
    """`guardctl incident`: the summary (id, start, detection, rollback, recovery,
    duration, cause), the durations and the timeline; `markdown` for a chat or a report."""
    times = incident.get("times")
    times = times if isinstance(times, Mapping) else {}
    spans = incident.get("durations_s")
    spans = spans if isinstance(spans, Mapping) else {}
    lock = incident.get("lock")
    lock = lock if isinstance(lock, Mapping) else {}
    esc = _md if markdown else clean
    severity = incident.get("severity") or "manual"
    rule = incident.get("rule")
    title = (
        f"{_text(incident.get('id'))}: {_text(incident.get('guard'))} rolled back "
        f"{_text(incident.get('from'))} -> {_text(incident.get('to'))} "
        f"({clean(severity)}{', ' + clean(rule) if rule else ''})"
    )
    outcome = {
        "recovered": "recovered: the QoS lock was released",
        "guard_window": "rolled back; guard window still open (lock held)",
        "failed": "rollback FAILED; hold",
        "in_progress": "rollback in progress",
    }.get(str(incident.get("outcome")), _text(incident.get("outcome")))
    rollback = _text(times.get("rolled_back") or times.get("failed"))
    if spans.get("switch") is not None:
        rollback += f" (switched and verified in {_duration(spans['switch'])})"
    recovery = _text(times.get("recovered"))
    if lock.get("released_by"):
        recovery += f" (lock released by {clean(lock['released_by'])})"
    steps = [s for s in incident.get("steps") or [] if isinstance(s, Mapping)]
    change = _NONE
    for step in steps:
        if step.get("kind") == "change":
            change = f"{_text(step.get('ts'))} {_text(step.get('event'))} {_move(step)}"
            change += f" by {clean(step['by'])}" if step.get("by") else ""
            change += f": {esc(step['reason'])}" if step.get("reason") else ""
            break
    cause = esc(incident.get("cause") or _NONE) + esc(_evidence(incident.get("evidence")))
    # An operator's rollback with nothing failing before it starts at the rollback itself.
    start_is = "first failing evidence"
    if incident.get("by") not in ("guardd", None) and times.get("start") == times.get("detected"):
        start_is = f"the rollback by {clean(incident['by'])}: no failing evidence before it"
    rows = [
        (
            "Incident",
            f"{_text(incident.get('id'))} (rollback {_text(incident.get('rollback_id'))})",
        ),
        ("Outcome", outcome),
        ("Change", change),
        ("Start", f"{_text(times.get('start'))} ({start_is})"),
        ("Detection", f"{_text(times.get('detected'))} (rollback decided)"),
        ("Rollback", rollback),
        ("Recovery", recovery),
        ("Duration", _duration(spans.get("total"))),
        ("Cause", cause),
    ]
    extended = lock.get("extended")
    under = _duration(spans.get("time_under_lock"))
    if spans.get("time_under_lock") is None and lock.get("locked_at"):
        under = "still locked"
    durations = (
        f"time to detect {_duration(spans.get('time_to_detect'))}, "
        # `time_to_recover` (detection to rolled back): "recovery" is the lock's release.
        f"time to roll back {_duration(spans.get('time_to_recover'))}, "
        f"time under lock {under}"
        + (f" (extended {extended}x)" if isinstance(extended, int) and extended else "")
        + (
            f", since the change {_duration(spans['since_change'])}"
            if spans.get("since_change") is not None
            else ""
        )
    )
    cause_text = incident.get("cause")
    if markdown:
        lines = [f"**{title}**", ""]
        lines += [f"- **{name}:** {value}" for name, value in rows]
        lines += [f"- **Durations:** {durations}", "", "**Timeline (UTC)**", ""]
        lines += [_step_line(s, markdown=True, cause=cause_text) for s in steps]
    else:
        lines = [title, ""]
        lines += [f"  {name:<11}{value}" for name, value in rows]
        lines += [f"  {'Durations':<11}{durations}", "", "timeline (UTC, + from the start):"]
        lines += [_step_line(s, markdown=False, cause=cause_text) for s in steps]
    return "\n".join(lines) + "\n"
