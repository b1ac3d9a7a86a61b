"""The `access_log` signal: nginx's own log of real requests, attributed to a color.

nginx writes one JSON object a line (`packaging/nginx/guardd-log-format.conf`), to a file
guardd tails or to a unix datagram socket guardd binds. Each line is attributed to the
color whose address answered it and counted in that color's `TrafficWindow`.

Attribution follows nginx: after retries `$upstream_addr` holds several addresses
(`a:1, b:2`, groups after an internal redirect separated by ` : `). The last one answered,
and its status is the last of `$upstream_status` (`$status` when that says `-`); its latency
is the last of `$upstream_response_time` (`$request_time` when that says `-`). An address
of neither color is counted as `unattributed`, never guessed.

Every line ends in exactly one outcome of `LINE_OUTCOMES`:

- `ok`: attributed and counted in its color's window;
- `unparsed`: not a JSON object, or a field of an impossible type or value (forged, binary);
- `unattributed`: `$upstream_addr` is `-` or an address of neither color;
- `oversize`: longer than `max_line_bytes` (skipped without being held whole);
- `shed`: over the per-second budget `max_lines_per_s`, skipped unparsed (see below).

Files are followed by polling (every `poll_interval_s`) the path's inode and the open
file's size and last bytes read: a rename + `nginx -s reopen` (logrotate's default; the
old file is read on until quiet for `DRAIN_S`), `copytruncate` (what was not read yet is
read from the copy, found beside the log and proven by those last bytes), deletion and
re-creation are all followed without counting a line twice. The first file found is read
from its end (history is not live traffic); a file seen to appear later (after the path
was missing, or replacing the one followed) from its beginning. A missing file, a
permission error or anything else the path does is a `state` in `status`, never fatal;
`problem` is set while the signal cannot read, so the daemon can raise one alert.

Parsing runs on the event loop in batches of `BATCH_LINES`, with a checkpoint between
batches, so the decision path never waits long behind a burst. Beyond `max_lines_per_s`
lines in a second, the rest of that second's lines are only counted (`shed`): guardd then
spends on this signal about as much CPU as the budget, never falls behind the log for good,
and the window's figures are a lower bound (the status says how many were shed).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import json.scanner
import math
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from guardd.clock import Clock
from guardd.core.signals import Reading
from guardd.core.traffic import CLASSES, TrafficWindow

#: The fields guardd reads, by their guardd names (also the names in guardd's log_format).
FIELDS: Final = (
    "msec",
    "status",
    "upstream_addr",
    "upstream_status",
    "request_time",
    "upstream_response_time",
)
#: What became of a line (the `outcome` label of `guardd_traffic_lines_total`).
LINE_OUTCOMES: Final = ("ok", "unparsed", "unattributed", "oversize", "shed")
#: Bytes read from a file at a time; with `max_line_bytes` it bounds what is held.
READ_CHUNK: Final = 64 * 1024
#: Lines parsed between two checkpoints (about 10 ms of work on a slow core).
BATCH_LINES: Final = 1024
#: A rotated-away file is read until it has not grown for this long (workers reopen late).
DRAIN_S: Final = 30.0
#: Room for the syslog header (`<190>Nov 30 16:23:31 host tag: `) above `max_line_bytes`.
SYSLOG_HEADER_BYTES: Final = 1024
# The bytes before the read position compared on each poll: enough for several lines, so
# that their `msec` values (not only a tail all lines share) tell a rewritten file apart.
_MARK: Final = 1024
_DEFAULT_WINDOW_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class AccessLogSpec:
    """What one `access_log` signal reads and how.

    `source`: `file:/abs/path` (tailed) or `syslog:/abs/path.sock` (a unix datagram socket
    guardd binds; nginx's `access_log syslog:server=unix:...`). `addresses`: per color, the
    `host:port` strings nginx logs in `$upstream_addr` for its servers. `fields`: guardd field
    name -> the JSON key that holds it, for logs already written in another JSON shape
    (unnamed fields keep their guardd names). `window_s`, `stale_after_s`, `poll_interval_s`:
    seconds. `max_line_bytes`: longer lines are skipped as `oversize`. `max_lines_per_s`: the
    parsing budget, beyond which lines are `shed`. `socket_group`: the group given the socket
    (mode 0660) so nginx's workers can write to it; without it the socket is mode 0666.
    Every value is checked at construction: ValueError(`key: reason`).
    """

    source: str
    addresses: Mapping[str, tuple[str, ...]]
    fields: Mapping[str, str] = field(default_factory=dict)
    window_s: float = _DEFAULT_WINDOW_S
    stale_after_s: float = 30.0
    max_line_bytes: int = 16 * 1024
    max_lines_per_s: int = 50_000
    poll_interval_s: float = 0.2
    socket_group: str | None = None

    def __post_init__(self) -> None:
        scheme, _, path = self.source.partition(":")
        if scheme not in ("file", "syslog") or not path:
            raise ValueError(
                f"source: {self.source!r} is neither file:/path nor syslog:/path/to.sock"
            )
        if not path.startswith("/"):
            raise ValueError(f"source: {path!r} is not an absolute path")
        if not self.addresses:
            raise ValueError("addresses: name at least one color's addresses")
        seen: dict[str, str] = {}
        for color, addrs in self.addresses.items():
            given: object = addrs  # a bare string would be a list of characters
            if isinstance(given, str) or not addrs:
                raise ValueError(f"addresses: {color}: a non-empty list of host:port")
            for addr in addrs:
                if not isinstance(addr, str) or not addr or ", " in addr or " : " in addr:
                    raise ValueError(f"addresses: {color}: {addr!r} is not one host:port")
                if addr in seen and seen[addr] != color:
                    raise ValueError(f"addresses: {addr} is in both {seen[addr]} and {color}")
                seen[addr] = color
        for name, key in self.fields.items():
            if name not in FIELDS:
                raise ValueError(f"fields: {name!r} is not one of {', '.join(FIELDS)}")
            if not isinstance(key, str) or not key:
                raise ValueError(f"fields: {name}: the JSON key must be a non-empty string")
        for key in ("window_s", "stale_after_s", "poll_interval_s"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{key}: must be a positive number of seconds")
        if not 256 <= self.max_line_bytes <= 1024 * 1024:
            raise ValueError("max_line_bytes: must lie within 256 ... 1048576")
        if self.max_lines_per_s < 1:
            raise ValueError("max_lines_per_s: must be at least 1")

    @property
    def kind(self) -> str:
        """`file` or `syslog`."""
        return self.source.partition(":")[0]

    @property
    def path(self) -> str:
        """The file's or the socket's path."""
        return self.source.partition(":")[2]

    def field_name(self, name: str) -> str:
        """The JSON key that holds guardd's field `name`."""
        return self.fields.get(name, name)


def _last(value: str) -> str:
    """The last entry of an nginx list variable: `a, b : c` -> `c`."""
    comma = value.rfind(", ")
    colon = value.rfind(" : ")
    if comma < 0 and colon < 0:
        return value
    return value[comma + 2 :] if comma > colon else value[colon + 3 :]


#: "100" ... "599" -> the status: one lookup for the common quoted case.
_STATUS_OF: Final = {str(code): code for code in range(100, 600)}
#: The C scanner behind json.loads, called directly: it skips loads' encoding detection and
#: the two whitespace matches around the document (about a third of loads' time per line).
_scan: Final = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def _status(value: object) -> int | None:
    """A status from a quoted `"200"` or a bare 200; None for `-`; ValueError if impossible."""
    if type(value) is str:
        if (status := _STATUS_OF.get(value)) is not None:
            return status
        if ", " in value or " : " in value:
            value = _last(value)
        if value == "-":
            return None
        if len(value) != 3 or not value.isascii() or not value.isdigit():
            raise ValueError(value)
        status = int(value)
    elif type(value) is int:
        status = value
    else:
        raise ValueError(value)
    if not 100 <= status <= 599:
        raise ValueError(value)
    return status


def _seconds(value: object) -> float | None:
    """Seconds from `"0.004"` (the last of a list) or a bare number; None for `-`."""
    if type(value) is str:
        try:
            seconds = float(value)
        except ValueError:
            # A list (`0.001, 0.004`) or `-`: rarer, so tried second.
            value = _last(value)
            if value == "-":
                return None
            seconds = float(value)
    elif type(value) is float or type(value) is int:
        seconds = float(value)
    else:
        raise ValueError(value)
    if not 0.0 <= seconds < math.inf:
        raise ValueError(value)
    return seconds


def _record(doc: object, keys: tuple[str, ...]) -> tuple[str, int, float | None, float | None]:
    """(upstream address, status, latency s, msec) of one parsed line; ValueError/KeyError."""
    if type(doc) is not dict:
        raise ValueError("not an object")
    k_msec, k_addr, k_ustatus, k_status, k_urt, k_rt = keys
    addr = doc[k_addr]
    if type(addr) is not str:
        raise ValueError("upstream_addr")
    status = _status(doc.get(k_ustatus, "-"))
    if status is None:
        status = _status(doc[k_status])
        if status is None:
            raise ValueError("no status")
    latency = _seconds(doc.get(k_urt, "-"))
    if latency is None:
        latency = _seconds(doc.get(k_rt, "-"))
    msec = doc.get(k_msec)
    return addr, status, latency, None if msec is None else _seconds(msec)


class _Tail:
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


class AccessLogSignal:
    """Tails one access log and keeps a `TrafficWindow` per color.

    `run()` follows the source until cancelled (it reports started once the source is set
    up, or is being waited for); `reading(color, now)` is what the rules read. Counters for
    metrics: `lines[outcome]` and `requests[(color, class)]`, monotonic totals.
    """

    def __init__(self, name: str, spec: AccessLogSpec, clock: Clock) -> None:
        self.name = name
        self.spec = spec
        self.clock = clock
        started = clock.monotonic()
        self.windows = {color: TrafficWindow(spec.window_s, started) for color in spec.addresses}
        self._color_of = {a: c for c, addrs in spec.addresses.items() for a in addrs}
        self.lines: dict[str, int] = dict.fromkeys(LINE_OUTCOMES, 0)
        self.requests: dict[tuple[str, str], int] = {
            (color, cls): 0 for color in spec.addresses for cls in CLASSES
        }
        #: What the source is doing, in words ("reading /var/log/nginx/guardd.log", ...).
        self.state = "not started"
        #: Why the signal cannot read right now ("permission denied", ...), else None.
        self.problem: str | None = None
        self.rotations = 0
        self.truncations = 0
        #: Rounds of the file loop so far (a round looks at the path and reads what is new).
        self.polls = 0
        #: The most log data held at once (partial line plus one read), for the tests.
        self.max_buffered = 0
        self._budget_second = -1
        self._saw_missing = False
        self._budget_left = 0
        f = spec.field_name
        self._keys = (
            f("msec"),
            f("upstream_addr"),
            f("upstream_status"),
            f("status"),
            f("upstream_response_time"),
            f("request_time"),
        )

    # ---- what the rules and the metrics read ----------------------------------------

    def reading(self, color: str, now: float) -> Reading | None:
        """The window of `color` at monotonic `now`; None for a color it does not know."""
        window = self.windows.get(color)
        return None if window is None else window.reading(now)

    def status(self) -> dict[str, Any]:
        """The source's state and counters, for `guardctl status` and the journal."""
        return {
            "kind": "access_log",
            "source": self.spec.source,
            "state": self.state,
            "problem": self.problem,
            "lines": dict(self.lines),
            "rotations": self.rotations,
            "truncations": self.truncations,
        }

    # ---- parsing ----------------------------------------------------------------------

    def ingest(self, lines: list[str]) -> None:
        """Parse and count complete lines (without their newline) received just now."""
        if not lines:
            return
        now = self.clock.monotonic()
        second = math.floor(now)
        if second != self._budget_second:
            self._budget_second = second
            self._budget_left = self.spec.max_lines_per_s
        if len(lines) > self._budget_left:
            self.lines["shed"] += len(lines) - self._budget_left
            lines = lines[: self._budget_left]
        self._budget_left -= len(lines)
        self._parse(lines, now, now - self.clock.wall())

    def _parse(self, lines: list[str], now: float, offset: float) -> None:
        # The hot loop: locals for everything it touches on each line.
        scan = _scan
        max_bytes = self.spec.max_line_bytes
        color_of = self._color_of
        windows = self.windows
        requests = self.requests
        keys = self._keys
        oldest = now - self.spec.window_s
        ok = unparsed = unattributed = oversize = 0
        for line in lines:
            # isascii() is O(1) on str: only a non-ASCII line is measured in bytes.
            if len(line) > max_bytes or (
                not line.isascii() and len(line.encode("utf-8", "surrogateescape")) > max_bytes
            ):
                oversize += 1
                continue
            try:
                doc, end = scan(line, 0)
                if end != len(line) and not line[end:].isspace():
                    doc = None  # something after the object: not one JSON document
                addr, status, latency, msec = _record(doc, keys)
            except (ValueError, KeyError, StopIteration, RecursionError):
                # StopIteration: the scanner's "no JSON value here" (an empty line, junk).
                # RecursionError: a line of 16 KiB of `[` nests deeper than the parser goes.
                unparsed += 1
                continue
            if ", " in addr or " : " in addr:
                addr = _last(addr)
            color = color_of.get(addr)
            if color is None:
                unattributed += 1
                continue
            if msec is None:
                at = now
            else:
                # The line's own wall time, moved onto the monotonic clock, kept in the window.
                at = msec + offset
                at = now if at > now else max(at, oldest)
            windows[color].add(at, status, latency)
            requests[color, CLASSES[status // 100 - 1]] += 1
            ok += 1
        counts = self.lines
        counts["ok"] += ok
        counts["unparsed"] += unparsed
        counts["unattributed"] += unattributed
        counts["oversize"] += oversize

    async def _ingest_batches(self, lines: list[str]) -> None:
        for start in range(0, len(lines), BATCH_LINES):
            self.ingest(lines[start : start + BATCH_LINES])
            await anyio.lowlevel.checkpoint()

    def _split(self, tail: _Tail, chunk: bytes) -> list[str]:
        """Complete lines of `tail` with `chunk` appended; the partial rest stays held.

        Lines are decoded with `surrogateescape`: bytes that are not UTF-8 survive as
        themselves and make their line unparsed (or its address unknown), never an error.
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
        elif len(rest) > self.spec.max_line_bytes:
            self.lines["oversize"] += 1
            tail.discarding = True
            rest = b""
        tail.pending = rest
        return lines

    # ---- the loops ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the source until cancelled; never raises for what the source does."""
        if self.spec.kind == "syslog":
            await self._run_syslog(task_status)
        else:
            await self._run_file(task_status)

    async def _run_file(self, task_status: TaskStatus[None]) -> None:
        path = self.spec.path
        poll = self.spec.poll_interval_s
        current: _Tail | None = None
        draining: list[_Tail] = []
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
                self.polls += 1
                # A flood is read on at once; a quiet log is looked at every `poll` seconds.
                await anyio.sleep(0 if busy else poll)
        finally:
            for tail in [*draining, current]:
                if tail is not None:
                    tail.close()

    def _reopen(
        self,
        path: str,
        current: _Tail | None,
        draining: list[_Tail],
        now: float,
    ) -> _Tail | None:
        """The tail to follow now: the file at `path` if it is a new one and opens."""
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            self._saw_missing = True
            if current is None:
                self.state = f"waiting for {path} (missing)"
            else:
                self.state = f"reading {path} (gone from its path; following the open file)"
            self.problem = None
            return current
        except OSError as e:
            return self._cannot(path, e, current)
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
        # only live traffic: read it whole. The first file found otherwise may hold history
        # (also one that could not be read at first): read it from its end.
        fresh = current is not None or self._saw_missing
        tail = _Tail(fd, key, 0 if fresh else fst.st_size, now)
        if tail.pos:
            # What is before the end we start from: a truncation is noticed from the start.
            with contextlib.suppress(OSError):
                size = min(_MARK, tail.pos)
                tail.mark = os.pread(fd, size, tail.pos - size)
        return tail

    def _cannot(self, path: str, error: OSError, current: _Tail | None) -> _Tail | None:
        if error.errno in (errno.EACCES, errno.EPERM):
            self.problem = "permission denied"
            self.state = f"permission denied: {path}"
        else:
            self.problem = error.strerror or type(error).__name__
            self.state = f"cannot open {path}: {self.problem}"
        return current

    async def _follow(self, tail: _Tail, now: float) -> bool:
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
            budget = 64  # chunks (4 MiB) before the other files and the loop get a turn
            while budget:
                chunk = os.pread(tail.fd, READ_CHUNK, tail.pos)
                if not chunk:
                    return False
                budget -= 1
                tail.pos += len(chunk)
                tail.mark = (tail.mark + chunk)[-_MARK:] if len(chunk) < _MARK else chunk[-_MARK:]
                tail.grew_at = now
                await self._ingest_batches(self._split(tail, chunk))
        except OSError as e:
            self.state = f"cannot read {self.spec.path}: {e.strerror}"
            self.problem = e.strerror or type(e).__name__
            return False
        return True

    async def _read_copy(self, tail: _Tail) -> None:
        """Read the rest of `tail` from the copy copytruncate made, if it can be found."""
        copy = self._find_copy(tail)
        if copy is None:
            return
        try:
            while chunk := os.pread(copy, READ_CHUNK, tail.pos):
                tail.pos += len(chunk)
                await self._ingest_batches(self._split(tail, chunk))
        except OSError:
            pass  # what could not be read is lost, as it would have been without the copy
        finally:
            os.close(copy)

    def _find_copy(self, tail: _Tail) -> int | None:
        """An open fd on the copy: a sibling named after the log (`access.log.1`,
        `access.log-20261130`) that holds, just before our position, the very bytes we
        read last. Compressed ones and any that do not match are left alone."""
        if not tail.mark:
            return None  # nothing read yet: the copy would be history
        where = Path(self.spec.path)
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

    async def _run_syslog(self, task_status: TaskStatus[None]) -> None:
        path = self.spec.path
        sock: socket.socket | None = None
        bound: int | None = None
        started = False
        try:
            while sock is None:
                try:
                    sock = self._bind(path)
                except OSError as e:
                    self.problem = e.strerror or str(e)
                    self.state = f"cannot bind {path}: {self.problem}"
                    if not started:
                        task_status.started()
                        started = True
                    await anyio.sleep(1.0)
            self.state, self.problem = f"listening on {path}", None
            bound = os.lstat(path).st_ino
            if not started:
                task_status.started()
            size = self.spec.max_line_bytes + SYSLOG_HEADER_BYTES + 1
            while True:
                await anyio.wait_readable(sock)
                lines: list[str] = []
                while len(lines) < BATCH_LINES:
                    try:
                        datagram = sock.recv(size)
                    except BlockingIOError:
                        break
                    if len(datagram) >= size:
                        self.lines["oversize"] += 1  # truncated by recv: too long
                        continue
                    line = self._strip_syslog(datagram)
                    lines.append(line.decode("utf-8", "surrogateescape"))
                self.max_buffered = max(self.max_buffered, size)
                self.ingest(lines)
                await anyio.lowlevel.checkpoint()
        finally:
            if sock is not None:
                self._unbind(path, sock, bound)

    @staticmethod
    def _strip_syslog(datagram: bytes) -> bytes:
        """The line of `<PRI>Mmm dd hh:mm:ss [host ]TAG: LINE`; junk stays junk (unparsed)."""
        if datagram[:1] == b"<":
            end = datagram.find(b": ", 0, SYSLOG_HEADER_BYTES)
            if end > 0:
                return datagram[end + 2 :].rstrip(b"\n")
        return b"\x00" + datagram  # never JSON: counted as unparsed

    def _bind(self, path: str) -> socket.socket:
        """Bind the datagram socket at `path`, replacing a stale socket (never another file)."""
        gid = -1
        if self.spec.socket_group is not None:
            try:
                gid = grp.getgrnam(self.spec.socket_group).gr_gid
            except KeyError:
                raise OSError(errno.EINVAL, f"no group {self.spec.socket_group!r}") from None
        where = Path(path)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(where.lstat().st_mode):
                raise OSError(errno.EEXIST, "exists and is not a socket")
            where.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        try:
            if gid >= 0:
                os.chown(path, -1, gid)
                where.chmod(0o660)
            else:
                # nginx's workers send as their own user (www-data, nobody): they must write.
                # So may any local user who reaches the directory: `socket_group` narrows it.
                where.chmod(0o666)
        except OSError:
            # Not left half-made: a socket nginx could not write to would fail silently.
            sock.close()
            where.unlink(missing_ok=True)
            raise
        return sock

    @staticmethod
    def _unbind(path: str, sock: socket.socket, bound: int | None) -> None:
        # Only our own socket file: another process may have bound the path since.
        with contextlib.suppress(OSError):
            if bound is not None and Path(path).lstat().st_ino == bound:
                Path(path).unlink()
        sock.close()
