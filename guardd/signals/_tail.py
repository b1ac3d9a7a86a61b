"""Following one log file by its path, whatever logrotate, the writer or an attacker does.

Shared by the file-reading signals (`access_log`, `log_match`): they differ in what a line
means, not in how a file is followed. A `FileFollower` polls (every `poll_interval_s`) the
path's inode and the open file's size and last bytes read, and hands complete lines to its
owner in batches of `BATCH_LINES` with a checkpoint between batches:

- rename + reopen (logrotate's default): the old file is read on until quiet for `DRAIN_S`;
- `copytruncate`: what was not read yet is read from the copy, found beside the log and
  proven by the last bytes read, so that no line is counted twice or lost;
- deletion: the open file is read on until a new one appears at the path;
- the first file found is read from its end (history is not live traffic); a file seen to
  appear later (after the path was missing, or replacing the one followed) from its start;
- a missing path, a permission error, a directory: a `state` (and `problem`), never fatal;
- a partial last line is held until its newline; a line longer than `max_line_bytes` is
  skipped without being held whole (the owner's `on_oversize` is told); bytes that are not
  UTF-8 survive decoding as surrogates (`surrogateescape`), never an error.

What is held at once is bounded by `max_line_bytes + READ_CHUNK`, whatever the file holds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from guardd.clock import Clock

#: Bytes read from a file at a time; with `max_line_bytes` it bounds what is held.
READ_CHUNK: Final = 64 * 1024
#: Lines handed over between two checkpoints (about 10 ms of work on a slow core).
BATCH_LINES: Final = 1024
#: A rotated-away file is read until it has not grown for this long (writers reopen late).
DRAIN_S: Final = 30.0
#: A path with no file, and none followed, is a problem after this long. A rotation makes
#: the new file at once (logrotate's `create`, or the writer's reopen as it is told to);
#: one missing for 10 s is a mistyped path, or a log no longer written: the signal can
#: tell nothing, and must say so rather than look like a quiet log.
MISSING_GRACE_S: Final = 10.0
# The bytes before the read position compared on each poll: enough for several lines, so
# that their contents (not only a tail all lines share) tell a rewritten file apart.
_MARK: Final = 1024
# Chunks (4 MiB) read from one file before the other files and the loop get a turn.
_CHUNKS_PER_TURN: Final = 64


def unheard() -> None:
    """The file signals' `on_counted` until the daemon wires it: nobody is told."""


