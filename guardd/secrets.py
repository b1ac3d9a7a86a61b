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
