"""`state.json`: what guardd must remember across a restart, written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guardd import fsutil, untrusted_json
from guardd.exceptions import StorageError, UnsafePath

STATE_VERSION = 1


# The keys whose loss changes a decision, and the JSON types guardd writes them as (null
# aside): a pause or a hold read as something else would be forgotten in silence.
_KEY_TYPES: dict[str, type] = {
    "active": str,
    "paused": dict,
    "hold": dict,
    "qos": dict,
    "qos_change": dict,
    "journal_owed": list,
    "moving": dict,
}


def _wrong_key(doc: dict[str, Any]) -> str | None:
    """Why `doc` is no state document of this guardd, or None: a `version` that is not
    `STATE_VERSION` (none: `{}` or another file; another: a guardd whose document this one
    may misread), no `state` (every guardd wrote one), or a key of `_KEY_TYPES` held as
    another type. Read as a first start, any of these would drop a hold or a guard window."""
    version = doc.get("version")
    if version is None:
        return "it has no version"
    if type(version) is not int or version != STATE_VERSION:
        return f"its version is {json.dumps(version)}, not {STATE_VERSION}"
    if not isinstance(doc.get("state"), str):
        return "it has no state"
    for key, kind in _KEY_TYPES.items():
        value = doc.get(key)
        if value is not None and not isinstance(value, kind):
            return f"its {key} is {type(value).__name__}, not {kind.__name__}"
    return None


def read_only(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """state.json's bytes as `StateFile.load` reads them, without moving anything: (the
    document, None), or ({}, why it is no state document; guardd then starts in a hold)."""
    try:
        doc = untrusted_json.loads(raw)
    except ValueError as e:
        return {}, f"not JSON ({e})"
    if not isinstance(doc, dict):
        return {}, "not a JSON object"
    wrong = _wrong_key(doc)
    return (doc, None) if wrong is None else ({}, f"not a state document ({wrong})")


class StateFile:
    """Loads and atomically saves the daemon's state document."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: bytes | None = None
        self._last_doc: dict[str, Any] | None = None
        self.unreadable: str | None = None
        """After `load`: why the file there was no state document (where it was kept), or
        None when it was one, or there was none (a first start)."""

    def load(self) -> dict[str, Any]:
        """The saved state; an empty one when there is none, or when the file is not a
        state document (cut short, overwritten): then `unreadable` says so, and the file
        is kept beside as `state.json.unreadable` for the operator to look at."""
        self.unreadable = None
        try:
            raw = fsutil.read_bytes(self.path)
        except FileNotFoundError:
            return {}
        except UnsafePath:
            raise
        except OSError as e:
            raise StorageError(f"cannot read {self.path}: {e.strerror}") from None
        doc, why = read_only(raw)
        if why is None:
            return doc
        aside = self.path.with_name(self.path.name + ".unreadable")
        try:
            self.path.replace(aside)
        except OSError as e:
            self.unreadable = f"{self.path} is {why}; it could not be kept aside: {e.strerror}"
        else:
            self.unreadable = f"{self.path} was {why}; kept as {aside}"
        return {}

    def save_from(self, build: Callable[[], dict[str, Any]]) -> None:
        """`save(build())`: the document `build` gives now. A store that is only read back
        after its writer's last save (a replay's, in memory) may build it then instead."""
        self.save(build())

    def save(self, doc: dict[str, Any]) -> None:
        """Write `doc` atomically unless it is unchanged; raise `StorageError` on failure."""
        if doc == self._last_doc:
            return  # the common case on every tick: no serialisation at all
        data = (
            json.dumps({"version": STATE_VERSION, **doc}, sort_keys=True, indent=1, default=str)
            + "\n"
        ).encode()
        if data == self._last:
            return
        try:
            fsutil.atomic_write(self.path, data, mode=0o640)
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror}") from None
        self._last = data
        self._last_doc = doc
