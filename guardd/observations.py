"""What guardd observed, kept so that `guardd replay` can judge another config on it.

Layout: `<state.dir>/observations/<guard>-YYYY-MM-DD.jsonl.gz`, one file per UTC day of the
records it holds. Each is a gzip stream of JSON objects, one a line; every daemon run (and
every rotation) appends a new gzip member, and readers take the members in order, which is
what `zcat` does too. The file is append-only and written in batches from its own task,
flushed (`Z_SYNC_FLUSH`) about once a second and never fsynced per line: a crash loses at
most the last batch, and the lines before it stay readable in a file cut short.

A line is one record, its `kind` one of `RECORD_KINDS` (docs/contract.md, "Observations"):

- `start`: a daemon run began: `guard`, `active`, `probe_interval_s`, `format`.
- `probe`: one probe round of a color: `color`, `outcome`, `latency_s`, `error`, `status`.
- `front_door`: one answer through `switch.verify_url`: `ok`, `error`.
- `sample`: one sample of a non-file signal (prometheus, scrape): `signal`, `color`, and
  `data`, the adapter's own payload (its `sample` / `apply_sample` pair reads it back).
- `switch`: traffic moved: `from`, `to`, `by` (`guardd`, an operator, `external`), `reason`.

Every record has `ts` (wall clock, seconds since the epoch) and `mono` (the monotonic clock
of that run, seconds). Replay orders and spaces records by `mono` within a run, so a wall
clock stepped by NTP or by hand neither reorders nor stretches the history; `ts` places the
history in real time (`--from`, `--to`, the journal's incidents).

Nothing secret is recorded: error texts go through `guardd.secrets.redact_credentials`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from guardd.exceptions import StorageError
from guardd.secrets import redact_credentials

__all__ = [
    "FORMAT",
    "RECORD_KINDS",
    "HistoryUnreadable",
    "ReadReport",
    "Record",
    "Recorder",
    "day_of",
    "read_history",
]

#: The version of the record layout, in every `start` record.
FORMAT: Final = 1
RECORD_KINDS: Final = frozenset({"start", "probe", "front_door", "sample", "switch"})
#: A line longer than this is not one guardd wrote: skipped, not parsed (bytes).
MAX_LINE_BYTES: Final = 64 * 1024
#: Records waiting for the writer; beyond this (a disk that hangs) new ones are dropped
#: and counted, so that recording never grows without bound nor blocks a probe.
MAX_PENDING: Final = 100_000
_NAME: Final = re.compile(r"^(?P<guard>.+)-(?P<day>\d{4}-\d{2}-\d{2})\.jsonl\.gz$")
_READ_CHUNK: Final = 256 * 1024


def day_of(ts: float) -> str:
    """The UTC day (`YYYY-MM-DD`) of wall time `ts`: the file a record belongs in."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def file_name(guard: str, day: str) -> str:
    """The file of `guard`'s records of UTC `day`."""
    return f"{guard}-{day}.jsonl.gz"