class Tail:
    """One open log file being followed: where we are in it and the partial line held."""

    __slots__ = ("discarding", "fd", "grew_at", "key", "mark", "pending", "pos")

    def __init__(self, fd: int, key: tuple[int, int], pos: int, now: float) -> None:
        self.fd = fd
        self.key = key
        self.pos = pos
        self.pending = b""
        # True while the rest of an oversize line is being skipped up to its newline.
        self.discarding = False
        # The last bytes read before `pos`: if they change, the file was truncated and
        # rewritten past `pos` between two polls (copytruncate under heavy traffic).
        self.mark = b""
        self.grew_at = now

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FileFollower:
    """Follows the file at `path` until cancelled, handing its complete lines to `on_lines`.

    `on_lines(lines)` gets lines without their newline (a list of at most `BATCH_LINES`);
    `on_oversize()` is called once per line longer than `max_line_bytes` bytes, which is
    never handed over. `poll_interval_s`: seconds between looks at a quiet file.

    Public state, read by the owning signal: `state` (in words), `problem` (why the file
    cannot be read right now, else None; a path with no file, none followed, for
    `MISSING_GRACE_S` or more: "does not exist"), `rotations`, `truncations`, `polls` (rounds of
    the loop), `max_buffered` (the most bytes held at once), `read_at` (monotonic time of
    the last round that read the file without error, None before the first).
    """

    def __init__(
        self,
        path: str,
        *,
        max_line_bytes: int,
        poll_interval_s: float,
        clock: Clock,
        on_lines: Callable[[list[str]], None],
        on_oversize: Callable[[], None],
    ) -> None:
        self.path = path
        self.max_line_bytes = max_line_bytes
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self._on_lines = on_lines
        self._on_oversize = on_oversize
        self.state = "not started"
        self.problem: str | None = None
        self.rotations = 0
        self.truncations = 0
        self.polls = 0
        self.max_buffered = 0
        self.read_at: float | None = None
        self._saw_missing = False
        # Since when the path has had no file while none is followed (monotonic), or None.
        self._missing_since: float | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the path until cancelled; never raises for what the file does."""
        path = self.path
        current: Tail | None = None
        draining: list[Tail] = []
        self.state = f"waiting for {path}"
        task_status.started()
        try:
            while True:
                now = self.clock.monotonic()
                current = self._reopen(path, current, draining, now)
                busy = False
                for tail in [*draining, current]:
                    if tail is not None:
                        busy |= await self._follow(tail, now)
                for tail in [t for t in draining if now - t.grew_at > DRAIN_S]:
                    draining.remove(tail)
                    tail.close()
                if current is not None and self.problem is None:
                    self.read_at = now
                self.polls += 1
                # A flood is read on at once; a quiet log is looked at every poll interval.
                await anyio.sleep(0 if busy else self.poll_interval_s)
        finally:
            for tail in [*draining, current]:
                if tail is not None:
                    tail.close()

    def split(self, tail: Tail, chunk: bytes) -> list[str]:
        """Complete lines of `tail` with `chunk` appended; the partial rest stays held.

        Lines are decoded with `surrogateescape`: bytes that are not UTF-8 survive as
        themselves (the owner decides what such a line means), never an error.
        """
        data = tail.pending + chunk if tail.pending else chunk
        self.max_buffered = max(self.max_buffered, len(data))
        cut = data.rfind(b"\n")
        if cut < 0:
            lines: list[str] = []
            rest = data
        else:
            lines = data[:cut].decode("utf-8", "surrogateescape").split("\n")
            rest = data[cut + 1 :]
            if tail.discarding:
                # The end of an oversize line already counted.
                del lines[0]
                tail.discarding = False
        if tail.discarding:
            rest = b""
        elif len(rest) > self.max_line_bytes:
            self._on_oversize()
            tail.discarding = True
            rest = b""
        tail.pending = rest
        return lines

    async def _hand_over(self, lines: list[str]) -> None:
        for start in range(0, len(lines), BATCH_LINES):
            self._on_lines(lines[start : start + BATCH_LINES])
            await anyio.lowlevel.checkpoint()

    def _reopen(
        self,
        path: str,
        current: Tail | None,
        draining: list[Tail],
        now: float,
    ) -> Tail | None:
        """The tail to follow now: the file at `path` if it is a new one and opens."""
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            self._saw_missing = True
            self.problem = None
            if current is None:
                self.state = f"waiting for {path} (missing)"
                if self._missing_since is None:
                    self._missing_since = now
                elif now - self._missing_since >= MISSING_GRACE_S:
                    self.problem = "does not exist"
            else:
                self.state = f"reading {path} (gone from its path; following the open file)"
            return current
        except OSError as e:
            self._missing_since = None
            return self._cannot(path, e, current)
        self._missing_since = None
        key = (st.st_dev, st.st_ino)
        if current is not None and current.key == key:
            self.state, self.problem = f"reading {path}", None
            return current
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return self._cannot(path, e, current)
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            os.close(fd)
            self.state = f"waiting for {path} (not a regular file)"
            self.problem = "not a regular file"
            return current
        key = (fst.st_dev, fst.st_ino)
        if current is not None:
            current.grew_at = now
            draining.append(current)
            self.rotations += 1
        self.state, self.problem = f"reading {path}", None
        # A file seen to appear (after a missing path, or replacing the one followed) holds
        # only live lines: read it whole. The first file found otherwise may hold history
        # (also one that could not be read at first): read it from its end.
        fresh = current is not None or self._saw_missing
        tail = Tail(fd, key, 0 if fresh else fst.st_size, now)
        if tail.pos:
            # What is before the end we start from: a truncation is noticed from the start.
            with contextlib.suppress(OSError):
                size = min(_MARK, tail.pos)
                tail.mark = os.pread(fd, size, tail.pos - size)
        return tail

    def _cannot(self, path: str, error: OSError, current: Tail | None) -> Tail | None:
        if error.errno in (errno.EACCES, errno.EPERM):
            self.problem = "permission denied"
            self.state = f"permission denied: {path}"
        else:
            self.problem = error.strerror or type(error).__name__
            self.state = f"cannot open {path}: {self.problem}"
        return current

    async def _follow(self, tail: Tail, now: float) -> bool:
        """Read what `tail`'s file gained; True if it stopped with more to read."""
        try:
            size = os.fstat(tail.fd).st_size
            mark = tail.mark
            if size < tail.pos or (
                mark and os.pread(tail.fd, len(mark), tail.pos - len(mark)) != mark
            ):
                # Truncated (copytruncate): what is there now was written since. What was
                # written between our last read and the copy is in the copy: read it there.
                self.truncations += 1
                await self._read_copy(tail)
                tail.pos, tail.pending, tail.mark, tail.discarding = 0, b"", b"", False
            budget = _CHUNKS_PER_TURN
            while budget:
                chunk = os.pread(tail.fd, READ_CHUNK, tail.pos)
                if not chunk:
                    return False
                budget -= 1
                tail.pos += len(chunk)
                tail.mark = (tail.mark + chunk)[-_MARK:] if len(chunk) < _MARK else chunk[-_MARK:]
                tail.grew_at = now
                await self._hand_over(self.split(tail, chunk))
        except OSError as e:
            self.state = f"cannot read {self.path}: {e.strerror}"
            self.problem = e.strerror or type(e).__name__
            return False
        return True

    async def _read_copy(self, tail: Tail) -> None:
        """Read the rest of `tail` from the copy copytruncate made, if it can be found."""
        copy = self._find_copy(tail)
        if copy is None:
            return
        try:
            while chunk := os.pread(copy, READ_CHUNK, tail.pos):
                tail.pos += len(chunk)
                await self._hand_over(self.split(tail, chunk))
        except OSError:
            pass  # what could not be read is lost, as it would have been without the copy
        finally:
            os.close(copy)

    def _find_copy(self, tail: Tail) -> int | None:
        """An open fd on the copy: a sibling named after the log (`access.log.1`,
        `access.log-20261130`) that holds, just before our position, the very bytes we
        read last. Compressed ones and any that do not match are left alone."""
        if not tail.mark:
            return None  # nothing read yet: the copy would be history
        where = Path(self.path)
        try:
            siblings = [
                p
                for p in where.parent.iterdir()
                if p.name.startswith(where.name)
                and p.name != where.name
                and not p.name.endswith((".gz", ".xz", ".bz2", ".zst"))
            ]
            siblings.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return None
        mark = tail.mark
        for candidate in siblings[:4]:
            try:
                fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                if (
                    stat.S_ISREG(st.st_mode)
                    and st.st_size >= tail.pos
                    and os.pread(fd, len(mark), tail.pos - len(mark)) == mark
                ):
                    return fd
            os.close(fd)
        return None
