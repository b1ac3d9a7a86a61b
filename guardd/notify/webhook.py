"""The generic webhook payload, and the facts about an event that the chat sinks render.

A webhook receives the journal event unchanged, so that scripts parse what `guardctl
history --json` shows. Slack and Discord receive a message for people, built from the
`Facts` of the event, every piece of text cleaned and cut to the receiver's limits here.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

ELLIPSIS: Final = "…"

_TITLES: Final = {
    "rollback_started": "rollback started",
    "rollback_completed": "rollback",
    "rollback_failed": "rollback FAILED",
    "external_switch": "external switch",
    "qos_locked": "QoS lock taken",
    "qos_extended": "QoS lock extended",
    "qos_released": "QoS lock released",
    "config_reloaded": "configuration reloaded",
}
_QOS_EVENTS: Final = frozenset({"qos_locked", "qos_extended", "qos_released"})
# Evidence keys people look at first, with the words they read them by.
_EVIDENCE_LABELS: Final = {
    "rule": "Rule",
    "threshold": "Threshold",
    "value": "Value",
    "samples": "Samples",
    "error_ratio": "Error ratio",
    "p50_ms": "p50",
    "p95_ms": "p95",
}
_MAX_EVIDENCE: Final = 20
_MAX_EVIDENCE_VALUE: Final = 200
# C0 controls other than tab and newline, DEL, and lone surrogates: receivers reject them.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def webhook_body(event: Mapping[str, Any]) -> dict[str, Any]:
    """The journal event exactly as journaled, plus its `id`."""
    return dict(event)


def webhook_headers(event_id: str) -> dict[str, str]:
    """Headers that let a receiver drop a retried delivery it already has."""
    return {"Idempotency-Key": event_id}


@dataclass(frozen=True, slots=True)
class Facts:
    """What a person needs to know about one event, as clean single strings."""

    instance: str
    event: str
    title: str
    severity: str | None
    from_to: str | None
    reason: str | None
    by: str | None
    time: datetime | None
    time_text: str | None
    event_id: str
    evidence: tuple[tuple[str, str], ...]
    commands: tuple[str, ...]


#: The guardctl command worth running after each event, besides `status`.
_NEXT: Final[Mapping[str, tuple[str, ...]]] = {
    "alert": ("rollback",),
    "switch": ("rollback",),
    "promote": ("rollback",),
    "external_switch": ("rollback",),
    "rollback_failed": ("rollback",),
    "rollback_started": ("incident --last",),
    "rollback_completed": ("incident --last",),
    "hold": ("resume",),
    "paused": ("resume",),
}


def facts(event: Mapping[str, Any], *, instance: str) -> Facts:
    """Pull the facts out of a journal event, tolerating missing or odd fields."""
    name = one_line(text_of(event.get("event")) or "event")
    source, target = text_of(event.get("from")), text_of(event.get("to"))
    # No end where there is none: `alert green`, never `alert green → ?`.
    from_to = None
    if source and target:
        from_to = f"{one_line(source)} → {one_line(target)}"
    elif source or target:
        from_to = one_line(source) if source else f"→ {one_line(target or '')}"
    title = f"guardd {one_line(instance)}: {_TITLES.get(name, name.replace('_', ' '))}"
    if from_to:
        title += f" {from_to}"
    ts = text_of(event.get("ts"))
    quoted = shlex.quote(instance.replace("`", ""))
    commands = [f"guardctl --instance {quoted} status"]
    # What helps next after this event: not `rollback` once traffic is on the rollback
    # target (refused as a no-op), where what happened is the incident's to tell.
    commands += [f"guardctl --instance {quoted} {then}" for then in _NEXT.get(name, ())]
    if name in _QOS_EVENTS:
        commands.append(f"guardctl --instance {quoted} qos status")
    return Facts(
        instance=instance,
        event=name,
        title=title,
        severity=_severity(event.get("severity")),
        from_to=from_to,
        reason=text_of(event.get("reason")),
        by=text_of(event.get("by")),
        time=_parse_time(ts),
        time_text=one_line(ts) if ts else None,
        event_id=one_line(text_of(event.get("id")) or "?"),
        evidence=_evidence(event.get("evidence")),
        commands=tuple(commands),
    )


def text_of(value: object) -> str | None:
    """`value` as clean text: `None` stays `None`, non-strings become compact JSON."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, default=str, skipkeys=True, separators=(",", ":"))
    return _UNPRINTABLE.sub("\N{REPLACEMENT CHARACTER}", value)


def one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, made one space."""
    return " ".join(text.split())


def text_units(text: str) -> int:
    """The length of `text` in UTF-16 code units, the stricter way receivers count."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-16 units, ending in an ellipsis when it was cut."""
    if text_units(text) <= limit:
        return text
    units = 0
    for i, c in enumerate(text):
        units += 2 if ord(c) > 0xFFFF else 1
        if units > limit - 1:
            return text[:i].rstrip() + ELLIPSIS
    return text  # pragma: no cover - the length check above returned already


def _severity(value: object) -> str | None:
    text = one_line(text_of(value) or "")
    return text[:16] or None


def _parse_time(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _evidence(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        return ()
    known = [k for k in _EVIDENCE_LABELS if k in value]
    others = sorted((k for k in value if k not in _EVIDENCE_LABELS), key=str)
    items = []
    for key in (known + others)[:_MAX_EVIDENCE]:
        label = _EVIDENCE_LABELS.get(key) or one_line(text_of(key) or "?").replace("_", " ")
        shown = _evidence_value(key, value[key])
        items.append((truncate(label, 60), truncate(shown, _MAX_EVIDENCE_VALUE)))
    return tuple(items)


def _evidence_value(key: object, value: object) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        shown = f"{value:.4g}"
        return f"{shown} ms" if isinstance(key, str) and key.endswith("_ms") else shown
    if isinstance(value, int) and not isinstance(value, bool) and str(key).endswith("_ms"):
        return f"{value} ms"
    # Cut before cleaning whitespace: a hostile value may be megabytes of it.
    return one_line((text_of(value) or "—")[: _MAX_EVIDENCE_VALUE * 4])
