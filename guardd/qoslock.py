"""The QoS guard lock file: read by anyone, written atomically by guardd.

Any file at the lock path means "deploys are blocked", whoever made it, even an empty
one made with `touch`. Only the standard library is imported for reading, so that
`guardctl qos status` answers fast and with the daemon down.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from guardd import untrusted_json
from guardd.exceptions import UnsafePath

_MAX_LOCK_BYTES = 64 * 1024
#: The lock guardd reports, with no lock file held, while a switch is in flight (its lock,
#: a guard window or a hold's, is written as it ends): deploys wait meanwhile.
IN_FLIGHT = "guardd is moving traffic (a switch in flight): deploys wait until it ends"


@dataclass(frozen=True, slots=True)
class LockInfo:
    """What the lock file says; `held` is true whenever the file exists."""

    held: bool
    reason: str | None = None
    locked_at: str | None = None
    until: str | None = None
    by: str | None = None

    def to_json(self) -> dict[str, object]:
        """The shape used in `status --json` and `qos status --json`."""
        return {
            "locked": self.held,
            "reason": self.reason,
            "until": self.until,
            "locked_at": self.locked_at,
            "by": self.by,
        }


def unknown_json(warning: str | None, *, source: str | None = None) -> dict[str, object]:
    """The lock in the `to_json` shape when whether it is held cannot be told (UNKNOWN,
    docs/contract.md §1): `{"locked": null, "unknown": true, "reason": null, "until": null,
    "locked_at": null, "by": null, ["source": ...,] "warning": <why>}`.

    `source` is `"fleet"` when it is the fleet's lock that cannot be read, and left out
    otherwise, as in the answers that can tell. Never `"locked": false`: fail closed.
    """
    doc: dict[str, object] = {
        "locked": None,
        "unknown": True,
        "reason": None,
        "until": None,
        "locked_at": None,
        "by": None,
    }
    if source is not None:
        doc["source"] = source
    doc["warning"] = warning
    return doc


def read_lock(path: Path) -> LockInfo:
    """Read the lock at `path` without following a symlink planted there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return LockInfo(held=False)
    except OSError as e:
        if e.errno == errno.ELOOP:
            # Something is there, so deploys stay blocked; but it is not read.
            return LockInfo(held=True, reason=f"{path} is a symlink; not followed")
        return LockInfo(held=True, reason=f"{path} exists but cannot be read: {e.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return LockInfo(held=True, reason=f"{path} is not a regular file")
        raw = os.read(fd, _MAX_LOCK_BYTES)
    finally:
        os.close(fd)
    return _parse(raw)


class LockUnknown(Exception):
    """Whether a lock exists cannot be told; the message says what could not be seen."""


def check_lock(path: Path) -> LockInfo:
    """Like `read_lock`, for a gate: raise `LockUnknown` instead of answering "no lock"
    when the lock's directory is missing or cannot be searched, since then an absent file
    proves nothing.
    """
    try:
        path.lstat()
    except FileNotFoundError:
        directory = path.parent
        try:
            if not stat.S_ISDIR(directory.stat().st_mode):
                raise LockUnknown(f"{directory} is not a directory") from None
        except FileNotFoundError:
            raise LockUnknown(f"the lock directory {directory} does not exist") from None
        except PermissionError:
            raise LockUnknown(f"{directory} cannot be searched (permission denied)") from None
        return LockInfo(held=False)
    except PermissionError:
        raise LockUnknown(f"{path.parent} cannot be searched (permission denied)") from None
    except NotADirectoryError:
        raise LockUnknown(f"{path.parent} is not a directory") from None
    # Something is there: whatever it is, read_lock reports it as held.
    return read_lock(path)


def parse_lock(raw: bytes) -> LockInfo:
    """What a lock file holding `raw` says (held, whatever it holds)."""
    return _parse(raw)


def _parse(raw: bytes) -> LockInfo:
    try:
        doc = untrusted_json.loads(raw)
    except ValueError:  # (UnicodeDecodeError is one)
        doc = None
    if not isinstance(doc, dict):
        text = raw.decode("utf-8", "replace").strip()
        return LockInfo(held=True, reason=text[:200] or "lock file present (no details)")

    def field(name: str) -> str | None:
        value = doc.get(name)
        return None if value is None else str(value)

    return LockInfo(
        held=True,
        reason=field("reason") or "lock file present (no reason given)",
        locked_at=field("locked_at"),
        until=field("until"),
        by=field("by"),
    )


def write_lock(path: Path, lock: LockInfo) -> None:
    """Write guardd's lock atomically, refusing to write through a symlink."""
    from guardd import fsutil  # noqa: PLC0415 - writers only; readers stay stdlib-light

    fsutil.atomic_write(path, lock_bytes(lock), mode=0o644)


def lock_bytes(lock: LockInfo) -> bytes:
    """What `write_lock` writes for `lock`: one JSON object and a newline."""
    body = {k: v for k, v in asdict(lock).items() if k != "held"}
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def remove_lock(path: Path) -> bool:
    """Delete the lock file; false if there was none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is a directory, not a lock file")
    # unlink removes a symlink itself, never its target, so a planted link is safe to drop.
    path.unlink(missing_ok=True)
    return True


class LockStore(Protocol):
    """Where the guard reads and writes the lock: the file system (`LOCK_FILES`), or a
    stand-in with the same answers (a replay keeps its lock in memory)."""

    def read(self, path: Path) -> LockInfo:
        """As `read_lock`."""
        ...

    def write(self, path: Path, lock: LockInfo) -> None:
        """As `write_lock`."""
        ...

    def remove(self, path: Path) -> bool:
        """As `remove_lock`."""
        ...


class _LockFiles:
    """The lock files themselves."""

    def read(self, path: Path) -> LockInfo:
        """`read_lock(path)`."""
        return read_lock(path)

    def write(self, path: Path, lock: LockInfo) -> None:
        """`write_lock(path, lock)`."""
        write_lock(path, lock)

    def remove(self, path: Path) -> bool:
        """`remove_lock(path)`."""
        return remove_lock(path)


#: The daemon's lock store: the files at `qos.lock_file`.
LOCK_FILES: LockStore = _LockFiles()
