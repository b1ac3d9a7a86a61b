"""Slack's Web API (`chat.postMessage` with a bot token): one thread per incident.

A `rollback_completed` or `rollback_failed` message opens a thread; every later event the
sink delivers is posted as a reply in it (`thread_ts`), until `qos_released` closes it or
the next rollback opens a new one. The open thread is kept in the outbox directory, so a
restart or a reload between the rollback and the release still threads the replies.

Slack answers HTTP 200 with `{"ok": false, "error": "..."}` for most failures, so the body
decides, not the status: a few errors may pass later (rate limits, Slack's own outages),
every other one (`invalid_auth`, `channel_not_found`, ...) cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from guardd.notify.slack import slack_message
from guardd.secrets import Secret

#: Where `chat.postMessage` lives unless `api_url` says otherwise.
DEFAULT_API_URL: Final = "https://slack.com/api"
METHOD: Final = "chat.postMessage"
#: Events that start an incident's thread.
OPENS_THREAD: Final = frozenset({"rollback_completed", "rollback_failed"})
#: The event that ends it: the guard window is over.
CLOSES_THREAD: Final = frozenset({"qos_released"})
#: Errors after which the same message may be accepted later (Slack's method docs).
TRANSIENT_ERRORS: Final = frozenset(
    {"ratelimited", "service_unavailable", "fatal_error", "internal_error", "request_timeout"}
)
#: Errors that say a reply's thread is gone: the message is then posted on its own.
THREAD_ERRORS: Final = frozenset({"thread_not_found", "message_not_found", "invalid_thread_ts"})
# A Slack token is printable ASCII; anything else would break the Authorization header.
_TOKEN_SHAPE = re.compile(r"^[\x21-\x7e]{8,512}$")
# Slack's ts is seconds.micros; it goes back to Slack as thread_ts, so only that shape.
_TS_SHAPE = re.compile(r"^\d{1,12}\.\d{1,9}$")
_CHANNEL_SHAPE = re.compile(r"^[#@]?[A-Za-z0-9._-]{1,80}$")


@dataclass(frozen=True, slots=True)
class Thread:
    """An incident's open thread: replies go to `ts` in `channel` (the channel Slack named)."""

    channel: str
    ts: str
    # The `channel` key of the sink when the thread opened: a thread of another channel is
    # not replied to after the configuration changes.
    configured_channel: str
    event_id: str

    def to_json(self) -> dict[str, str]:
        """The thread as the outbox stores it."""
        return {
            "channel": self.channel,
            "ts": self.ts,
            "configured_channel": self.configured_channel,
            "event_id": self.event_id,
        }

    @classmethod
    def from_json(cls, doc: object) -> Thread:
        """A thread the outbox stored; `ValueError` if it is not one."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - one error type for callers
        values = [doc.get(k) for k in ("channel", "ts", "configured_channel", "event_id")]
        if not all(isinstance(v, str) and v for v in values):
            raise ValueError("channel, ts, configured_channel or event_id missing")
        channel, ts, configured, event_id = (str(v) for v in values)
        if not _TS_SHAPE.match(ts):
            raise ValueError("ts is not a Slack timestamp")
        return cls(channel=channel, ts=ts, configured_channel=configured, event_id=event_id)


class SlackApiError(Exception):
    """Slack refused a message; `transient` says whether the same message may pass later."""

    def __init__(self, error: str, *, transient: bool) -> None:
        super().__init__(error)
        self.error = error
        self.transient = transient


def method_url(api_url: str) -> str:
    """The URL of `chat.postMessage` under `api_url` (a base such as https://slack.com/api)."""
    return api_url.rstrip("/") + "/" + METHOD


def check_channel(channel: str) -> str:
    """`channel` if it looks like a Slack channel ID or name; `ValueError` if not."""
    if not _CHANNEL_SHAPE.match(channel):
        raise ValueError("must be a channel ID (C0123ABCD) or a name (#ops)")
    return channel


def resolve_token(
    *, token_env: str | None, token_file: Path | None, environ: Mapping[str, str]
) -> Secret:
    """The bot token from exactly one source; reasons for failing never contain the token.

    A relative `token_file` is looked up in `$CREDENTIALS_DIRECTORY`, as `url_file` is.
    """
    if (token_env is None) == (token_file is None):
        raise ValueError("set exactly one of token_env or token_file")
    if token_env is not None:
        if (raw := environ.get(token_env)) is None:
            raise ValueError(f"environment variable {token_env} is not set")
        source = f"environment variable {token_env}"
    else:
        assert token_file is not None  # noqa: S101 - one of the two is set, checked above
        path = token_file
        if not path.is_absolute() and (credentials := environ.get("CREDENTIALS_DIRECTORY")):
            path = Path(credentials) / path
        try:
            with path.open("rb") as f:
                data = f.read(4096)
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
        raw = data.decode("utf-8", "replace")
        source = f"file {path}"
    value = raw.strip()
    if not value:
        raise ValueError(f"{source} is empty")
    # Registered before the shape check, so no later message can show it.
    token = Secret(value)
    if not _TOKEN_SHAPE.match(value):
        raise ValueError(f"{source} is not a Slack token (printable ASCII, no spaces)")
    return token


def post_message(
    event: Mapping[str, Any], *, instance: str, channel: str, thread: Thread | None
) -> dict[str, Any]:
    """The `chat.postMessage` JSON for `event`: channel, text, blocks, and thread_ts for a reply.

    A reply goes to the channel Slack named when the thread opened: `thread_ts` is only
    meaningful there.
    """
    doc: dict[str, Any] = {"channel": channel, **slack_message(event, instance=instance)}
    if thread is not None:
        doc["channel"] = thread.channel
        doc["thread_ts"] = thread.ts
    # Our text is escaped already; no link unfurling of URLs in a reason.
    doc["unfurl_links"] = False
    doc["unfurl_media"] = False
    return doc


def headers(token: Secret) -> dict[str, str]:
    """The request headers: Slack asks for the charset on JSON bodies."""
    return {
        "Content-Type": "application/json; charset=utf-8",
        "Authorization": f"Bearer {token.reveal()}",
    }


def parse_answer(body: bytes) -> tuple[str, str]:
    """The `(channel, ts)` of a posted message from Slack's answer; `SlackApiError` if refused.

    An answer that is not Slack's JSON is transient: a proxy's error page, a torn answer.
    """
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SlackApiError("the answer is not JSON", transient=True) from None
    if not isinstance(doc, dict):
        raise SlackApiError("the answer is not a JSON object", transient=True)
    if doc.get("ok") is not True:
        error = doc.get("error")
        error = error if isinstance(error, str) and error else "unknown_error"
        error = error[:64]
        raise SlackApiError(error, transient=error in TRANSIENT_ERRORS)
    channel, ts = doc.get("channel"), doc.get("ts")
    if not (isinstance(channel, str) and channel and isinstance(ts, str) and _TS_SHAPE.match(ts)):
        # Posted, yet no thread can hang off it: still delivered, never posted twice.
        return "", ""
    return channel, ts


def next_thread(
    current: Thread | None,
    event_name: object,
    *,
    configured_channel: str,
    answer: tuple[str, str],
    event_id: str,
) -> Thread | None:
    """The thread once `event_name` is delivered (answered `answer`) while `current` was open."""
    if event_name in OPENS_THREAD:
        channel, ts = answer
        if not ts:
            return None
        return Thread(
            channel=channel, ts=ts, configured_channel=configured_channel, event_id=event_id
        )
    if event_name in CLOSES_THREAD:
        return None
    return current


def thread_for(current: Thread | None, event_name: object, channel: str) -> Thread | None:
    """The thread `event_name` is a reply in, or None for a message of its own."""
    if event_name in OPENS_THREAD or current is None:
        return None
    return current if current.configured_channel == channel else None
