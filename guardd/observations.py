"""What guardd observed, kept so that `guardd replay` can judge another config on it.

Layout: `<state.dir>/observations/<guard>-YYYY-MM-DD.jsonl.gz`, one file per UTC day of the
records it holds. Each is a gzip stream of JSON objects, one a line; every daemon run (and
every rotation) appends a new gzip member, and readers take the members in order, which is
what `zcat` does too. The file is append-only and written in batches: the daemon takes the
pending records on its event loop (`submit`) and its writer thread encodes, compresses and
appends them (`write_batch`), about once a second, each batch one `write(2)` that ends on a
`Z_SYNC_FLUSH` boundary, never fsynced: a crash loses at most the last batch, the lines
before it stay readable in a file cut short, and a reader that meets a damaged member
resumes at the next member's header.

A line is one record, its `kind` one of `RECORD_KINDS` (docs/contract.md, "Observations"):

- `start`: a daemon run began: `guard`, `active`, `probe_interval_s`, `format`.
- `context`: the first record of a day's file that a run already going on opens (the same
  fields as `start`, `active` as of then): once the older days are pruned, the oldest file
  still says which color was served. No restart: replay only reads the color from it when
  its history begins there.
- `probe`: one probe round of a color: `color`, `outcome`, `latency_s`, `error`, `status`.
- `front_door`: one answer through `switch.verify_url`: `ok`, `error`.
- `sample`: one sample of a non-file signal (prometheus, scrape): `signal`, `color`, and
  `data`, the adapter's own payload (its `on_sample` hook emits it, `apply_sample` reads
  it back).
- `switch`: traffic moved: `from`, `to`, `by` (`guardd`, an operator, `external`), `reason`,
  `event` (the journal's name for the move).

A record goes in the file of its UTC day, except that within a run the day never goes back:
after a wall clock stepped back over midnight the run goes on in the later day's file.

Every record has `ts` (wall clock, seconds since the epoch) and `mono` (the monotonic clock
of that run, seconds). Replay orders and spaces records by `mono` within a run, so a wall
clock stepped by NTP or by hand neither reorders nor stretches the history; `ts` places the
history in real time (`--from`, `--to`, the journal's incidents).

Nothing secret is recorded: error texts (a sample's `data.error` too) go through
`guardd.secrets.redact_credentials`.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import operator
import os
import queue
import re
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, NamedTuple

import anyio

from guardd.core.types import Outcome
from guardd.exceptions import StorageError
from guardd.fsutil import open_regular
from guardd.journal import STAMPS, is_stamp
from guardd.secrets import redact_credentials
from guardd.timestamps import rfc3339

__all__ = [
    "FORMAT",
    "RECORD_KINDS",
    "HistoryUnreadable",
    "ReadReport",
    "Record",
    "Recorder",
    "day_of",
    "history_files",
    "read_history",
]

#: The version of the record layout, in every `start` record.
FORMAT: Final = 1
RECORD_KINDS: Final = frozenset(
    {"start", "context", "probe", "front_door", "sample", "switch", "operator", "stop"}
)
#: A line longer than this is not one guardd wrote: skipped, not parsed (bytes).
MAX_LINE_BYTES: Final = 64 * 1024
#: Records waiting on the loop for the writer, and records the writer holds after failed
#: writes (a disk that hangs or is full), each at most this many: past it the loop drops
#: new ones and the writer its oldest, counted, so that recording never grows without
#: bound nor blocks a probe.
MAX_PENDING: Final = 100_000
#: After a failed write, the writer tries again this much later (s) if no batch comes first.
RETRY_S: Final = 1.0
#: How often `Recorder.aclose` looks whether the writer thread has ended (s).
_CLOSE_POLL_S: Final = 0.01
_NAME: Final = re.compile(r"^(?P<guard>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl\.gz$")
_READ_CHUNK: Final = 256 * 1024
#: Each digit to `0`, any other byte to a space: 19 zeros in a row in a batch so
#: translated could be an integer past 64 bits (`_parse`; a regex search is 20x slower).
_DIGITS: Final = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_DIGITS: Final = b"0" * 19
_SALVAGE_STEP: Final = 16
#: How every member the recorder writes begins: the gzip magic, deflate, no flags, no
#: mtime (zlib's own header). A reader that lost its place looks for the next one; eight
#: fixed bytes make a false find inside compressed data vanishingly rare.
_MEMBER_HEAD: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"


#: One line's JSON: compact; a value JSON has no type for is written as its text.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=str)


#: The keys of a `probe` record, in the order `Recorder.probe` writes them.
_PROBE_KEYS: Final = ("color", "outcome", "latency_s", "error", "status", "kind", "ts", "mono")
#: The JSON of the strings a probe record's `color` and `outcome` nearly always are.
_QUOTED: Final = {s: _ENCODER.encode(s) for s in ("blue", "green", *(o.value for o in Outcome))}


def _line(record: dict[str, Any]) -> str:
    """`record`'s line: its JSON, compact, and a newline.

    A probe record as `Recorder.probe` makes it (every field of the type it writes, each
    float finite) is formatted directly, into the very text `_ENCODER` gives for it, at
    less than half the cost; anything else goes through `_ENCODER`.
    """
    if record.get("kind") == "probe" and tuple(record) == _PROBE_KEYS:
        color = _QUOTED.get(record["color"])
        outcome = _QUOTED.get(record["outcome"])
        latency, ts, mono = record["latency_s"], record["ts"], record["mono"]
        error, status = record["error"], record["status"]
        if (
            color is not None
            and outcome is not None
            and type(latency) is float
            and type(ts) is float
            and type(mono) is float
            # Finite: inf - inf and nan - nan are nan, which JSON writes as `NaN`.
            and latency - latency == 0.0
            and ts - ts == 0.0
            and mono - mono == 0.0
            and (error is None or type(error) is str)
            and (status is None or type(status) is int)
        ):
            # `repr` of a float is what the JSON encoder writes for it.
            return (
                f'{{"color":{color},"outcome":{outcome},"latency_s":{latency!r},"error":'
                f'{"null" if error is None else _ENCODER.encode(error)},"status":'
                f'{"null" if status is None else status},"kind":"probe","ts":{ts!r},'
                f'"mono":{mono!r}}}\n'
            )
    return _ENCODER.encode(record) + "\n"


def day_of(ts: float) -> str:
    """The UTC day (`YYYY-MM-DD`) of wall time `ts`: the file a record belongs in."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def file_name(guard: str, day: str) -> str:
    """The file of `guard`'s records of UTC `day`."""
    return f"{guard}-{day}.jsonl.gz"


