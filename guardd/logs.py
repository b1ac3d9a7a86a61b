"""structlog set-up (docs/contract.md §7): JSON off a terminal or under journald, console on one."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from guardd.secrets import is_secret_name, redact


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: ("***" if is_secret_name(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact_secrets(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A processor that scrubs registered secrets and token-named fields from every line."""
    for key, value in list(event.items()):
        event[key] = "***" if is_secret_name(key) else _scrub(value)
    return event


# syslog priorities of structlog's levels (sd-daemon(3)).
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def is_journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is the journald stream `$JOURNAL_STREAM` names (systemd.exec(5))."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _SyslogPrefixed:
    """Prefixes each rendered line with `<N>`, its syslog priority, which journald reads
    (SyslogLevelPrefix=, on by default) and strips: `journalctl -p warning` then works."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: object, name: str, event: MutableMapping[str, Any]) -> str:
        priority = _PRIORITY.get(str(event.get("level")), 6)
        return f"<{priority}>{self._renderer(logger, name, event)}"


def wants_json(stream: TextIO) -> bool:
    """JSON lines when stderr is not a terminal or journald reads it."""
    return bool(os.environ.get("JOURNAL_STREAM")) or not stream.isatty()


def configure(
    guard: str, *, level: str = "info", stream: TextIO | None = None, json: bool | None = None
) -> None:
    """Configure structlog for the daemon; every line carries ts, level, event and guard."""
    out = stream or sys.stderr
    as_json = wants_json(out) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty() and not os.environ.get("NO_COLOR"))
    )
    if is_journal_stream(out):
        renderer = _SyslogPrefixed(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(guard=guard)


def get_logger(**bound: Any) -> Any:
    """A bound logger for guardd's components."""
    return structlog.get_logger("guardd").bind(**bound)
