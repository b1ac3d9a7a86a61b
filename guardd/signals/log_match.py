"""The `log_match` signal: lines of each color's own log that match a pattern.

Each color's log file is followed as the access log is (`guardd.signals._tail`: rename +
reopen, copytruncate, deletion, a missing or unreadable file, partial and oversize lines),
and every complete line ends in exactly one outcome of `LINE_OUTCOMES`:

- `matched`: it matches at least one of `patterns` (Python `re`, searched anywhere);
- `unmatched`: it matches none;
- `oversize`: longer than `max_line_bytes` (skipped without being held whole);
- `binary`: not UTF-8 text, or holding a NUL byte (junk, a binary file at the path): never
  matched, since a pattern cannot be meant for it.

Per color, a `CountWindow` counts lines read and lines matched over the window by the time
they were read (a log line's own timestamp is in a format guardd does not know). Stats:
`count` (matched lines in the window) and `rate` (`count / window`, per second).
`samples` is every line read in the window, whatever its outcome, so that `min_samples`
can ask for some log activity before a low count is believed. `last_at` is the last time
the file was read without error: a quiet log is not stale, an unreadable or missing one
is. While a color's file cannot be read (missing, permission denied, not a regular file)
its stats are None: a count guardd cannot see is unknown, never zero. The reading's detail
holds the path and the first matched line still in the window, redacted
(`guardd.secrets.redact_credentials`), escaped and cut to `DETAIL_CHARS`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from guardd.clock import Clock
from guardd.core.counts import CountWindow
from guardd.core.signals import Reading
from guardd.secrets import redact_credentials
from guardd.signals._tail import FileFollower, unheard

#: What became of a line, in `status()["colors"][color]["lines"]`.
LINE_OUTCOMES: Final = ("matched", "unmatched", "oversize", "binary")
#: The longest matched line shown in evidence, in characters (after redaction).
DETAIL_CHARS: Final = 200
# Redaction looks at this much of a line: enough that a secret starting within the shown
# part is seen whole, without running the patterns over a 1 MiB line.
_REDACT_CHARS: Final = 4096
_DEFAULT_WINDOW_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class LogMatchSpec:
    """What one `log_match` signal reads and how.

    `paths`: per color, the absolute path of its log file. `patterns`: regular expressions
    (Python `re`), a line matches when any is found in it. `window_s`, `stale_after_s`,
    `poll_interval_s`: seconds. `max_line_bytes`: longer lines are skipped as `oversize`.
    Every value is checked at construction: ValueError(`key: reason`).
    """

    paths: Mapping[str, str]
    patterns: tuple[str, ...]
    window_s: float = _DEFAULT_WINDOW_S
    stale_after_s: float = 30.0
    max_line_bytes: int = 16 * 1024
    poll_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths: name at least one color's log file")
        for color, path in self.paths.items():
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"paths: {color}: {path!r} is not an absolute path")
        given: object = self.patterns  # a bare string would be a list of characters
        if isinstance(given, str) or not self.patterns:
            raise ValueError("patterns: give at least one regular expression, as a list")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(
                    f"patterns: {pattern!r} is not a regular expression: {e}"
                ) from None
        for key in ("window_s", "stale_after_s", "poll_interval_s"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{key}: must be a positive number of seconds")
        if not 256 <= self.max_line_bytes <= 1024 * 1024:
            raise ValueError("max_line_bytes: must lie within 256 ... 1048576")


def evidence_line(line: str) -> str:
    """`line` as evidence may show it: credentials redacted, control characters escaped
    (`\\x1b`), at most `DETAIL_CHARS` characters (`...` marks a cut)."""
    text = redact_credentials(line[:_REDACT_CHARS])
    # Escaped so that a line cannot move a terminal's cursor when `guardctl` shows it.
    text = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in text[: DETAIL_CHARS + 1]
    )
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


class LogMatchSignal:
    """Follows each color's log and keeps a `CountWindow` of its lines and matches.

    `run()` follows every file until cancelled (it reports started once each follower is);
    `reading(color, now)` is what the rules read; `color_lines[color][outcome]` are
    monotonic totals, `lines[outcome]` the same over every color.
    """

    #: A fault makes only its own color's reading inconclusive (the adapter does that), so
    #: the guard keeps reading the other color while `problem` is set.
    blind_on_problem = False

    def __init__(self, name: str, spec: LogMatchSpec, clock: Clock) -> None:
        self.name = name
        self.spec = spec
        self.clock = clock
        self.started_at = clock.monotonic()
        self._patterns = tuple(re.compile(p) for p in spec.patterns)
        self.windows = {c: CountWindow(spec.window_s, self.started_at) for c in spec.paths}
        self.color_lines: dict[str, dict[str, int]] = {
            c: dict.fromkeys(LINE_OUTCOMES, 0) for c in spec.paths
        }
        #: Called (on the event loop, no argument) after new lines were counted: the daemon
        #: wakes a tick with it (`Supervisor._signal_pulse`).
        self.on_counted: Callable[[], None] = unheard
        self.followers = {
            color: FileFollower(
                path,
                max_line_bytes=spec.max_line_bytes,
                poll_interval_s=spec.poll_interval_s,
                clock=clock,
                on_lines=functools.partial(self.ingest, color),
                on_oversize=functools.partial(self._oversize, color),
            )
            for color, path in spec.paths.items()
        }

    # ---- what the rules and the status read -----------------------------------------

    @property
    def lines(self) -> dict[str, int]:
        """Lines read so far by outcome, over every color (the runtime wakes the decision
        loop when these grow, so that a match is judged within a fraction of a second)."""
        return {o: sum(c[o] for c in self.color_lines.values()) for o in LINE_OUTCOMES}

    @property
    def problem(self) -> str | None:
        """Why a color's log cannot be read right now (`green: permission denied`), else None."""
        for color, follower in self.followers.items():
            if follower.problem is not None:
                return f"{color}: {follower.problem}"
        return None

    def _readable(self, follower: FileFollower) -> bool:
        return follower.problem is None and follower.read_at is not None

    def reading(self, color: str, now: float) -> Reading | None:
        """The window of `color` at monotonic `now`; None for a color without a log.

        Stats `count` (matched lines) and `rate` (per second), both None while the file
        cannot be read; `samples` lines read in the window; detail `path` and, with a
        match in the window, `first_match` (see `evidence_line`).
        """
        window = self.windows.get(color)
        if window is None:
            return None
        follower = self.followers[color]
        lines, matched = window.counts(now)
        stats: dict[str, float | None] = {"count": None, "rate": None}
        if self._readable(follower):
            stats = {"count": matched, "rate": matched / window.span_s}
        detail: dict[str, Any] = {"path": follower.path}
        first = window.first_hit(now)
        if first is not None:
            detail["first_match"] = first
        last_at = follower.read_at if follower.read_at is not None else self.started_at
        return Reading(lines, window.span_s, stats, last_at, detail)

    def status(self) -> dict[str, Any]:
        """`kind`, `state` (in words), `problem`, and per color (`colors`) its file's `path`,
        `state`, `problem`, `lines` by outcome, `rotations` and `truncations` (no line text)."""
        waiting = [
            f"{color}: {f.state}" for color, f in self.followers.items() if not self._readable(f)
        ]
        return {
            "kind": "log_match",
            # In a word when every log is read; else what the others are doing.
            "state": "; ".join(waiting) if waiting else "reading every log",
            "problem": self.problem,
            "colors": {
                color: {
                    "path": f.path,
                    "state": f.state,
                    "problem": f.problem,
                    "lines": dict(self.color_lines[color]),
                    "rotations": f.rotations,
                    "truncations": f.truncations,
                }
                for color, f in self.followers.items()
            },
        }

    # ---- lines --------------------------------------------------------------------------

    def restarted(self) -> None:
        """Fresh windows, as a daemon started again has (`guardd replay` at a run's
        `start`); the counters go on (they are what the replay reports it read)."""
        self.started_at = self.clock.monotonic()
        self.windows = {c: CountWindow(self.spec.window_s, self.started_at) for c in self.windows}

    def judge_afresh(self, color: str) -> None:
        """Forget `color`'s lines: an operator moved traffic to it, and it is judged by
        what it logs from now on (`Guard.move_traffic`)."""
        if color in self.windows:
            self.windows[color] = CountWindow(self.spec.window_s, self.clock.monotonic())

    def ingest(self, color: str, lines: list[str]) -> None:
        """Sort and count complete lines (without their newline) of `color` read just now."""
        if not lines:
            return
        max_bytes = self.spec.max_line_bytes
        patterns = self._patterns
        matched = unmatched = oversize = binary = 0
        first: str | None = None
        for line in lines:
            # isascii() is O(1) on str: only a non-ASCII line is encoded (and measured).
            if not line.isascii():
                try:
                    size = len(line.encode("utf-8"))
                except UnicodeEncodeError:
                    binary += 1  # bytes that were not UTF-8, kept as surrogates by the tail
                    continue
            else:
                size = len(line)
            if size > max_bytes:
                oversize += 1
            elif "\x00" in line:
                binary += 1
            elif any(p.search(line) for p in patterns):
                matched += 1
                if first is None:
                    first = evidence_line(line)
            else:
                unmatched += 1
        counts = self.color_lines[color]
        counts["matched"] += matched
        counts["unmatched"] += unmatched
        counts["oversize"] += oversize
        counts["binary"] += binary
        self.windows[color].add(self.clock.monotonic(), len(lines), matched, first)
        self.on_counted()

    def _oversize(self, color: str) -> None:
        self.color_lines[color]["oversize"] += 1
        self.windows[color].add(self.clock.monotonic(), 1)
        self.on_counted()

    # ---- the loop -----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow every color's file until cancelled; never raises for what a file does."""
        async with anyio.create_task_group() as tg:
            for follower in self.followers.values():
                await tg.start(follower.run)
            task_status.started()
