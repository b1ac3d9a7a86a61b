"""guardctl's long-running commands: `status --watch`, the `--wait` of `promote` and
`switch`, `wait`, and `incident` (docs/contract.md §1).

They are kept apart from `guardd.ctl`, which registers them; like it, only the standard
library (and guardd's own light modules) is imported, so guardctl starts fast.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from guardd.control.client import call
from guardd.exceptions import ControlError, DaemonUnreachable, NotPermitted, Refused
from guardd.incident import NoIncident, build
from guardd.qoslock import unknown_json
from guardd.render import (
    render_change,
    render_incident,
    render_journal_line,
    render_status,
    render_watch_line,
    use_color,
    watch_key,
)
from guardd.stdio import wait_unless_reader_left

__all__ = [
    "change_and_wait",
    "incident",
    "unknown_status",
    "wait_for",
    "watch",
]

# The same numbers as guardd.ctl's, which imports this module.
_DONE: Final = 0
_NOT_YET: Final = 1
_UNKNOWN: Final = 3
_NOT_PERMITTED: Final = 4
# A status or a change attempt: as long as a plain `status` or a change may take.
_READ_TIMEOUT_S: Final = 5.0
_CHANGE_TIMEOUT_S: Final = 120.0
# Within a wait, a status read gets what is left of it, and at least this: one that just
# starts at the deadline still asks once.
_LAST_READ_S: Final = 1.0
# While waiting: ask at most this often, and say why at most this often.
_POLL_S: Final = 1.0
_SAY_EVERY_S: Final = 5.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _say(message: str) -> None:
    print(f"guardctl: {message}", file=sys.stderr, flush=True)


# ---- status --watch ----------------------------------------------------------------------


def _fit(line: str, width: int) -> str:
    """`line` cut to `width` printed characters, ANSI codes kept whole and closed."""
    out, shown, escape = [], 0, False
    for c in line:
        if c == "\x1b":
            escape = True
        if escape:
            out.append(c)
            escape = c != "m"
            continue
        if shown >= width:
            return "".join(out) + ("\x1b[0m" if "\x1b" in line else "")
        out.append(c)
        shown += 1
    return "".join(out)


class _Screen:
    """Redraws a frame in place on a terminal: cursor up over the last one, overwrite."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn = 0

    def draw(self, lines: list[str]) -> None:
        size = shutil.get_terminal_size()
        # A wrapped or scrolled-off line would throw the cursor arithmetic off.
        lines = [_fit(line, max(20, size.columns - 1)) for line in lines][: max(3, size.lines - 1)]
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.stream.write(up + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self.stream.flush()
        self.drawn = len(lines)


def unknown_status(guard: str | None, warning: str) -> dict[str, Any]:
    """`status --json` when guardctl cannot tell (UNKNOWN, exit 3; docs/contract.md §1):
    `{"guard": <the instance asked about>|null, "unknown": true, "warning": <why>,
    "state": null, "active": null, "qos": <the UNKNOWN lock>, "warnings": [<why>]}`.

    Nothing in it reads as OK: no state, no active color, a lock that is not "unlocked".
    """
    return {
        "guard": guard,
        "unknown": True,
        "warning": warning,
        "state": None,
        "active": None,
        "qos": unknown_json(warning),
        "warnings": [warning],
    }


def watch(
    socket: Path,
    label: str,
    hint: str,
    *,
    interval: float,
    as_json: bool = False,
    guard: str | None = None,
    stream: TextIO | None = None,
) -> int:
    """Show guardd's status until Ctrl-C (KeyboardInterrupt, left to the caller) or until
    guardd goes away (3). On a terminal the status is redrawn in place every `interval`
    seconds. Elsewhere each new journal event is a line, and so is the picture (state,
    active color, health, lock, pause, hold) when it changes; with `as_json`, the status
    object is a line whenever the picture or the last journal event changes, and the last
    line, when guardd goes away, is `unknown_status(guard, <why>)` (the why on stderr too).
    """
    out = stream or sys.stdout
    isatty = getattr(out, "isatty", None)
    live = bool(isatty and isatty()) and not as_json
    color = use_color(out)
    screen = _Screen(out) if live else None
    last: tuple[object, ...] | None = None
    seen: str | None = None
    while True:
        try:
            status = call(socket, "status", {}, timeout=_READ_TIMEOUT_S)
        except ControlError as e:
            hinted = f" ({hint})" if isinstance(e, DaemonUnreachable) else ""
            why = f"guardd {label}: {e}{hinted}"
            if as_json:
                # A reader of JSON lines parses every line: this one says UNKNOWN too.
                _say(f"UNKNOWN: {why}")
                out.write(json.dumps(unknown_status(guard, why)) + "\n")
            else:
                out.write(f"UNKNOWN: {why}\n")
            out.flush()
            return _UNKNOWN
        if screen is not None:
            head = f"guardctl status --watch: {label}, every {interval:g}s, {_now()}; Ctrl-C quits"
            screen.draw([head, "", *render_status(status, color=color).splitlines()])
        elif as_json:
            key = watch_key(status)
            if key != last:
                out.write(json.dumps(status) + "\n")
                out.flush()
                last = key
        else:
            now = _now()
            newest = status.get("last_event")
            newest_id = newest.get("id") if isinstance(newest, Mapping) else None
            if isinstance(newest, Mapping) and isinstance(newest_id, str) and newest_id != seen:
                # The first round shows the guard as it is, not its past.
                if seen is not None:
                    for event in _journal_since(socket, seen, newest):
                        out.write(render_journal_line(event, now))
                seen = newest_id
            key = watch_key(status, with_event=False)
            if key != last:
                out.write(render_watch_line(status, now))
                last = key
            out.flush()
        wait_unless_reader_left(out, interval)


# Journal lines fetched per round of a watch: more than guardd writes in any second.
_JOURNAL_BATCH: Final = 200


def _journal_since(socket: Path, seen: str, newest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The journal events after the one with id `seen`, oldest first; `newest` alone when
    guardd's history cannot be had, so that a round never loses its last event."""
    try:
        answer = call(socket, "history", {"limit": _JOURNAL_BATCH}, timeout=_READ_TIMEOUT_S)
    except ControlError:
        return [newest]
    events = [e for e in answer.get("events") or [] if isinstance(e, Mapping)]
    ids = [e.get("id") for e in events]
    return events[ids.index(seen) + 1 :] if seen in ids else events


# ---- waiting -----------------------------------------------------------------------------


def _waiting(
    attempt: Callable[[float], str | None], *, timeout: float, what: str
) -> tuple[bool, str, bool]:
    """Call `attempt` until it returns None (done) or `timeout` seconds pass.

    `attempt` gets the seconds left before the deadline (never below 0), to bound its own
    request by: a guardd that freezes mid-wait must not hold a pipeline for a request's
    full timeout past the deadline. It returns why it is not done yet; it raises
    `DaemonUnreachable` when guardd does not answer, which is waited out like any other
    reason. Returns (done, the last reason, whether that reason was guardd not answering).
    """
    deadline = time.monotonic() + timeout
    said_at: float | None = None
    reason, unreachable = "", False
    while True:
        try:
            why = attempt(max(0.0, deadline - time.monotonic()))
            unreachable = False
        except DaemonUnreachable as e:
            why, unreachable = f"guardd is not answering ({e})", True
        if why is None:
            return True, "", False
        reason = why
        now = time.monotonic()
        left = deadline - now
        if left <= 0:
            return False, reason, unreachable
        if said_at is None or now - said_at >= _SAY_EVERY_S:
            _say(f"waiting {_span(left)} more for {what}: {reason}")
            said_at = now
        time.sleep(min(_POLL_S, left))


def _span(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def change_and_wait(socket: Path, cmd: str, payload: dict[str, Any], *, timeout: float) -> int:
    """`promote --wait` / `switch --wait`: retry the change while guardd refuses it, until it
    is done (0) or `timeout` seconds pass (1, with guardd's last refusal; 3 when guardd
    was not answering then). Not permitted (4) ends the wait at once."""
    result: dict[str, Any] = {}

    def attempt(left: float) -> str | None:
        # A change that guardd takes runs its switch (seconds): it gets at least a status
        # read's time past the deadline, never the full 120 s of a frozen guardd.
        limit = min(_CHANGE_TIMEOUT_S, max(left, _READ_TIMEOUT_S))
        try:
            result.update(call(socket, cmd, payload, timeout=limit))
        except Refused as e:
            return str(e)
        return None

    try:
        done, reason, unreachable = _waiting(attempt, timeout=timeout, what=f"the {cmd} gate")
    except NotPermitted as e:
        _say(f"not permitted: {e}")
        return _NOT_PERMITTED
    except ControlError as e:
        _say(str(e))
        return _NOT_YET
    if done:
        sys.stdout.write(render_change(cmd, result))
        return _DONE
    _say(f"gave up after {_span(timeout)}: {'UNKNOWN: ' if unreachable else 'refused: '}{reason}")
    return _UNKNOWN if unreachable else _NOT_YET


def lock_unknown(status: Mapping[str, Any]) -> bool:
    """Whether `status` cannot tell if the QoS lock is held (a fleet node that cannot read
    the fleet's lock, or no `qos` at all): never "unlocked"."""
    qos = status.get("qos")
    return not isinstance(qos, Mapping) or bool(qos.get("unknown")) or qos.get("locked") is None


def _condition(status: Mapping[str, Any], condition: str) -> str | None:
    """Why `status` does not meet `condition` yet; None when it does."""
    state = status.get("state")
    if condition == "steady":
        return None if state == "steady" else f"state is {state}"
    if condition == "unlocked":
        qos = status.get("qos")
        if not isinstance(qos, Mapping) or lock_unknown(status):
            why = qos.get("warning") if isinstance(qos, Mapping) else None
            return f"the QoS lock is UNKNOWN ({why or 'not reported'})"
        if not qos.get("locked"):
            return None
        until = f", until {qos['until']}" if qos.get("until") else ""
        return f"the QoS lock is held ({qos.get('reason')}{until})"
    active = status.get("active")
    upstreams = status.get("upstreams")
    up = upstreams.get(active) if isinstance(upstreams, Mapping) and active else None
    if not isinstance(up, Mapping):
        return "the active color is unknown"
    if up.get("stale"):
        return f"{active} (active) is stale: no fresh probe"
    if up.get("healthy") is not True:
        return (
            f"{active} (active) is unhealthy ({up.get('consecutive_failures')} failures in a row)"
        )
    return _failing_rule(status.get("rules"), str(active)) or _blind_signal(status.get("signals"))


def _blind_signal(signals: object) -> str | None:
    """Why a signal keeps the active color from being called healthy: it cannot tell (its
    source gives nothing, or it went stale), so its rules could not fire on what users
    see; None when every signal reads. Signals not reported are not "all reading"."""
    if not isinstance(signals, Mapping):
        return "the signals' states are not reported"
    for name, doc in sorted(signals.items()):
        if not isinstance(doc, Mapping):
            return f"signal {name}'s state is not reported"
        if doc.get("problem"):
            return f"signal {name} gives nothing ({doc['problem']}): its rules are inconclusive"
        if doc.get("stale"):
            return f"signal {name} is stale: its rules are inconclusive"
    return None


def _failing_rule(rules: object, active: str) -> str | None:
    """Why the rules keep `active` from being healthy: one fires or is pending on it (its
    probes may pass while real traffic fails); None when none does. Rules not reported
    are not "none failing": the answer is then that they are unknown."""
    if not isinstance(rules, list):
        return "the rules' states are not reported"
    for row in rules:
        if not isinstance(row, Mapping) or row.get("dry_run"):
            continue  # a dry-run rule only says what it would do
        state = row.get(active)
        if isinstance(state, Mapping) and state.get("state") in ("firing", "pending"):
            since = f" since {state['since']}" if state.get("since") else ""
            return (
                f"{active} (active) {state['state']} rule {row.get('rule')} "
                f"({row.get('severity')}: {row.get('condition')}){since}"
            )
    return None


def wait_for(socket: Path, label: str, condition: str, *, timeout: float) -> int:
    """`guardctl wait CONDITION`: 0 once guardd's status meets it, 1 with the last reason at
    `timeout`, 3 when guardd was not answering then or (`unlocked`) could not tell whether
    the QoS lock is held (a fleet node that cannot read the fleet's lock)."""
    unknown = False

    def attempt(left: float) -> str | None:
        nonlocal unknown
        try:
            limit = min(_READ_TIMEOUT_S, max(left, _LAST_READ_S))
            status = call(socket, "status", {}, timeout=limit)
        except DaemonUnreachable:
            raise
        except ControlError as e:
            unknown = False
            return str(e)
        unknown = condition == "unlocked" and lock_unknown(status)
        return _condition(status, condition)

    done, reason, unreachable = _waiting(attempt, timeout=timeout, what=condition)
    if done:
        print(f"{label}: {condition}")
        return _DONE
    unknown = unreachable or unknown
    _say(f"not {condition} after {_span(timeout)}: {'UNKNOWN: ' if unknown else ''}{reason}")
    return _UNKNOWN if unknown else _NOT_YET


# ---- incident ----------------------------------------------------------------------------


def incident(events: Sequence[Mapping[str, Any]], key: str | None, *, form: str) -> int:
    """Print the incident `key` names (None: the last) from the whole journal `events`, as
    text, "markdown" or "json"; 1 when there is no such incident."""
    try:
        found = build(events, key)
    except NoIncident as e:
        _say(str(e))
        return _NOT_YET
    if form == "json":
        print(json.dumps(found, indent=2))
    else:
        sys.stdout.write(render_incident(found, markdown=form == "markdown"))
    return _DONE
