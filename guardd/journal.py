"""The event journal: `events.jsonl`, append-only, one fsynced JSON object a line.

A line that cannot be written (disk full) is kept in memory and written, in order,
with the next append that succeeds, so a full disk delays the journal but loses nothing
while the daemon lives. A torn last line left by a power cut is sealed at open and
skipped by readers.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Reversible, Sequence
from pathlib import Path
from typing import Any, Final, overload

from guardd import untrusted_json
from guardd.core.types import JOURNAL_EVENTS
from guardd.exceptions import StorageError, UnsafePath
from guardd.timestamps import parse_rfc3339, rfc3339

# The journal refuses any event outside the shared vocabulary.
EVENTS = JOURNAL_EVENTS
# The in-memory tail of the journal is bounded by the size of its lines, not their number:
# events carry evidence of very different sizes, and a count bound let the tail keep
# growing for an hour at a fast interval. It holds the lines themselves: held as dicts, a
# tail cost ~4x its line bytes and kept growing long after its bound was reached.
RECENT_BYTES = 256 * 1024


# _LAZY_WRITE: `uuid` (which imports `platform`) and `guardd.secrets` (which compiles its
# patterns) were ~6 ms of a `guardctl qos status` that only reads the journal's tail:
# what writes imports them on first use.
def _fresh_id() -> str:
    import uuid  # noqa: PLC0415 - _LAZY_WRITE

    return uuid.uuid4().hex


def _redact(text: str) -> str:
    from guardd.secrets import redact  # noqa: PLC0415 - _LAZY_WRITE

    return redact(text)


#: The stamps `rfc3339` renders (seconds since the epoch): 1970-01-01 to 9999-12-31.
#: A time read from outside (a record, an argument) beyond them is not a time.
STAMPS: Final = (0.0, 253_402_300_799.0)


def is_stamp(ts: float) -> bool:
    """Whether `ts` lies within `STAMPS` (False for NaN and infinities)."""
    return STAMPS[0] <= ts <= STAMPS[1]


def named_record(event: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A journal record named before it is written: `event`, a fresh `id` and `fields`
    (keywords of `Journal.append`), its `reason` redacted as the journal will hold it.

    State.json names a record so before the journal has it (a change of the QoS lock file,
    a record the guard owes): a crash between the two is finished at the next start, which
    writes it (`record_fields`, under that `id`) unless the journal already holds the `id`.
    """
    said = {**fields, "reason": _redact(fields["reason"])} if fields.get("reason") else fields
    return {"event": event, "id": _fresh_id(), **said}


def is_event_line(doc: object) -> bool:
    """Whether a journal line's JSON is an event: an object whose `event` is a string, `ts`
    an RFC 3339 time, and `from`, `to`, `by` and `reason`, when there, strings or null.
    Anything else (a torn line, a line another tool wrote) is skipped by every reader of
    the journal, guardd's and guardctl's alike."""
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        return False
    if any(not isinstance(doc.get(k), str | None) for k in ("from", "to", "by", "reason")):
        return False
    ts = doc.get("ts")
    try:
        return isinstance(ts, str) and math.isfinite(parse_rfc3339(ts))
    except (ValueError, OverflowError):
        return False


def is_named(doc: object) -> bool:
    """Whether `doc`, read back from state.json, is a `named_record` guardd can journal: an
    event it knows, a 32-hex id. (state.json is data: a hand edit, or a file of another
    version, must not stop a start.)"""
    if not isinstance(doc, dict):
        return False
    event, event_id = doc.get("event"), doc.get("id")
    return (
        event in EVENTS
        and isinstance(event_id, str)
        and len(event_id) == 32
        and all(c in "0123456789abcdef" for c in event_id)
        and all(isinstance(k, str) for k in doc)
    )


# The keys of a journal line that `Journal.append` writes itself.
def open_rollback(recent: Reversible[dict[str, Any]]) -> dict[str, Any] | None:
    """The last `rollback_started` among the journal's `recent` entries (oldest first)
    that no completion or failure closed."""
    closed: set[str] = set()
    for entry in reversed(recent):
        kind = entry.get("event")
        if kind in ("rollback_completed", "rollback_failed"):
            closed.add(str(entry.get("rollback_id")))
        elif kind == "rollback_started":
            return None if str(entry.get("id")) in closed else entry
    return None


def tail_events(path: Path, limit_bytes: int = RECENT_BYTES) -> list[dict[str, Any]]:
    """The events of the last `limit_bytes` of the journal at `path` (what a guardd starting
    now keeps of it, `Journal.recent`), oldest first, torn and foreign lines skipped; []
    when there is no journal. Raises `OSError` when it cannot be read."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return []
    with f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - limit_bytes))
        data = f.read(limit_bytes)
    lines = data.split(b"\n")
    if size > limit_bytes:
        lines = lines[1:]  # begun mid-line
    return [event for raw in lines if raw.strip() and (event := event_of(raw)) is not None]


def event_of(raw: bytes) -> dict[str, Any] | None:
    """The event a journal line holds; None for a line torn by a crash, or not guardd's."""
    try:
        doc = untrusted_json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if is_event_line(doc) else None


_OWN_KEYS: Final = frozenset({"event", "id", "event_id", "ts", "guard"})


