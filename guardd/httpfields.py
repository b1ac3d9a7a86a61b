"""Which HTTP header names and values guardd can send (RFC 9110 §5.1 and §5.5).

Checked where headers come from (the config, on load and on reload) and again where they
are sent (`guardd.probes.wire`). The reasons given never quote the name or the value: a
header is where credentials travel, and an operator who wrote `Bearer <token>\\n` must not
find the token in an error, a log line, the journal or `status`.
"""

from __future__ import annotations

import re

# RFC 9110 §5.6.2: tchar. No space, no colon: `"Authorization: Bearer x" = ""` is refused.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Every C0 control but HTAB (which may separate words of a value), and DEL. CR and LF
# would end the header (or smuggle another one); NUL ends a C string on the other side.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

NAME_REASON = (
    "the name must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~ (no space or colon)"
)
CONTROL_REASON = "the value must not contain CR, LF or other control characters"
ASCII_REASON = "the value must be ASCII text"
EDGE_REASON = "the value must not begin or end with a space or tab"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be sent as a header name, or None. The reason names no character."""
    return None if _TOKEN.fullmatch(name) else NAME_REASON


def value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as a header value, or None; the reason quotes none of it.

    Sendable: ASCII without control characters (HTAB inside is fine), not starting or
    ending with a space or tab (a receiver would strip them, h11 refuses them). Empty is
    sendable.
    """
    if _CONTROL.search(value):
        return CONTROL_REASON
    if not value.isascii():
        return ASCII_REASON
    if value != value.strip(" \t"):
        return EDGE_REASON
    return None
