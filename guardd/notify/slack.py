"""Slack incoming-webhook messages in Block Kit, kept within Block Kit's limits.

Every piece of event text is escaped (`&`, `<`, `>`) before it goes into mrkdwn, so a
reason cannot ping a channel (`<!channel>`) or smuggle a link in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from guardd.notify.webhook import ELLIPSIS, Facts, facts, text_units, truncate

HEADER_MAX: Final = 150
SECTION_TEXT_MAX: Final = 3000
FIELD_MAX: Final = 2000
FIELDS_MAX: Final = 10
BLOCKS_MAX: Final = 50
CONTEXT_TEXT_MAX: Final = 3000
FALLBACK_MAX: Final = 3000


def slack_message(event: Mapping[str, Any], *, instance: str) -> dict[str, Any]:
    """The incoming-webhook JSON for `event`: a fallback `text` and the `blocks`."""
    f = facts(event, instance=instance)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": truncate(f.title, HEADER_MAX)}},
        {
            "type": "section",
            "fields": [
                _field("Severity", f.severity or "none"),
                _field("From → To", f.from_to or "—"),
                _field("Reason", f.reason or "—"),
                _field("By", f.by or "—"),
            ],
        },
    ]
    if f.evidence:
        blocks.append(
            {
                "type": "section",
                "text": _mrkdwn("*Evidence*"),
                "fields": [
                    _evidence_field(label, value) for label, value in f.evidence[:FIELDS_MAX]
                ],
            }
        )
    blocks.append({"type": "context", "elements": [_mrkdwn(_when(f))]})
    act = " · ".join(f"`{escape(command)}`" for command in f.commands)
    act_text = fit_escaped(f"*Act:* {act}", SECTION_TEXT_MAX)
    blocks.append({"type": "section", "text": _mrkdwn(act_text)})
    fallback = f.title if not f.reason else f"{f.title}: {f.reason}"
    return {"text": fit_escaped(escape(fallback), FALLBACK_MAX), "blocks": blocks[:BLOCKS_MAX]}


def escape(text: str) -> str:
    """`text` made literal for Slack mrkdwn: the three characters Slack parses as control."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fit_escaped(text: str, limit: int) -> str:
    """Escaped `text` cut to `limit` without leaving half an `&amp;` at the end."""
    cut = truncate(text, limit)
    if cut == text:
        return cut
    body = cut.removesuffix(ELLIPSIS)
    if (amp := body.rfind("&")) != -1 and ";" not in body[amp:]:
        body = body[:amp]
    return body + ELLIPSIS


def _field(label: str, value: str) -> dict[str, str]:
    head = f"*{escape(label)}*\n"
    return _mrkdwn(head + fit_escaped(escape(value), FIELD_MAX - text_units(head)))


def _evidence_field(label: str, value: str) -> dict[str, str]:
    if label != "Rule":
        return _field(label, value)
    # A rule name is an identifier; in a code span its underscores stay underscores.
    return _mrkdwn(f"*Rule*\n`{fit_escaped(escape(value.replace('`', '')), 200)}`")


def _when(f: Facts) -> str:
    event_id = escape(truncate(f.event_id.replace("`", ""), 128))
    if f.time is None:
        shown = escape(truncate(f.time_text, 64)) if f.time_text else "time unknown"
    else:
        # Slack renders <!date^...> in each reader's time zone; the text after | is the fallback.
        fallback = escape(truncate((f.time_text or "").replace("|", " "), 64))
        shown = f"<!date^{int(f.time.timestamp())}^{{date_short_pretty}} {{time_secs}}|{fallback}>"
    return fit_escaped(f"{shown} · event `{event_id}`", CONTEXT_TEXT_MAX)


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}
