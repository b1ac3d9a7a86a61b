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

    def load(self) -> dict[str, Any]:
        """The saved state, or an empty one when missing or unreadable."""
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
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

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