class Recorder:
    """Collects records in memory and writes them to the day's file in batches.

    Two sides, two threads. On the event loop: the `add*` methods (cheap, no I/O: they run
    beside probes and ticks) and `submit()`, which hands the pending records to the writer
    thread (`start_writer`); that thread alone runs `write_batch()`, the only code that
    touches the file, and sets `written`, `errors` and `last_error` (each counter has one
    writer, so no lock is needed). `write()` takes, writes and counts in the calling
    thread, without a writer thread (tests, tools).

    `dropped` counts records lost (see its doc), `errors` failed writes (the batch is
    kept and tried again, bounded by `MAX_PENDING`), `written` records appended;
    `last_error` says why the last write failed (None once one succeeds).
    """

    def __init__(
        self,
        directory: Path,
        guard: str,
        *,
        keep_s: float,
        wall: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.directory = directory
        self.guard = guard
        self.keep_s = keep_s
        self._wall = wall
        self._mono = monotonic
        self._pending: list[dict[str, Any]] = []
        # The file side, touched by `write_batch` (the writer thread) only.
        self._day: str | None = None
        self._latest = ""  # the latest day this recorder wrote
        self._latest_span = (0.0, 0.0)  # its wall-clock bounds: most records fall in it
        self._fd = -1
        self._zip: Any = None
        # The run as of the last record written (writer side): what a `context`
        # record at the head of a new day's file says. None before a `start` was written.
        self._context: dict[str, Any] | None = None
        # The writer thread and its queue: lists of records, then None to stop.
        self._writer: threading.Thread | None = None
        self._queue: queue.SimpleQueue[list[dict[str, Any]] | None] = queue.SimpleQueue()
        self._stopping = False
        # Records handed to the writer (counted on the loop) and those it has done with,
        # written or dropped (counted by the writer): the difference waits in its hands.
        self._submitted = 0
        self._finished = 0
        # Records dropped for a full queue (loop side) and after failed writes (writer side).
        self._dropped_new = 0
        self._dropped_held = 0
        self.errors = 0
        # Failure episodes the writer saw begin and end, and the first error of the latest:
        # the loop logs each once (`observations_write_failed`, `..._recovered`), however
        # short, by comparing counts. Exceptions that were bugs, not the disk, for the loop
        # to report (appended by the writer, taken by the loop).
        self.failures = 0
        self.recoveries = 0
        self.failure_error: str | None = None
        self.bugs: collections.deque[Exception] = collections.deque(maxlen=8)
        self.written = 0
        self.last_error: str | None = None

    # ---- what is recorded (event loop, no I/O) -----------------------------------------

    def add(self, kind: str, **fields: Any) -> None:
        """Queue one record of `kind` stamped now; dropped (counted) when the queue is full."""
        if len(self._pending) >= MAX_PENDING:
            self._dropped_new += 1
            return
        fields["kind"] = kind
        fields["ts"] = self._wall()
        fields["mono"] = self._mono()
        self._pending.append(fields)

    def start(self, *, active: str | None, probe_interval_s: float) -> None:
        """A daemon run begins (replay starts a new monotonic clock here)."""
        self.add(
            "start",
            guard=self.guard,
            active=active,
            probe_interval_s=probe_interval_s,
            format=FORMAT,
            # This run records an operator's pause and resume (`operator`): replay takes
            # them from here, on the monotonic clock, rather than from the journal's
            # wall-clock times (ambiguous across a wall clock stepped back).
            operator_actions=True,
        )

    def stop(self) -> None:
        """The daemon stops (a clean shutdown): replay decides nothing until the next
        `start`, and reads the time between as the daemon down, not as records lost."""
        self.add("stop")

    def probe(
        self,
        color: str,
        outcome: str,
        latency_s: float,
        error: str | None = None,
        status: int | None = None,
    ) -> None:
        """One probe round of `color`."""
        # `add` inlined, the record built as one literal (keys in `_PROBE_KEYS` order): the
        # daemon calls this for every probe round, on its event loop.
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self._dropped_new += 1
            return
        pending.append(
            {
                "color": color,
                "outcome": outcome,
                "latency_s": round(latency_s, 6),
                "error": redact_credentials(error) if error else None,
                "status": status,
                "kind": "probe",
                "ts": self._wall(),
                "mono": self._mono(),
            }
        )

    def front_door(self, ok: bool, error: str | None = None) -> None:
        """One answer through the front door."""
        self.add("front_door", ok=ok, error=redact_credentials(error) if error else None)

    def sample(self, signal: str, color: str, data: dict[str, Any]) -> None:
        """One sample of a non-file signal, in the adapter's own payload (its `error`
        text redacted again: the adapter knows its own secrets, not every credential)."""
        error = data.get("error")
        if isinstance(error, str):
            data = {**data, "error": redact_credentials(error)}
        self.add("sample", signal=signal, color=color, data=data)

    def switch(
        self,
        source: str | None,
        target: str,
        *,
        by: str,
        reason: str | None,
        event: str | None = None,
        severity: str | None = None,
    ) -> None:
        """Traffic moved from `source` to `target`; `event` is the journal's name for the
        move (`rollback_completed`, `switch`, `promote`, `external_switch`), `severity` the
        rule's (`P0`..`P2`) when a guard decided it, the fleet's leader included."""
        self.add(
            "switch",
            **{"from": source, "to": target},
            by=by,
            reason=redact_credentials(reason) if reason else None,
            event=event,
            severity=severity,
        )

    def operator(self, event: str, *, by: str | None, reason: str | None) -> None:
        """An operator's `paused` or `resumed` (the journal's event), by whom, why."""
        self.add(
            "operator",
            event=event,
            by=by,
            reason=redact_credentials(reason) if reason else None,
        )

    @property
    def pending(self) -> int:
        """Records not yet written: on the loop, and in the writer thread's hands."""
        return len(self._pending) + self._submitted - self._finished

    @property
    def dropped(self) -> int:
        """Records lost: to a full queue, held past `MAX_PENDING` after failed writes,
        in a batch a bug failed, or held by the writer when it stopped."""
        return self._dropped_new + self._dropped_held

    @property
    def oldest(self) -> float | None:
        """The monotonic time (s) of the oldest record not yet handed to the writer; None
        if none."""
        return self._pending[0]["mono"] if self._pending else None

    # ---- writing -----------------------------------------------------------------------

    def take(self) -> list[dict[str, Any]]:
        """The pending records, handed over for `write_batch` (event loop side); the
        recorder starts a new list, so `add` never touches the batch being written. The
        caller counts them (`submit`, `write`)."""
        batch, self._pending = self._pending, []
        return batch

    def write_batch(self, batch: list[dict[str, Any]]) -> tuple[int, str | None]:
        """Append `batch` to its days' files (writer side; never raises).

        Returns (records written, why the rest was not, or None). Each day's part of the
        batch is compressed whole and appended in one write ending on a sync-flush
        boundary; a write that fails is cut back off the file (a full disk leaves no half
        a batch that a retry would write again) and its member abandoned.
        """
        done = 0
        try:
            while done < len(batch):
                day = self._day_for(batch[done])
                end = done
                while end < len(batch) and self._day_for(batch[end]) == day:
                    end += 1
                lines = [_line(record) for record in batch[done:end]]
                if day != self._day:
                    self._open(day)
                    head = self._head(batch[done])
                    if head is not None:
                        lines.insert(0, _line(head))
                data = self._zip.compress("".join(lines).encode())
                self._append(data + self._zip.flush(zlib.Z_SYNC_FLUSH))
                self._follow(batch[done:end])
                done = end
        except OSError as e:
            self._abandon()
            return done, f"cannot write {self.directory}: {e.strerror or e}"
        return done, None

    def _head(self, first: dict[str, Any]) -> dict[str, Any] | None:
        """The `context` record that opens a day's file whose first record, `first`, is not
        a `start` (a run goes on past midnight, or after a write failed), stamped as it."""
        if first.get("kind") == "start" or self._context is None:
            return None
        return {**self._context, "kind": "context", "ts": first["ts"], "mono": first["mono"]}

    def _follow(self, records: list[dict[str, Any]]) -> None:
        """Keep `_context` as of the last of `records` written: a `start` sets the run, a
        `switch` the color it serves."""
        for record in records:
            kind = record.get("kind")
            if kind == "start":
                self._context = {
                    key: record.get(key)
                    for key in ("guard", "active", "probe_interval_s", "format")
                }
            elif kind == "switch" and self._context is not None:
                self._context["active"] = record.get("to")

    # ---- the writer thread (the daemon) -----------------------------------------------

    def start_writer(self) -> None:
        """Start the writer thread that `submit` hands batches to.

        One thread for the recorder's life rather than a worker thread per batch: handing
        it a batch is one put on a queue, and nothing comes back to the event loop when
        the write is done (the counters are the thread's to set). A worker thread per
        batch woke the loop again for each result and resumed a task: a guard probing at
        1 s costs about 9 % less CPU without that (`python -m bench.ab`, 2026-12-05).
        """
        if self._writer is not None:
            raise RuntimeError("the writer thread is already started")
        self._writer = threading.Thread(
            target=self._write_loop, name="guardd-recorder", daemon=True
        )
        self._writer.start()

    def submit(self) -> int:
        """Hand the pending records to the writer thread (event loop side: never blocks,
        no I/O); returns how many. Without a writer thread, nothing is handed over."""
        if self._writer is None or self._stopping or not self._pending:
            return 0
        batch = self.take()
        self._submitted += len(batch)
        self._queue.put(batch)
        return len(batch)

    async def aclose(self) -> None:
        """Submit what is pending, then stop the writer thread once it has written all it
        holds and ended the gzip member, and wait for it under the caller's cancel scope:
        a writer still busy when that ends is left to finish alone (a daemon thread: the
        process may exit under it; `closed` says whether it ended). Without a writer
        thread: `close()`."""
        writer = self._writer
        if writer is None:
            self.close()
            return
        if not self._stopping:
            self.submit()
            self._stopping = True
            self._queue.put(None)
        # Polled: this happens once, at shutdown, and the thread then never has to reach
        # back into the event loop.
        while writer.is_alive():  # noqa: ASYNC110
            await anyio.sleep(_CLOSE_POLL_S)

    @property
    def closed(self) -> bool:
        """Whether the writer thread has ended (True without one)."""
        return self._writer is None or not self._writer.is_alive()

    def _write_loop(self) -> None:
        """The writer thread: write each batch submitted, after any a failed write left
        (tried again `RETRY_S` later if nothing new comes first); `None` ends it."""
        held: list[dict[str, Any]] = []
        while True:
            try:
                item = self._queue.get(timeout=RETRY_S if held else None)
            except queue.Empty:
                item = []
            batch = held + item if item else held
            held = []
            if batch:
                try:
                    done, error = self.write_batch(batch)
                except Exception as e:  # noqa: BLE001 - a bug loses a batch, never the writer
                    # Not the disk (`write_batch` reports that): the same records would fail
                    # the same way. The member may hold what never reached the file: a new
                    # one begins. The loop reports the bug (`bugs`).
                    self._abandon()
                    self._lose(len(batch))
                    self.bugs.append(e)
                else:
                    held = self._count_write(batch, done, error)
            if item is None:
                # Records a last failed write left are lost with the writer: counted.
                self._lose(len(held))
                self.close()
                return

    def _count_write(
        self, batch: list[dict[str, Any]], done: int, error: str | None
    ) -> list[dict[str, Any]]:
        """Count what `write_batch` did with `batch` (writer side); returns the records to
        try again, the oldest dropped (and counted) past `MAX_PENDING`: in a long outage,
        the latest records (a rollback's) are the ones worth keeping."""
        self.written += done
        if error is None:
            if self.last_error is not None:
                self.recoveries += 1
            self.last_error = None
            self._finished += done
            return []
        if self.last_error is None:
            self.failures += 1
            self.failure_error = error
        self.errors += 1
        self.last_error = error
        held = batch[done:]
        lost = max(0, len(held) - MAX_PENDING)
        self._finished += done
        self._lose(lost)
        return held[lost:]

    def _lose(self, n: int) -> None:
        """`n` records handed to the writer are dropped: done with, and counted (writer side)."""
        self._dropped_held += n
        self._finished += n

    def write(self) -> int:
        """Take, write and count what is pending in the calling thread (no writer thread:
        tests, tools); raises `StorageError` (why) when a write failed, the records kept
        for the next call, ahead of those added meanwhile."""
        batch = self.take()
        self._submitted += len(batch)
        done, error = self.write_batch(batch)
        held = self._count_write(batch, done, error)
        self._submitted -= len(held)
        pending = held + self._pending
        lost = max(0, len(pending) - MAX_PENDING)
        self._dropped_held += lost
        self._pending = pending[lost:]
        if error is not None:
            raise StorageError(error)
        return done

    def close(self) -> None:
        """End the current gzip member (after the last write; writer side)."""
        self._close()

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete this guard's files of days older than `keep_s`; returns what was removed.

        A day's file goes once the whole day is older than `keep_s` (I/O: from the writer
        thread). Errors are ignored: the next prune tries again.
        """
        now = self._wall() if now is None else now
        oldest = day_of(now - self.keep_s)
        removed: list[Path] = []
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return removed
        for path in entries:
            m = _NAME.match(path.name)
            if m is None or m["guard"] != self.guard or m["day"] >= oldest:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
        return removed

    def _day_for(self, record: dict[str, Any]) -> str:
        """The day's file `record` goes in: its own day, but never one before a day this
        recorder wrote already (a wall clock stepped back over midnight would otherwise
        put the rest of the run in a file read before the part already written)."""
        ts = record["ts"]
        lo, hi = self._latest_span
        if not lo <= ts < hi:
            day = day_of(ts)
            if day > self._latest:
                start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
                self._latest, self._latest_span = day, (start, start + 86400.0)
        return self._latest

    def _open(self, day: str) -> None:
        self._close()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = self.directory / file_name(self.guard, day)
        self._fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )
        # A new gzip member per open: a member cut short by a crash ends where the next
        # begins, and readers resume there.
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._day = day
        # Opened at start and at each new day: the time to let the oldest day go.
        self.prune()

    def _append(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # Take back what part of the batch got in (ENOSPC after a partial write), so
            # the file ends on the last whole batch and the retry does not repeat lines.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise

    def _abandon(self) -> None:
        """Close the file without ending its member: the compressor's state no longer
        matches the file (a reader resumes at the next member)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self._zip = None
        self._day = None

    def _close(self) -> None:
        if self._fd >= 0 and self._zip is not None:
            with contextlib.suppress(OSError):
                self._append(self._zip.flush(zlib.Z_FINISH))
        self._abandon()


