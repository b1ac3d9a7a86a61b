"""Secret values that may be used but never shown.

Every `Secret` registers its value so that `redact` can scrub it from any text that is
about to be logged, journaled or printed, wherever that text came from.
"""

from __future__ import annotations

import re
import threading
from typing import Final

REDACTED: Final = "***"

_lock = threading.Lock()
_known: set[str] = set()
# Values shorter than this would redact ordinary words; a real token or URL is longer.
_MIN_SECRET_LEN: Final = 6
_TOKEN_NAME = re.compile(
    r"(token|secret|password|passwd|authorization|api[-_]?key|cookie)", re.IGNORECASE
)


class Secret:
    """A string that is never rendered by `str`, `repr` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        if len(value) >= _MIN_SECRET_LEN:
            with _lock:
                _known.add(value)

    def reveal(self) -> str:
        """The real value, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def is_secret_name(name: str) -> bool:
    """Whether a header or key name says its value is a credential."""
    return bool(_TOKEN_NAME.search(name))


def redact(text: str) -> str:
    """`text` with every registered secret value replaced by `***`."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


# Credentials as they appear in text guardd did not write (an application's log lines):
# `Authorization: Bearer abc`, `password=abc`, `"api_key": "abc"`, `https://user:pw@host`,
# and tokens whose shape gives them away (JWTs, GitHub, Slack, AWS, `sk-` API keys). Each
# pattern with the replacement that keeps its context; all are linear (no nested repeats).
_CREDENTIALS: Final = (
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{6,}"), rf"\1\2{REDACTED}"),
    # A bare `token` is an ordinary word too: only a long value after it is taken for one.
    (re.compile(r"(?i)\b(token)(\s+)[A-Za-z0-9._~+/=-]{16,}"), rf"\1\2{REDACTED}"),
    (
        re.compile(
            r"""(?ix)
            ( [\w.-]*(?:token|secret|passw(?:or)?d|pwd|api[-_]?key|authorization|cookie
              |credential|session|private[-_]?key|access[-_]?key)[\w.-]* )
            ( "?\s*[=:]\s*"? )
            [^\s"',;&]+
            """
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), rf"\1{REDACTED}@"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    (
        re.compile(
            r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})"
        ),
        REDACTED,
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), REDACTED),
)


def redact_credentials(text: str) -> str:
    """`text` with registered secrets (`redact`) and credential-looking values replaced
    by `***`: the value after a secret-named key (`password=`, `"api_key": `, `token:`),
    after `Bearer `/`Basic ` (and a long one after `token `), a URL's password, and JWT,
    GitHub, Slack, AWS and `sk-` tokens. For text from outside guardd (log lines) before
    it is shown; it cannot know every secret, so callers still keep such text short."""
    text = redact(text)
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


#: Settings whose values may carry a credential whatever their names say: a webhook's URL
#: (Slack's and Discord's hold their token in the path) and any header.
_SECRET_BEARING: Final = frozenset({"notify", "headers"})


def shown_setting(key: str, value: str) -> str:
    """`value` of the setting `key` (dotted: `probe.headers`) as a report or an error may
    show it: `***` unless it is plainly no secret (fail closed). A value under a
    credential-like name, under notify or headers, a table or a list (anything may be in
    it), a URL, or one holding a known secret or a credential's shape is never shown."""
    parts = key.lower().split(".")
    if (
        is_secret_name(key)
        or _SECRET_BEARING.intersection(parts)
        or value.lstrip()[:1] in ("[", "{")
        or "://" in value
        or redact(value) != value
        or redact_credentials(value) != value
    ):
        return REDACTED
    return value
