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
- `shed`: over the per-second budget `max_lines_per_s`, skipped unparsed (see below);
- `late`: attributed, but its request ended before the window began (written or read that
  late: a buffered log, lines appended out of order): no evidence of now, counted here
  rather than in a window it would leave at once.

Files are followed (`guardd.signals._tail`, shared with the other file-reading signals)
by polling (every `poll_interval_s`) the path's inode and the open
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from guardd.clock import Clock
from guardd.core.signals import Reading
from guardd.core.traffic import CLASSES, MAX_REQUEST_TIME_S, TrafficWindow
from guardd.signals._tail import BATCH_LINES, DRAIN_S, READ_CHUNK, FileFollower, unheard
from guardd.signals._tail import Tail as _Tail

__all__ = [
    "BATCH_LINES",
    "DRAIN_S",
    "FIELDS",
    "LINE_OUTCOMES",
    "READ_CHUNK",
    "SYSLOG_HEADER_BYTES",
    "AccessLogSignal",
    "AccessLogSpec",
    "_Tail",  # the shared follower's open file, named here as before the follower was shared
]

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
LINE_OUTCOMES: Final = ("ok", "unparsed", "unattributed", "oversize", "shed", "late")
#: Room for the syslog header (`<190>Nov 30 16:23:31 host tag: `) above `max_line_bytes`.
SYSLOG_HEADER_BYTES: Final = 1024
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
    if latency is not None and latency > MAX_REQUEST_TIME_S:
        raise ValueError("no time a request took")
    msec = doc.get(k_msec)
    return addr, status, latency, None if msec is None else _seconds(msec)


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
        #: Called (on the event loop, no argument) after new lines were counted: the daemon
        #: wakes a tick with it (`Supervisor._signal_pulse`).
        self.on_counted: Callable[[], None] = unheard
        self.requests: dict[tuple[str, str], int] = {
            (color, cls): 0 for color in spec.addresses for cls in CLASSES
        }
        # The file's follower (`guardd.signals._tail`); it also holds the socket's state, so
        # that `state`, `problem` and the counters read the same for either kind of source.
        self._follower = FileFollower(
            spec.path,
            max_line_bytes=spec.max_line_bytes,
            poll_interval_s=spec.poll_interval_s,
            clock=clock,
            on_lines=self.ingest,
            on_oversize=self._count_oversize,
        )
        self._budget_second = -1
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

    # ---- the source's state (kept by the follower) ----------------------------------

    @property
    def state(self) -> str:
        """What the source is doing, in words ("reading /var/log/nginx/guardd.log", ...)."""
        return self._follower.state

    @state.setter
    def state(self, value: str) -> None:
        self._follower.state = value

    @property
    def problem(self) -> str | None:
        """Why the signal cannot read right now ("permission denied", ...), else None."""
        return self._follower.problem

    @problem.setter
    def problem(self, value: str | None) -> None:
        self._follower.problem = value

    @property
    def rotations(self) -> int:
        """Files replaced at the path (rename + reopen, re-creation) so far."""
        return self._follower.rotations

    @property
    def truncations(self) -> int:
        """Truncations (copytruncate) of the file followed so far."""
        return self._follower.truncations

    @property
    def polls(self) -> int:
        """Rounds of the file loop so far (a round looks at the path and reads what is new)."""
        return self._follower.polls

    @property
    def max_buffered(self) -> int:
        """The most log data held at once (partial line plus one read), for the tests."""
        return self._follower.max_buffered

    @max_buffered.setter
    def max_buffered(self, value: int) -> None:
        self._follower.max_buffered = value

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

    def restarted(self) -> None:
        """Fresh windows, as a daemon started again has (`guardd replay` at a run's
        `start`); the counters go on (they are what the replay reports it read)."""
        started = self.clock.monotonic()
        self.windows = {c: TrafficWindow(self.spec.window_s, started) for c in self.windows}

    def judge_afresh(self, color: str) -> None:
        """Forget `color`'s requests: an operator moved traffic to it (after a redeploy,
        say), and it is judged by the requests it serves from now on; its rules are
        inconclusive until `min_samples` of them (`Guard.move_traffic`)."""
        if color in self.windows:
            self.windows[color] = TrafficWindow(self.spec.window_s, self.clock.monotonic())

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
        self.on_counted()

    def _parse(self, lines: list[str], now: float, offset: float) -> None:
        # The hot loop: locals for everything it touches on each line.
        scan = _scan
        max_bytes = self.spec.max_line_bytes
        color_of = self._color_of
        windows = self.windows
        requests = self.requests
        keys = self._keys
        oldest = now - self.spec.window_s
        ok = unparsed = unattributed = oversize = late = 0
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
                if at < oldest:
                    late += 1
                    continue
                at = min(at, now)
            windows[color].add(at, status, latency)
            requests[color, CLASSES[status // 100 - 1]] += 1
            ok += 1
        counts = self.lines
        counts["ok"] += ok
        counts["unparsed"] += unparsed
        counts["unattributed"] += unattributed
        counts["oversize"] += oversize
        counts["late"] += late

    def _count_oversize(self) -> None:
        self.lines["oversize"] += 1
        self.on_counted()

    def _split(self, tail: _Tail, chunk: bytes) -> list[str]:
        """Complete lines of `tail` with `chunk` appended (`FileFollower.split`)."""
        return self._follower.split(tail, chunk)

    # ---- the loops ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the source until cancelled; never raises for what the source does."""
        if self.spec.kind == "syslog":
            await self._run_syslog(task_status)
        else:
            await self._follower.run(task_status=task_status)

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
                        self._count_oversize()  # truncated by recv: too long
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