# ---- reading ------------------------------------------------------------------------


class HistoryUnreadable(Exception):
    """No history can be read at all: `path` and why (exit status 1 of `guardd replay`)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


#: Records in a row stamped back across a `--from` / `--to` bound (more than `CLOCK_STEP_S`)
#: that show a wall clock stepped back, not a damaged record or two.
BACK_RECORDS: Final = 10


def repeated_times(
    path: Path, option: str, bound: float, before: float, after: float
) -> HistoryUnreadable:
    """The wall clock was stepped back across `option`'s time `bound` (seconds): a record
    of `path` stamped `after` follows one stamped `before`, on the other side of `bound`.
    The times between occur twice in the history, and which of them the period means cannot
    be told: replaying either alone would read the other's records as lost, and its
    incidents as misses."""
    lo, hi = sorted((before, after))
    return HistoryUnreadable(
        path,
        f"the wall clock was stepped back: a record stamped {rfc3339(after)} follows one "
        f"stamped {rfc3339(before)}, so the times from {rfc3339(lo)} to {rfc3339(hi)} occur "
        f"twice, and {option} {rfc3339(bound)} falls among them: which it means cannot be "
        f"told; give {option} outside them, or leave it out",
    )


class SteppedBack:
    """Records in a row stamped back across a `--from` / `--to` bound, well before the
    latest the history had reached: up to `BACK_RECORDS`, a damaged record or two; at
    `BACK_RECORDS`, a wall clock stepped back (`repeated_times`)."""

    __slots__ = ("count", "first", "option", "path")

    def __init__(self, option: str, path: Path = Path()) -> None:
        self.option = option
        #: The file read (named in `repeated_times`).
        self.path = path
        self.count = 0
        self.first = 0.0  # (the first of them: where the repeated times begin)

    def back(self, ts: float, bound: float, latest: float) -> None:
        """One more record stamped `ts` back across `bound` from `latest` (seconds).

        Raises `HistoryUnreadable` (`repeated_times`) at the `BACK_RECORDS`-th in a row."""
        self.count += 1
        if self.count == 1:
            self.first = ts
        if self.count >= BACK_RECORDS:
            raise repeated_times(self.path, self.option, bound, latest, self.first)

    def clear(self) -> None:
        """A record on the history's side of the bound: the row is broken."""
        self.count = 0


