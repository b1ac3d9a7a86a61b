"""Discord webhook messages: one embed, kept within Discord's embed limits.

Event text is markdown-escaped and `allowed_mentions` is empty, so a reason can neither
format the message nor ping `@everyone`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from guardd.notify.webhook import ELLIPSIS, Facts, facts, text_units, truncate

CONTENT_MAX: Final = 2000
TITLE_MAX: Final = 256
DESCRIPTION_MAX: Final = 4096
FIELDS_MAX: Final = 25
FIELD_NAME_MAX: Final = 256
FIELD_VALUE_MAX: Final = 1024
FOOTER_MAX: Final = 2048
EMBED_TOTAL_MAX: Final = 6000
# Room kept for the reason when evidence fields would fill the embed.
_DESCRIPTION_RESERVE: Final = 512

RED: Final = 0xE5484D
ORANGE: Final = 0xF76B15
AMBER: Final = 0xFFC53D
GREEN: Final = 0x30A46C
GREY: Final = 0x6E7781
_BY_SEVERITY: Final = {"P0": RED, "P1": ORANGE, "P2": AMBER}
_BY_EVENT: Final = {
    "rollback_failed": RED,
    "hold": RED,
    "alert": AMBER,
    "rollback_completed": ORANGE,
    "qos_released": GREEN,
    "promote": GREEN,
    "resumed": GREEN,
}
_MARKDOWN = re.compile(r"([\\*_~`|>#\[\]()<-])")


def discord_message(event: Mapping[str, Any], *, instance: str) -> dict[str, Any]:
    """The webhook JSON for `event`: a short `content` and one embed."""
    f = facts(event, instance=instance)
    title = fit_escaped(escape(f.title), TITLE_MAX)
    footer = truncate(f"guardd {f.instance} · event {f.event_id}", FOOTER_MAX)
    fields = [
        _field("Severity", f.severity or "none"),
        _field("From → To", f.from_to or "—"),
        _field("By", f.by or "—"),
        *(_field(label, value) for label, value in f.evidence),
    ]
    act = {
        "name": "Act",
        "value": truncate("\n".join(f"`{c}`" for c in f.commands), FIELD_VALUE_MAX),
        "inline": False,
    }
    fields = fields[: FIELDS_MAX - 1]
    fixed = text_units(title) + text_units(footer) + _units(act)
    # Evidence goes before the reason does: drop fields from the end until the reason fits.
    while fields and fixed + sum(map(_units, fields)) > EMBED_TOTAL_MAX - _DESCRIPTION_RESERVE:
        fields.pop()
    room = EMBED_TOTAL_MAX - fixed - sum(map(_units, fields))
    description = fit_escaped(escape(f.reason or "(no reason given)"), min(DESCRIPTION_MAX, room))
    embed: dict[str, Any] = {
        "title": title,
        "description": description,
        "color": color(f),
        "fields": [*fields, act],
        "footer": {"text": footer},
    }
    if f.time is not None:
        embed["timestamp"] = f.time.isoformat()
    return {
        "content": fit_escaped(escape(f.title), CONTENT_MAX),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }


def color(f: Facts) -> int:
    """The embed's side bar: by severity, else by what happened."""
    if f.severity in _BY_SEVERITY:
        return _BY_SEVERITY[f.severity]
    return _BY_EVENT.get(f.event, GREY)


def escape(text: str) -> str:
    """`text` made literal for Discord markdown, which honours a backslash before punctuation."""
    return _MARKDOWN.sub(r"\\\1", text)


def fit_escaped(text: str, limit: int) -> str:
    """Escaped `text` cut to `limit` without ending on half of an escape."""
    cut = truncate(text, limit)
    if cut == text:
        return cut
    body = cut.removesuffix(ELLIPSIS)
    if (len(body) - len(body.rstrip("\\"))) % 2:
        body = body[:-1]
    return body + ELLIPSIS


def _field(name: str, value: str) -> dict[str, Any]:
    # Discord refuses an empty field name or value.
    return {
        "name": fit_escaped(escape(name), FIELD_NAME_MAX) or "—",
        "value": fit_escaped(escape(value), FIELD_VALUE_MAX) or "—",
        "inline": True,
    }


def _units(field: Mapping[str, Any]) -> int:
    return text_units(field["name"]) + text_units(field["value"])
