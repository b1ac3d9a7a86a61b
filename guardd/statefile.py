"""`state.json`: what guardd must remember across a restart, written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guardd import fsutil, untrusted_json
from guardd.exceptions import StorageError, UnsafePath

STATE_VERSION = 1


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
        try:
            doc = untrusted_json.loads(raw)
        except ValueError as e:
            why = f"not JSON ({e})"
        else:
            if isinstance(doc, dict):
                return doc
            why = "not a JSON object"
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