class Record(NamedTuple):
    """One record as replay reads it.

    `at` is the history's own clock (seconds): `mono` within a run, and across runs the
    wall-clock gap (never negative), so it only moves forward. `doc` is the whole line.
    A named tuple, not a frozen dataclass: a day's history is a million of them, and a
    tuple is made in a fraction of the time.
    """

    at: float
    ts: float
    kind: str
    doc: dict[str, Any]


@dataclass
class ReadReport:
    """What reading skipped and why, for replay's summary."""

    #: The observation files read, oldest first (`unopened`: those that could not be opened).
    files: list[str] = field(default_factory=list)
    unopened: list[str] = field(default_factory=list)
    #: The history's own clock (`Record.at`) of the first record stamped past `until`: the
    #: history goes on past the period, up to that record's time (None: it does not).
    beyond_until: float | None = None
    #: Reason -> lines (or members) skipped: `invalid JSON`, `too long`, `unknown kind`, ...
    skipped: Counter[str] = field(default_factory=Counter)
    #: One line per file that could not be read to its end, naming it and why.
    problems: list[str] = field(default_factory=list)
    #: Wall-clock steps seen within a run: (wall time, step in seconds).
    clock_steps: list[tuple[float, float]] = field(default_factory=list)
    #: Files whose last gzip member ends unfinished (the newest is being written).
    unfinished: list[str] = field(default_factory=list)
    runs: int = 0
    records: int = 0


#: A monotonic step between two records of one run longer than this, with the wall clock
#: moving this much less, is no clock's doing: the record is damaged (seconds).
MONO_LEAP_S: Final = 3600.0
#: A wall clock that moved this much more (or less) than the monotonic clock between two
#: records of one run was stepped (NTP, an operator); the monotonic spacing is kept.
CLOCK_STEP_S: Final = 1.0


def history_files(
    directory: Path, guard: str | None = None, strays: list[str] | None = None
) -> list[Path]:
    """The observation files in `directory` (of `guard`, else of every guard), oldest first;
    the names of the entries that are no guard's day file go to `strays` (a copy kept as
    `lab-2026-12-01.jsonl.gz.bak`, an unzipped `.jsonl`: never read, so said).

    Raises `HistoryUnreadable` when the directory cannot be listed.
    """
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        raise HistoryUnreadable(directory, "no such directory: nothing was recorded") from None
    except OSError as e:
        raise HistoryUnreadable(directory, e.strerror or str(e)) from None
    found = []
    for path in entries:
        m = _NAME.match(path.name)
        if m is None or not _is_day(m["day"]):
            if strays is not None:
                strays.append(path.name)
        elif guard is None or m["guard"] == guard:
            found.append((m["day"], m["guard"], path))
    return [path for _, _, path in sorted(found)]


#: The entries named otherwise that the report names one by one (a directory full of them
#: is said in one line more).
_MAX_STRAYS: Final = 20