class Recorder:
    """Collects records in memory and writes them to the day's file in batches.

    `add*` methods are cheap and never do I/O (they run on the decision path's side);
    `write()` encodes, compresses and appends what is pending (call it from a task of its
    own, or from a worker thread). `dropped` counts records lost to a full queue and
    `errors` failed writes (the batch is kept and tried again, up to `MAX_PENDING`).
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
        self._day: str | None = None
        self._fd = -1
        self._zip: Any = None
        self.dropped = 0
        self.errors = 0
        self.written = 0
        self.last_error: str | None = None

    # ---- what is recorded (no I/O) ---------------------------------------------------

    def add(self, kind: str, **fields: Any) -> None:
        """Queue one record of `kind` stamped now; dropped (counted) when the queue is full."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
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
        )

    def probe(
        self,
        color: str,
        outcome: str,
        latency_s: float,
        error: str | None = None,
        status: int | None = None,
    ) -> None:
        """One probe round of `color`."""
        self.add(
            "probe",
            color=color,
            outcome=outcome,
            latency_s=round(latency_s, 6),
            error=redact_credentials(error) if error else None,
            status=status,
        )

    def front_door(self, ok: bool, error: str | None = None) -> None:
        """One answer through the front door."""
        self.add("front_door", ok=ok, error=redact_credentials(error) if error else None)

    def sample(self, signal: str, color: str, data: dict[str, Any]) -> None:
        """One sample of a non-file signal, in the adapter's own payload."""
        self.add("sample", signal=signal, color=color, data=data)

    def switch(self, source: str | None, target: str, *, by: str, reason: str | None) -> None:
        """Traffic moved from `source` to `target`."""
        self.add(
            "switch",
            **{"from": source, "to": target},
            by=by,
            reason=redact_credentials(reason) if reason else None,
        )

    @property
    def pending(self) -> int:
        """Records not yet written."""
        return len(self._pending)

    # ---- writing -----------------------------------------------------------------------

    def write(self) -> int:
        """Append every pending record to its day's file; returns how many were written.

        Raises `StorageError` when the directory or file cannot be written; the records
        stay pending and the next call tries again.
        """
        batch, self._pending = self._pending, []
        done = 0
        try:
            for record in batch:
                day = day_of(record["ts"])
                if day != self._day:
                    self._open(day)
                line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
                self._append(self._zip.compress(line.encode()))
                done += 1
            if self._zip is not None:
                self._append(self._zip.flush(zlib.Z_SYNC_FLUSH))
        except OSError as e:
            self.errors += 1
            self.last_error = f"cannot write {self.directory}: {e.strerror or e}"
            # Keep what was not written, ahead of what arrived meanwhile; bounded.
            self._pending = (batch[done:] + self._pending)[-MAX_PENDING:]
            self._close()
            raise StorageError(self.last_error) from None
        self.written += done
        self.last_error = None
        return done

    def close(self) -> None:
        """Write what is pending (best effort) and end the current gzip member."""
        with contextlib.suppress(StorageError):
            self.write()
        self._close()

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete this guard's files of days older than `keep_s`; returns what was removed."""
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
        self.prune()

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                if self._zip is not None:
                    self._append(self._zip.flush(zlib.Z_FINISH))
            except OSError:
                pass
            os.close(self._fd)
        self._fd = -1
        self._zip = None
        self._day = None


# ---- reading ------------------------------------------------------------------------


class HistoryUnreadable(Exception):
    """No history can be read at all: `path` and why (exit status 1 of `guardd replay`)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True, slots=True)
class Record:
    """One record as replay reads it.

    `at` is the history's own clock (seconds): `mono` within a run, and across runs the
    wall-clock gap (never negative), so it only moves forward. `doc` is the whole line.
    """

    at: float
    ts: float
    kind: str
    doc: dict[str, Any]


@dataclass
class ReadReport:
    """What reading skipped and why, for replay's summary."""

    files: list[str] = field(default_factory=list)
    #: Reason -> lines (or members) skipped: `invalid JSON`, `too long`, `unknown kind`, ...
    skipped: Counter[str] = field(default_factory=Counter)
    #: One line per file that could not be read to its end, naming it and why.
    problems: list[str] = field(default_factory=list)
    #: Wall-clock steps seen within a run: (wall time, step in seconds).
    clock_steps: list[tuple[float, float]] = field(default_factory=list)
    runs: int = 0
    records: int = 0


#: A wall clock that moved this much more (or less) than the monotonic clock between two
#: records of one run was stepped (NTP, an operator); the monotonic spacing is kept.
CLOCK_STEP_S: Final = 1.0