def record_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The keywords of `Journal.append` (but `event_id`) a `named_record` was named with;
    none that would overwrite what the journal writes itself (`ts`, `guard`)."""
    return {k: v for k, v in record.items() if k not in _OWN_KEYS}


class Tail(Sequence[dict[str, Any]]):
    """The newest journal events, oldest first, at most `limit` bytes of their lines.

    Always holds the newest event, however large. Held as the lines' bytes (a line with
    its newline) and decoded only when read: `tail[-1]` decodes nothing (the newest event
    is kept as its dict), any other index one line, and `reversed(tail)` one line a step,
    so a search from the newest end stops paying where it stops. Every read of an older
    event is a fresh dict.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lines: deque[bytes] = deque()
        self.bytes = 0
        # The newest event as appended (or as read at open); None when the tail is empty.
        self._newest: dict[str, Any] | None = None

    def add(self, event: dict[str, Any], line: bytes) -> None:
        """Remember `event`, whose journal line (with its newline) is `line`."""
        self._lines.append(line)
        self._newest = event
        self.bytes += len(line)
        while self.bytes > self.limit and len(self._lines) > 1:
            self.bytes -= len(self._lines.popleft())

    def __len__(self) -> int:
        return len(self._lines)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._lines)))]
        n = len(self._lines)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("journal tail index out of range")
        if index == n - 1 and self._newest is not None:
            return self._newest
        return _decode(self._lines[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self._lines)
        for i, line in enumerate(list(self._lines)):
            yield self._newest if i == n - 1 and self._newest is not None else _decode(line)

    def __reversed__(self) -> Iterator[dict[str, Any]]:
        # A snapshot of the references, so an append while a caller iterates cannot
        # break the iteration (a deque raises if mutated under its iterator).
        lines = list(self._lines)
        newest = self._newest
        for i in range(len(lines) - 1, -1, -1):
            yield newest if i == len(lines) - 1 and newest is not None else _decode(lines[i])


def _decode(line: bytes) -> dict[str, Any]:
    """The event of a line the tail holds (every one was checked to be an event object)."""
    doc: dict[str, Any] = json.loads(line)
    return doc


class Journal:
    """Appends events to `path` and remembers the recent ones."""

    def __init__(self, path: Path, guard: str, wall: Callable[[], float]) -> None:
        self.path = path
        self.guard = guard
        self._wall = wall
        self._backlog: list[bytes] = []
        # The newest events, oldest first, at most RECENT_BYTES of their lines (always the
        # newest one, however large).
        self.recent = Tail(RECENT_BYTES)
        self.skipped_lines = 0
        self._fd = -1
        self._torn = False

    def open(self) -> None:
        """Open for appending, seal a torn last line, and load the recent events."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o640,
            )
        except OSError as e:
            if e.errno == 40:  # ELOOP: a symlink was planted where the journal belongs
                raise UnsafePath(f"{self.path} is a symlink; refusing to follow it") from None
            raise StorageError(f"cannot open {self.path}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        if size:
            with self.path.open("rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    # A power cut tore the last line; end it so the next event starts clean.
                    try:
                        self._write(b"\n")
                    except StorageError:
                        self._torn = True  # disk full: the first write that succeeds ends it
        skipped = 0
        for event, raw in self._lines():
            if event is None:
                skipped += 1
            else:
                self.recent.add(event, raw)
        self.skipped_lines = skipped

    @property
    def recent_bytes(self) -> int:
        """Bytes of the lines in the in-memory tail (at most RECENT_BYTES, or one line)."""
        return self.recent.bytes

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def backlog(self) -> int:
        """Events not yet on disk."""
        return len(self._backlog)

    def append(
        self,
        event: str,
        *,
        by: str = "guardd",
        source: str | None = None,
        target: str | None = None,
        reason: str | None = None,
        severity: str | None = None,
        evidence: dict[str, Any] | None = None,
        event_id: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Journal one event; returns it. Raises `StorageError` if it is not yet on disk.

        `event_id`: the event's `id` when it was named before it happened (a change of the
        QoS lock file names its event in state.json first); a fresh one otherwise.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown journal event {event!r}")
        record: dict[str, Any] = {
            "ts": rfc3339(self._wall()),
            "id": event_id or _fresh_id(),
            "event": event,
            "guard": self.guard,
            "from": source,
            "to": target,
            "reason": _redact(reason) if reason else reason,
            "severity": severity,
            "by": by,
        }
        if evidence is not None:
            record["evidence"] = evidence
        record.update(extra)
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        self.recent.add(record, line)
        self._backlog.append(line)
        self.flush()
        return record

    def flush(self) -> None:
        """Write the backlog in order; raise `StorageError` if it could not all be written."""
        while self._backlog:
            self._write(self._backlog[0])
            self._backlog.pop(0)

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            raise StorageError(f"{self.path} is not open")
        try:
            if self._torn:
                # A fragment is left (a power cut, or a short append that could not be
                # cut off): end it first, so readers skip it and the next line stands alone.
                os.write(self._fd, b"\n")
                self._torn = False
            end = os.fstat(self._fd).st_size
            written = os.write(self._fd, data)
            if written == len(data):
                os.fsync(self._fd)
            else:
                # Disk full mid-line: cut the fragment off, so the file never holds half
                # a line; only if that fails too is it ended before the next line.
                try:
                    os.ftruncate(self._fd, end)
                except OSError:
                    self._torn = True
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror}") from None
        if written != len(data):
            raise StorageError(f"cannot write {self.path}: No space left on device")

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Every well-formed event in the file, then those not written to it yet (a full
        disk: the backlog, in order), the newest `limit`; torn lines skipped."""
        events: deque[dict[str, Any]] = deque(maxlen=limit)
        skipped = 0
        for event, _ in self._lines():
            if event is None:
                skipped += 1
            else:
                events.append(event)
        self.skipped_lines = skipped
        # What guardd journaled and the disk has not taken yet happened all the same.
        events.extend(json.loads(line) for line in self._backlog)
        return list(events)

    def _lines(self) -> Iterator[tuple[dict[str, Any] | None, bytes]]:
        """Each line's event (None for a torn or foreign line) and the line as read."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                if raw.strip():
                    yield event_of(raw), raw