def _is_day(text: str) -> bool:
    """Whether `text` (`YYYY-MM-DD`) names a real day: the recorder names its files after
    one, so `lab-9999-99-99.jsonl.gz` is no file of the history (as any other name)."""
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def read_history(
    directory: Path,
    report: ReadReport,
    *,
    guard: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Iterator[Record]:
    """Every readable record in `directory`, in the order it was written.

    Corrupt and truncated files, bad lines and unknown kinds are skipped and counted in
    `report`; `since` / `until` (wall time, seconds) bound what is yielded, not what is
    read (a run's clock starts before `since`). Raises `HistoryUnreadable` when the
    directory cannot be listed or holds no file at all.
    """
    return itertools.chain.from_iterable(
        read_batches(directory, report, guard=guard, since=since, until=until)
    )


def read_batches(
    directory: Path,
    report: ReadReport,
    *,
    guard: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Iterator[list[Record]]:
    """`read_history`'s records, a list of them at a time (none empty): what a chunk of a
    file held. Raises `HistoryUnreadable` as `read_history` does, on the first `next`."""
    strays: list[str] = []
    files = history_files(directory, guard, strays)
    if not files:
        raise HistoryUnreadable(directory, "no observation file (*.jsonl.gz) in it")
    report.problems += [
        f"{directory / name}: not read: not named <guard>-<YYYY-MM-DD>.jsonl.gz as the "
        "daemon names its files"
        for name in sorted(strays)[:_MAX_STRAYS]
    ]
    if len(strays) > _MAX_STRAYS:
        report.problems.append(
            f"{directory}: {len(strays) - _MAX_STRAYS} more entries not read, named otherwise"
        )
    clocks = _Clocks(report, guard)
    for path in files:
        report.files.append(str(path))
        clocks.back.path = path
        clocks.day_end = _day_end(path)
        clocks.latest = -math.inf
        moved = 0
        held: list[dict[str, Any]] = []
        # The last `_HELD` records of a chunk wait for the next one: a record found ahead
        # of others of its run is put back in its place with them (`_in_stamp_order`).
        for chunk in itertools.chain(_lines(path, report), [None]):
            docs = held + chunk if chunk is not None else held
            if chunk is not None:
                moved += _in_stamp_order(docs)
                docs, held = docs[:-_HELD], docs[-_HELD:]
            if not docs:
                continue
            records = clocks.plain(docs, since, until)
            if records is None:
                records = list(clocks.each(docs, since, until))
            if records:
                report.records += len(records)
                yield records
        if moved:
            report.problems.append(
                f"{path}: {moved} record(s) found after later-stamped ones of their run (lines "
                "moved or swapped in the file): replayed in the order they were stamped"
            )
        if math.isfinite(clocks.latest) and clocks.latest < clocks.day_end - 86400.0:
            # The recorder opens a day's file for a record of that day: one without any
            # was renamed or copied under a later day (read all the same: no record in it
            # is impossible there, a wall clock stepped back puts earlier ones in it too).
            report.problems.append(
                f"{path}: holds no record of the day it is named after, only of days before "
                "(a file renamed or copied under a later day?); read all the same"
            )
    for name in report.unfinished:
        if name != str(files[-1]):
            report.problems.append(
                f"{name}: ends unfinished (the daemon stopped without closing it, or a copy "
                "was cut short): what it holds up to there is read"
            )
        elif not _ends_a_write(Path(name)):
            # The newest file of a running daemon ends unfinished too, but on a write's
            # end: the recorder ends each on a sync-flush marker.
            report.problems.append(
                f"{name}: ends within a write (being written as it was read, a write cut off, "
                "or a copy cut short): what it holds up to there is read"
            )


def _ends_a_write(path: Path) -> bool:
    """Whether the file at `path` ends as each of the recorder's writes does: on zlib's
    sync-flush marker (an empty stored block, `00 00 ff ff`); True when it cannot tell."""
    try:
        with open_regular(path) as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(_SYNC_MARK):
                return True
            f.seek(-len(_SYNC_MARK), os.SEEK_END)
            return f.read() == _SYNC_MARK
    except OSError:
        return True  # (what reading it met is said already)


_SYNC_MARK: Final = b"\x00\x00\xff\xff"
_get = dict.get
_make = tuple.__new__  # `Record(...)` without its Python-level `__new__`: the same tuple
#: The records `read_batches` holds back from a chunk for the next one (about 100 s of a
#: 200 ms history): a record moved this far in its file is put back in its place.
_HELD: Final = 1024


def _in_stamp_order(docs: list[dict[str, Any]]) -> int:
    """Put the records of `docs` back in the order their run stamped them (in place) and
    return how many were found after a later-stamped one of their run; nearly always a
    batch already is, and one pass over its `mono` stamps says so.

    A run is the records from a `start` on, on one boot's monotonic clock and one wall
    clock (their `ts - mono` within `CLOCK_STEP_S`): there `mono` orders them as they were
    stamped, so a record found later (two lines swapped, one moved by an edit) is put back
    before `_Clocks` reads it, never taken for a copy and dropped with those it moved past.
    A copy of a record (the same record again) is not counted: it stays right after its
    original, where `_Clocks` skips it as read before. Records without finite stamps and
    every `start` stay where they are.
    """
    monos: list[Any] = list(map(_get, docs, itertools.repeat("mono")))
    if set(map(type, monos)) == _FLOAT and all(map(operator.le, monos, monos[1:])):
        return 0
    moved = 0
    begun = 0  # the first record of the run being read
    last_offset = first = math.nan
    for i in range(len(docs) + 1):
        offset = math.nan  # (none: the end, or stamps that are no finite floats)
        if i < len(docs):
            ts, mono = docs[i].get("ts"), monos[i]
            if type(ts) is float and type(mono) is float:
                offset = ts - mono
        fits = math.isfinite(offset)
        if (
            not fits
            or docs[i].get("kind") == "start"
            or not abs(offset - last_offset) <= CLOCK_STEP_S
            # (Before the first one here: a copy of what was read before begins, or a
            # record moved further than this batch reaches; `_Clocks` tells which.)
            or not monos[i] >= first
        ):
            moved += _sort_run(docs, begun, i)
            begun, first = (i, monos[i]) if fits else (i + 1, math.nan)
        last_offset = offset
    return moved


def _sort_run(docs: list[dict[str, Any]], lo: int, hi: int) -> int:
    """Sort `docs[lo:hi]` (one run's records, finite stamps) by `mono`, stably; how many
    were found after a later-stamped one, copies of an earlier one of them not counted."""
    run = docs[lo:hi]
    if all(map(operator.le, (d["mono"] for d in run), (d["mono"] for d in run[1:]))):
        return 0
    moved, latest = 0, -math.inf
    seen: dict[float, list[dict[str, Any]]] = {}
    for doc in run:
        mono = doc["mono"]
        if mono < latest and doc not in seen.get(mono, ()):
            moved += 1
        latest = max(latest, mono)
        seen.setdefault(mono, []).append(doc)
    docs[lo:hi] = sorted(run, key=operator.itemgetter("mono"))
    return moved


class _Clocks:
    """The history's own clock (`Record.at`) across records, runs and files."""

    def __init__(self, report: ReadReport, guard: str | None = None) -> None:
        self.report = report
        #: Whose history this is (None: anyone's): a run whose `start` (or a day's
        #: `context`) names another guard is not theirs, and is skipped until one names it.
        self.guard = guard
        self.foreign: str | None = None
        self.at = 0.0
        self.last_ts: float | None = None
        self.last_mono: float | None = None
        #: The end of the day the file being read is named after (seconds since the epoch):
        #: the recorder never puts a record in the file of a day before its own (a wall
        #: clock stepped back keeps it in the later file), so one stamped later is not this
        #: file's (a file copied or renamed under another day: replayed twice otherwise).
        self.day_end = math.inf
        #: The latest wall time read in the file being read (seconds).
        self.latest = -math.inf
        #: The latest wall time of a record left out past `until` (seconds; None: none),
        #: and the records in a row that came back well before it since (it names the file
        #: being read).
        self.past_until: float | None = None
        self.back = SteppedBack("--to")
        #: What has been read, per boot and wall clock, the newest last (`_MAX_SPANS` of
        #: them; a clock step opens one). A boot's monotonic clock never goes back and is
        #: every run's of that boot, so a record within a span was read before: the same
        #: records twice (a file concatenated to itself, copied under another day, two
        #: overlapping copies, a line written twice).
        self.spans: list[_Span] = []
        #: The last record was one read before: every record is checked until one is not.
        self.rereading = False

    def plain(
        self, docs: list[dict[str, Any]], since: float | None, until: float | None
    ) -> list[Record] | None:
        """The records of `docs` when the batch is plain (nearly every one of a day), each
        check one loop in C rather than one a record; None when it is not, for `each`.

        Plain: every record of a known kind but `start`, with finite float stamps, in a
        run already begun, its monotonic clock never going back and its wall clock never
        stepped, and all of it within `since` / `until`. Then `at` moves by the monotonic
        steps alone, summed in the same order as `each` sums them: the same floats.
        """
        last_ts, last_mono = self.last_ts, self.last_mono
        if (
            last_ts is None
            or last_mono is None
            or not docs
            or self.foreign is not None
            or self.rereading
            or self.past_until is not None  # (`each` tells whether the period comes back)
        ):
            return None
        kinds = list(map(_get, docs, itertools.repeat("kind")))
        # (Any: their types are checked next, a whole list at a time.)
        tss: list[Any] = list(map(_get, docs, itertools.repeat("ts")))
        monos: list[Any] = list(map(_get, docs, itertools.repeat("mono")))
        if (
            set(map(type, kinds)) != _STR  # (first: a list or an object is no set member)
            or not set(kinds) <= _PLAIN_KINDS
            or set(map(type, tss)) != _FLOAT
            or set(map(type, monos)) != _FLOAT
            or not all(map(math.isfinite, tss))
            or not all(map(math.isfinite, monos))
        ):
            return None
        first, last = min(tss), max(tss)  # (finite floats now: one pass each)
        if (
            first < STAMPS[0]
            or last > STAMPS[1]
            or last >= self.day_end
            or (since is not None and first < since)
            or (until is not None and last > until)
        ):
            return None
        steps = list(map(operator.sub, monos, [last_mono, *monos[:-1]]))
        if min(steps) <= 0.0:
            # A monotonic clock that went back (a new run), or that did not move: a line
            # that may be its neighbour's copy (`each`), or a clock the test holds still.
            return None
        walls = map(operator.sub, tss, [last_ts, *tss[:-1]])
        if max(map(abs, map(operator.sub, walls, steps))) > CLOCK_STEP_S:
            return None  # a clock step, noted by `each`
        ats = list(itertools.accumulate(steps, initial=self.at))
        del ats[0]
        self.at, self.last_ts, self.last_mono = ats[-1], tss[-1], monos[-1]
        self.latest = max(self.latest, last)
        # (Each record continues the boot's span, `each` made it at this run's first; the
        # monotonic clock moved at every one of them.)
        offsets = list(map(operator.sub, tss, monos))
        span = self.spans[-1]
        span.lo, span.hi = min(span.lo, *offsets), max(span.hi, *offsets)
        span.last, span.tail = monos[-1], [docs[-1]]
        return list(map(_make, itertools.repeat(Record), zip(ats, tss, kinds, docs, strict=True)))

    def each(  # noqa: PLR0915 - one loop, its checks inline: a call apiece costs a day seconds
        self, docs: list[dict[str, Any]], since: float | None, until: float | None
    ) -> Iterator[Record]:
        """The records of `docs`, a record at a time: any batch `plain` is not."""
        kinds = RECORD_KINDS
        skipped = self.report.skipped
        for doc in docs:
            kind = doc.get("kind")
            ts, mono = doc.get("ts"), doc.get("mono")
            # Finite floats (nearly every record) as they are; anything else by `_number`.
            if type(ts) is not float or ts - ts != 0.0:
                ts = _number(ts)
            if type(mono) is not float or mono - mono != 0.0:
                mono = _number(mono)
            if type(kind) is not str or kind not in kinds:
                skipped[f"unknown kind {str(kind)[:40]!r}"] += 1
                continue
            if ts is None or mono is None:
                skipped["no ts or mono"] += 1
                continue
            if not is_stamp(ts):
                skipped["ts not a time from 1970 to 9999"] += 1
                continue
            if ts >= self.day_end:
                skipped["later than the day its file is named after"] += 1
                continue
            # (Before any skip for what the record is: a copy read before is of its day too.)
            self.latest = max(self.latest, ts)
            if kind in ("start", "context") and self.guard is not None:
                named = doc.get("guard")
                self.foreign = None if named in (None, self.guard) else str(named)[:80]
            if self.foreign is not None:
                # (A file renamed or copied under this guard's name.)
                skipped[f"records of another guard ({self.foreign})"] += 1
                continue
            last_ts, last_mono = self.last_ts, self.last_mono
            if kind == "start" or last_mono is None or last_ts is None or mono < last_mono:
                anew, step, drift = True, 0.0, 0.0
            else:
                anew, step = False, mono - last_mono
                drift = (ts - last_ts) - step
                if step > MONO_LEAP_S and drift < -MONO_LEAP_S:
                    # The monotonic clock leapt ahead and the wall clock did not follow:
                    # a wall clock stepped back keeps the monotonic step small, and records
                    # lost move both. Damage (a salvaged line of a corrupt member), which
                    # would open a gap of years and judge the colors stale across it.
                    skipped["mono far ahead of ts"] += 1
                    continue
            stepped = drift > CLOCK_STEP_S or drift < -CLOCK_STEP_S
            # (Asked only where a record does not simply follow the last one read.)
            if (anew or stepped or step == 0.0 or self.rereading) and self._read_before(
                ts, mono, doc
            ):
                skipped[_READ_BEFORE] += 1
                continue
            self._extend(ts - mono, mono, doc, anew=anew or stepped)
            if anew:
                # A new run (or a monotonic clock that went back: a reboot without a
                # start record): its clock starts where the wall clock says, never earlier.
                self.report.runs += kind == "start"
                if last_ts is not None:
                    self.at += max(0.0, ts - last_ts)
            else:
                if stepped:
                    self.report.clock_steps.append((ts, drift))
                self.at += step
            self.last_ts, self.last_mono = ts, mono
            if until is not None:
                if ts > until:
                    if self.report.beyond_until is None:
                        self.report.beyond_until = self.at
                    self.past_until = max(ts, self.past_until or ts)
                    self.back.clear()
                    continue
                if self.past_until is not None:
                    # Stamped within the period after the history had passed its end: a
                    # damaged record, or a wall clock stepped back (records on and on).
                    if self.past_until - ts > CLOCK_STEP_S:
                        self.back.back(ts, until, self.past_until)
                    skipped["stamped within --to after later records"] += 1
                    continue
            if since is not None and ts < since:
                continue
            yield _make(Record, (self.at, ts, kind, doc))

    def _read_before(self, ts: float, mono: float, doc: dict[str, Any]) -> bool:
        """Whether the record `doc` stamped `ts` / `mono` is in a span already read (sets
        `rereading` to the answer: every record after one read before is asked)."""
        offset = ts - mono
        self.rereading = any(span.holds(offset, mono, doc) for span in self.spans)
        return self.rereading

    def _extend(self, offset: float, mono: float, doc: dict[str, Any], *, anew: bool) -> None:
        """Count the record `doc` read (its `ts - mono` offset, its `mono`): it extends
        the last span, unless it is `anew` (the first of a run, or after a clock step) and
        not that span's (another boot, a clock stepped), when it opens a span."""
        spans = self.spans
        if not spans or (anew and not spans[-1].goes_on(offset, mono)):
            spans.append(_Span(offset, offset, mono, mono, [doc]))
            if len(spans) > _MAX_SPANS:
                del spans[0]
        else:
            spans[-1].add(offset, mono, doc)


@dataclass(slots=True)
class _Span:
    """What was read of one boot's monotonic clock on one wall clock (seconds): the
    offsets `ts - mono` from `lo` to `hi` (a wall clock slewed by NTP drifts), the
    monotonic times from `first` to `last`, and the records read at `last` (`tail`).

    Another boot's offset is apart by at least the earlier boot's uptime; a record of
    this boot later than `last` is new. One at `last` itself is new unless it is one of
    `tail` (the daemon's clock moves between two records it stamps, a test's may not).
    """

    lo: float
    hi: float
    first: float
    last: float
    tail: list[dict[str, Any]]

    def holds(self, offset: float, mono: float, doc: dict[str, Any]) -> bool:
        """Whether the record `doc` (`offset`, `mono`) was read in this span."""
        return self.lo - CLOCK_STEP_S <= offset <= self.hi + CLOCK_STEP_S and (
            self.first <= mono < self.last or (mono == self.last and doc in self.tail)
        )

    def goes_on(self, offset: float, mono: float) -> bool:
        """Whether a run beginning at `offset` / `mono` is of this span's boot and clock."""
        return self.lo - CLOCK_STEP_S <= offset <= self.hi + CLOCK_STEP_S and mono >= self.last

    def add(self, offset: float, mono: float, doc: dict[str, Any]) -> None:
        """The record `doc` (`offset`, `mono`, not before `last`) was read."""
        self.lo, self.hi = min(self.lo, offset), max(self.hi, offset)
        if mono != self.last:
            self.last, self.tail = mono, [doc]
        elif len(self.tail) < _MAX_TAIL:
            self.tail.append(doc)


_FLOAT: Final = {float}
_STR: Final = {str}
#: The boots (and wall clocks far apart) `_Clocks` remembers what it read of: a history's
#: few, and a hostile one's every record costs at most this many comparisons.
_MAX_SPANS: Final = 64
#: The records a span keeps of its last instant (a test's clock held still; never the
#: daemon's): more at that instant are read as new.
_MAX_TAIL: Final = 64
#: (A copy or a line moved back cannot be told apart without the records themselves.)
_READ_BEFORE: Final = (
    "record at a time already read "
    "(the same records twice: a file copied or concatenated, or lines moved out of order)"
)
#: The kinds a plain batch may hold: a `start` begins a run, and it or a `context` may
#: name another guard (`_Clocks.each`).
_PLAIN_KINDS: Final = RECORD_KINDS - {"start", "context"}


def _day_end(path: Path) -> float:
    """The end of the UTC day `path` is named after (seconds since the epoch); infinity
    for a name without one."""
    m = _NAME.match(path.name)
    if m is None:
        return math.inf
    try:
        day = datetime.strptime(m["day"], "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return math.inf  # (`2026-13-45`: no day, nothing to compare with)
    return day.timestamp() + 86400.0


def _number(value: object) -> float | None:
    """`value` as a finite number of seconds, else None (a bool is no time)."""
    if type(value) is float:  # nearly every time: the stamps the recorder writes
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _lines(path: Path, report: ReadReport) -> Iterator[list[dict[str, Any]]]:
    """The JSON objects of one file, member after member, in batches (a list each, never
    empty: one per chunk read, so that a million records pass few generators); damage is
    reported, not raised.

    A member that ends unfinished where the next one begins (a crash, or a write that
    failed, then more records) gives every whole line it holds. A corrupt member gives the
    lines before the damage, and reading resumes at the next member's header
    (`_MEMBER_HEAD`). Memory stays bounded whatever the file holds: output is taken a chunk
    at a time (a gzip bomb inflates no further than that) and a line longer than
    `MAX_LINE_BYTES` is dropped as it grows.
    """
    try:
        f = open_regular(path)  # (a FIFO or a device behind the name would never end)
    except OSError as e:
        report.problems.append(f"{path}: cannot open: {e.strerror or e}")
        report.unopened.append(str(path))
        return
    with f:
        start = 0
        while True:
            trouble = yield from _members(f, start, path, report)
            if trouble is None:
                return
            member, where, why = trouble
            try:
                resume = _next_member(f, member + 1)
            except OSError as e:
                report.problems.append(f"{path}: cannot read: {e.strerror}")
                return
            report.skipped["corrupt member"] += 1
            if resume is None:
                report.problems.append(
                    f"{path}: corrupt near byte {where}: {why}; the rest of it is skipped"
                )
                return
            report.problems.append(
                f"{path}: corrupt near byte {where}: {why}; resumed at byte {resume}"
            )
            start = resume


class _Splitter:
    """Decompressed bytes to JSON objects, a line at a time, across calls."""

    def __init__(self, report: ReadReport) -> None:
        self.report = report
        self.tail = b""
        self.overlong = False  # inside a line already dropped as too long

    def feed(self, out: bytes) -> list[dict[str, Any]]:
        """The objects of the lines `out` completes (a batch: see `_lines`)."""
        pieces = (self.tail + out).split(b"\n")
        self.tail = pieces.pop()
        if self.overlong and pieces:
            pieces.pop(0)  # the end of the dropped line
            self.overlong = False
        docs = _parse(pieces, self.report)
        if len(self.tail) > MAX_LINE_BYTES:
            if not self.overlong:
                self.report.skipped["too long"] += 1
            self.overlong, self.tail = True, b""
        return docs

    def cut(self) -> None:
        """The stream ends here: a line begun is a line cut short."""
        if self.tail.strip() and not self.overlong:
            # A crash cut the last line short (or a daemon is still writing it).
            self.report.skipped["cut-off last line"] += 1
        self.tail, self.overlong = b"", False


def _members(
    f: BinaryIO, start: int, path: Path, report: ReadReport
) -> Generator[list[dict[str, Any]], None, tuple[int, int, str] | None]:
    """Read members from byte `start` on; returns None at the end of the file, else (where
    the corrupt member began, about where the damage is, zlib's complaint)."""
    f.seek(start)
    lines = _Splitter(report)
    unzip = zlib.decompressobj(31)
    member = start  # the file offset where the current member began
    fed = False  # whether the current member has been given any byte
    produced = 0  # bytes the current member has given
    offset = start  # the file offset of `data`'s first byte
    data = b""
    while True:
        try:
            more = f.read(_READ_CHUNK)
        except OSError as e:
            report.problems.append(f"{path}: cannot read at byte {offset}: {e.strerror}")
            return None
        eof = not more
        data += more
        while data:
            # A member is fed no further than the next one's header: one left unfinished
            # (a crash, a failed write) ends there, every whole line of it read.
            size = _feedable(data, fed=fed, eof=eof)
            if size < 0:
                lines.cut()
                unzip = zlib.decompressobj(31)
                member, fed, produced = offset, False, 0
                continue
            if size == 0:
                break
            piece = data[:size]
            fed = True
            try:
                out = unzip.decompress(piece, _READ_CHUNK)
            except zlib.error as e:
                # This call's output is lost with the error: decode the member again in
                # small steps to give every line before the damage, and find where it is
                # (this call was given up to a chunk: its start may be far before it).
                noticed = yield from _salvage(f, member, produced, lines)
                return member, offset if noticed is None else noticed, str(e)
            produced += len(out)
            if unzip.eof:
                used = len(piece) - len(unzip.unused_data)
                unzip = zlib.decompressobj(31)
                fed = False
            else:
                used = len(piece) - len(unzip.unconsumed_tail)
            offset += used
            data = data[used:]
            if docs := lines.feed(out):
                yield docs
            if not fed:
                member, produced = offset, 0
            if used == 0 and not out:
                break  # nothing more to take from these bytes (zlib wants more)
        if eof:
            break
    _ended(lines, path, report, unfinished=fed)
    return None


def _ended(lines: _Splitter, path: Path, report: ReadReport, *, unfinished: bool) -> None:
    """The end of a file: a line begun is cut short, and a last member that was fed but
    never ended is noted (said of any file but the newest: `read_batches`)."""
    lines.cut()
    if unfinished:
        report.unfinished.append(str(path))


def _feedable(data: bytes, *, fed: bool, eof: bool) -> int:
    """How many of `data`'s bytes the current member may be fed: up to the next member's
    header, and short of a header's first bytes at the end of a read (it may go on in the
    next); -1 when a new member begins right here (the current one was fed already)."""
    head = data.find(_MEMBER_HEAD, 0 if fed else 1)
    if head == 0:
        return -1
    if head > 0:
        return head
    return len(data) if eof else max(0, len(data) - len(_MEMBER_HEAD) + 1)


def _salvage(
    f: BinaryIO, member: int, skip: int, lines: _Splitter
) -> Generator[list[dict[str, Any]], None, int | None]:
    """The lines of the member at `member` after its first `skip` output bytes, up to its
    damage, decoding a few bytes at a time so that little is lost with the error; returns
    the file offset of the few bytes at which zlib noticed the damage (None if it did not
    this time)."""
    unzip = zlib.decompressobj(31)
    f.seek(member)
    got = 0
    at = member  # the file offset of `data`'s first byte
    while True:
        # A few bytes a call: what the call that meets the damage would give is lost.
        data = f.read(_SALVAGE_STEP)
        if not data:
            break
        try:
            while data:
                out = unzip.decompress(data, _READ_CHUNK)
                data = unzip.unconsumed_tail
                if got + len(out) > skip and (docs := lines.feed(out[max(0, skip - got) :])):
                    yield docs
                got += len(out)
                if unzip.eof:
                    return None
        except zlib.error:
            lines.cut()
            return at
        at = f.tell()
    lines.cut()
    return None


def _next_member(f: BinaryIO, after: int) -> int | None:
    """The offset of the first member header at or after byte `after`, else None."""
    f.seek(after)
    keep = len(_MEMBER_HEAD) - 1
    carry = b""
    base = after
    while True:
        data = f.read(_READ_CHUNK)
        if not data:
            return None
        buf = carry + data
        i = buf.find(_MEMBER_HEAD)
        if i >= 0:
            return base + i
        carry = buf[-keep:]
        base += len(buf) - len(carry)


def _parse(lines: list[bytes], report: ReadReport) -> list[dict[str, Any]]:
    """The JSON objects of `lines` (whole lines, without their newline), in order; a line
    too long, not JSON or not an object is counted in `report` and left out; a blank one is
    left out silently."""
    # Whole-list checks first (C loops): nearly every batch has no blank or long line.
    if not lines:
        return []
    if max(map(len, lines)) > MAX_LINE_BYTES:
        report.skipped["too long"] += sum(len(raw) > MAX_LINE_BYTES for raw in lines)
        lines = [raw for raw in lines if len(raw) <= MAX_LINE_BYTES]
    if not all(lines):
        lines = [raw for raw in lines if raw]
        if not lines:
            return []
    batch = b"[" + b",".join(lines) + b"]"
    # Imported here, not with the module: the daemon records, and only replay reads.
    import orjson  # noqa: PLC0415

    # One parse for the whole batch is twice as fast as one a line (replay reads
    # millions), and orjson's three times as fast as the json module's. What orjson
    # takes, strict JSON, the json module reads to the same values, but for integers past
    # 64 bits (orjson makes them floats): a batch with a run of 19 digits or more is left
    # to the json module, as is what orjson refuses (NaN, lone surrogates, damage); any
    # damage, a line that is more than one value, or one of blanks only, then parses it a
    # line at a time.
    docs: Any = None
    if _LONG_DIGITS not in batch.translate(_DIGITS):
        with contextlib.suppress(ValueError):
            docs = orjson.loads(batch)
    if docs is None:
        try:
            docs = json.loads(batch)
        except (UnicodeDecodeError, ValueError, RecursionError):
            docs = None
    if isinstance(docs, list) and len(docs) == len(lines):
        if set(map(type, docs)) == {dict}:
            return docs
        kept = [doc for doc in docs if isinstance(doc, dict)]
        report.skipped["not an object"] += len(docs) - len(kept)
        return kept
    kept = []
    for raw in lines:
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            report.skipped["invalid JSON"] += 1
            continue
        if not isinstance(doc, dict):
            report.skipped["not an object"] += 1
            continue
        kept.append(doc)
    return kept
