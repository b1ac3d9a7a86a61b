"""The durable outbox: one small JSON file per undelivered (sink, event) pair.

A message is written to a temporary file, fsynced and renamed into place, so a reader
sees either nothing or the whole message; delivering it (or giving up on it) unlinks the
file. Whatever is left in the directory at start-up was not delivered yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from guardd.exceptions import StorageError

_FORMAT: Final = 1
_NAME = re.compile(r"^(\d{1,20})\.json$")
_TEMP_SUFFIX: Final = ".tmp"
_CORRUPT_SUFFIX: Final = ".corrupt"
# A message is a journal event; anything much larger is not one of ours.
_MAX_FILE_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One journal event waiting to be delivered to one sink."""

    seq: int
    sink: str
    event_id: str
    event: Mapping[str, Any]
    # Monotonic time of the submission, for latency logs; unknown after a restart.
    queued_at: float | None = field(default=None, compare=False)


class CorruptMessageError(ValueError):
    """An outbox file is not a whole message written by this guardd."""


class Outbox:
    """Undelivered messages in `directory`, written atomically and read back in order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._next_seq = 1
        # Sequence numbers are safe only once the directory was read: never overwrite a file.
        self._loaded = False

    def load(self) -> tuple[list[Message], list[str]]:
        """Every message an earlier run left, oldest first, and one problem per file skipped.

        A file that cannot be parsed is renamed to `*.corrupt`, so it is reported once and
        kept for whoever wants to look at it.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        messages: list[Message] = []
        problems: list[str] = []
        highest = 0
        with os.scandir(self.directory) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX):
                # A write that never reached its rename: the submission was not durable yet.
                _unlink_quietly(Path(entry.path))
                continue
            if (numbered := _NAME.match(entry.name.removesuffix(_CORRUPT_SUFFIX))) is None:
                continue
            highest = max(highest, int(numbered[1]))
            if entry.name.endswith(_CORRUPT_SUFFIX):
                continue
            try:
                messages.append(_read(Path(entry.path), int(numbered[1])))
            except (OSError, CorruptMessageError) as e:
                problems.append(f"{entry.name}: {e}")
                with contextlib.suppress(OSError):
                    Path(entry.path).rename(Path(entry.path + _CORRUPT_SUFFIX))
        self._next_seq = max(self._next_seq, highest + 1)
        self._loaded = True
        messages.sort(key=lambda m: m.seq)
        return messages, problems

    def new_message(
        self, sink: str, event_id: str, event: Mapping[str, Any], queued_at: float | None = None
    ) -> Message:
        """A message with the next sequence number; nothing is written yet."""
        seq = self._next_seq
        self._next_seq += 1
        return Message(seq=seq, sink=sink, event_id=event_id, event=event, queued_at=queued_at)

    def save(self, messages: Sequence[Message]) -> list[tuple[Message, str]]:
        """Write each of `messages` atomically; returns those that could not be written, with why.

        The renames become durable with `sync`; one `sync` per batch keeps the fsyncs few.
        """
        if not self._loaded:
            return [(m, "the outbox directory could not be read at start") for m in messages]
        failed: list[tuple[Message, str]] = []
        for message in messages:
            try:
                self._write(message)
            except OSError as e:
                failed.append((message, _why(e)))
        return failed

    def sync(self) -> None:
        """Make the renames and unlinks done so far survive a power cut."""
        try:
            _fsync_dir(self.directory)
        except OSError as e:
            raise StorageError(f"cannot sync the outbox directory: {_why(e)}") from e

    def remove(self, messages: Sequence[Message]) -> None:
        """Forget delivered or dropped `messages` durably; raises `StorageError` if it cannot."""
        try:
            for message in messages:
                self._path(message.seq).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot remove an outbox message: {_why(e)}") from e
        if messages:
            self.sync()

    def load_thread(self, sink: str) -> Any:
        """The thread state `save_thread` kept for `sink` (parsed JSON), or None if there is none.

        Raises `CorruptMessageError` for a file that is not JSON, `OSError` if unreadable.
        """
        try:
            with self._thread_path(sink).open("rb") as f:
                raw = f.read(_MAX_FILE_BYTES)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptMessageError("not valid JSON") from None

    def save_thread(self, sink: str, state: Mapping[str, Any] | None) -> None:
        """Keep `state` (None: forget it) for `sink` durably; raises `StorageError` if it cannot.

        The file is replaced atomically, so a crash leaves the old state or the new one.
        """
        path = self._thread_path(sink)
        try:
            if state is None:
                path.unlink(missing_ok=True)
            else:
                _replace_durably(path, json.dumps(dict(state), separators=(",", ":")).encode())
        except OSError as e:
            raise StorageError(f"cannot write the thread of sink {sink}: {_why(e)}") from e
        self.sync()

    def _thread_path(self, sink: str) -> Path:
        # Not a numbered name: `load` never takes it for a message.
        return self.directory / f"thread-{sink}.json"

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.json"

    def _write(self, message: Message) -> None:
        body = json.dumps(
            {"v": _FORMAT, "sink": message.sink, "id": message.event_id, "event": message.event},
            separators=(",", ":"),
        ).encode()
        _replace_durably(self._path(message.seq), body)


def _replace_durably(final: Path, body: bytes) -> None:
    """Write `body` to a fresh temporary file beside `final`, fsync it, rename it over `final`.

    The caller fsyncs the folder. Raises `OSError`; no temporary file is left behind.
    """
    temp = final.with_name(f".{final.name}{_TEMP_SUFFIX}")
    # O_EXCL|O_NOFOLLOW: never write through something planted at the temporary name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    _unlink_quietly(temp)
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        temp.replace(final)
    except BaseException:
        _unlink_quietly(temp)
        raise


def _read(path: Path, seq: int) -> Message:
    with path.open("rb") as f:
        raw = f.read(_MAX_FILE_BYTES + 1)
    if len(raw) > _MAX_FILE_BYTES:
        raise CorruptMessageError("larger than any message guardd writes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptMessageError("not valid JSON (torn or foreign file)") from None
    if not isinstance(doc, dict) or doc.get("v") != _FORMAT:
        raise CorruptMessageError("not an outbox message of this guardd")
    sink, event_id, event = doc.get("sink"), doc.get("id"), doc.get("event")
    if not (isinstance(sink, str) and isinstance(event_id, str) and isinstance(event, dict)):
        raise CorruptMessageError("sink, id or event missing")
    return Message(seq=seq, sink=sink, event_id=event_id, event=event)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _why(error: OSError) -> str:
    return error.strerror or type(error).__name__