def history_files(directory: Path, guard: str | None = None) -> list[Path]:
    """The observation files in `directory` (of `guard`, else of every guard), oldest first.

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
        if m is not None and (guard is None or m["guard"] == guard):
            found.append((m["day"], m["guard"], path))
    return [path for _, _, path in sorted(found)]


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
    files = history_files(directory, guard)
    if not files:
        raise HistoryUnreadable(directory, "no observation file (*.jsonl.gz) in it")
    at = 0.0
    last_ts: float | None = None
    last_mono: float | None = None
    for path in files:
        report.files.append(str(path))
        for doc in _lines(path, report):
            kind = doc.get("kind")
            ts, mono = _number(doc.get("ts")), _number(doc.get("mono"))
            if not isinstance(kind, str) or kind not in RECORD_KINDS:
                report.skipped[f"unknown kind {str(kind)[:40]!r}"] += 1
                continue
            if ts is None or mono is None:
                report.skipped["no ts or mono"] += 1
                continue
            if kind == "start" or last_mono is None or last_ts is None or mono < last_mono:
                # A new run (or a monotonic clock that went back: a reboot without a
                # start record): its clock starts where the wall clock says, never earlier.
                report.runs += kind == "start"
                if last_ts is not None:
                    at += max(0.0, ts - last_ts)
            else:
                step = mono - last_mono
                drift = (ts - last_ts) - step
                if abs(drift) > CLOCK_STEP_S:
                    report.clock_steps.append((ts, drift))
                at += step
            last_ts, last_mono = ts, mono
            if (since is not None and ts < since) or (until is not None and ts > until):
                continue
            report.records += 1
            yield Record(at, ts, kind, doc)


def _number(value: object) -> float | None:
    """`value` as a finite number of seconds, else None (a bool is no time)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _lines(path: Path, report: ReadReport) -> Iterator[dict[str, Any]]:
    """The JSON objects of one file, member after member; damage is reported, not raised.

    Memory stays bounded whatever the file holds: output is taken a chunk at a time (a
    gzip bomb inflates no further than that) and a line longer than `MAX_LINE_BYTES` is
    dropped as it grows.
    """
    try:
        f = path.open("rb")
    except OSError as e:
        report.problems.append(f"{path}: cannot open: {e.strerror or e}")
        return
    with f:
        unzip = zlib.decompressobj(31)
        tail = b""
        overlong = False  # inside a line already dropped as too long
        offset = 0
        while True:
            try:
                data = f.read(_READ_CHUNK)
            except OSError as e:
                report.problems.append(f"{path}: cannot read at byte {offset}: {e.strerror}")
                return
            if not data:
                break
            offset += len(data)
            while data:
                try:
                    out = unzip.decompress(data, _READ_CHUNK)
                except zlib.error as e:
                    report.problems.append(
                        f"{path}: corrupt near byte {offset}: {e}; the rest of it is skipped"
                    )
                    report.skipped["corrupt file"] += 1
                    return
                if unzip.eof:
                    # The next member (a later run of the same day) starts here; at the
                    # end of a member zlib leaves the rest in both attributes.
                    data = unzip.unused_data
                    unzip = zlib.decompressobj(31)
                else:
                    data = unzip.unconsumed_tail
                pieces = (tail + out).split(b"\n")
                tail = pieces.pop()
                if overlong and pieces:
                    pieces.pop(0)  # the end of the dropped line
                    overlong = False
                yield from _parse(pieces, report)
                if len(tail) > MAX_LINE_BYTES:
                    if not overlong:
                        report.skipped["too long"] += 1
                    overlong, tail = True, b""
        if tail.strip() and not overlong:
            # A crash cut the last line short (or a daemon is still writing it).
            report.skipped["cut-off last line"] += 1


def _parse(lines: list[bytes], report: ReadReport) -> Iterator[dict[str, Any]]:
    long = sum(len(raw) > MAX_LINE_BYTES for raw in lines)
    if long:
        report.skipped["too long"] += long
    lines = [raw for raw in lines if raw.strip() and len(raw) <= MAX_LINE_BYTES]
    if not lines:
        return
    try:
        # One parse for the whole batch is twice as fast as one a line (replay reads
        # millions); any damage, or a line that is more than one value, parses it a line
        # at a time instead.
        docs = json.loads(b"[" + b",".join(lines) + b"]")
    except (UnicodeDecodeError, ValueError, RecursionError):
        docs = None
    if isinstance(docs, list) and len(docs) == len(lines):
        for doc in docs:
            if isinstance(doc, dict):
                yield doc
            else:
                report.skipped["not an object"] += 1
        return
    for raw in lines:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            report.skipped["invalid JSON"] += 1
            continue
        if not isinstance(doc, dict):
            report.skipped["not an object"] += 1
            continue
        yield doc
