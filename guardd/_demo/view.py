"""What the demo shows: narration lines, and a small status table kept live at the bottom.

On a terminal the table is redrawn in place with ANSI cursor moves and narration scrolls
above it; anywhere else each refresh worth telling is one plain line, so a log or a pipe
reads as a story. Colors follow `guardd.render.use_color` (a terminal, no `NO_COLOR`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

from guardd.core.types import COLORS
from guardd.render import clean, use_color

__all__ = ["Frame", "View", "clean"]

_RESET: Final = "\x1b[0m"
_GREEN: Final = "\x1b[32m"
_YELLOW: Final = "\x1b[33m"
_RED: Final = "\x1b[1;31m"
_BOLD: Final = "\x1b[1m"
_DIM: Final = "\x1b[2m"
# A plain line is printed when the picture changed, or after this long regardless.
_PLAIN_EVERY_S: Final = 1.0


@dataclass(frozen=True)
class Frame:
    """One refresh: guardd's status (None while it does not answer) and what traffic reaches."""

    status: Mapping[str, Any] | None
    serving: str
    threshold: int
    # What the load generator got so far, when there is one: shown, but its ever-growing
    # counts are not news worth a plain line of their own.
    load: str = ""


class View:
    """Writes the demo's story to `stream`, with the live table when it is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        #: Set once the reader went away (`guardd demo | head`): the demo still cleans up.
        self.gone = False
        isatty = getattr(stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self.color = use_color(stream)
        self.started = time.monotonic()
        self._drawn: list[str] = []
        self._last_plain: tuple[str, float] | None = None

    def paint(self, text: str, code: str | None) -> str:
        """`text` in `code`'s color, when colors are on."""
        return f"{code}{text}{_RESET}" if self.color and code else text

    def good(self, text: str) -> str:
        """Green text, for things that went as they should."""
        return self.paint(text, _GREEN)

    def bad(self, text: str) -> str:
        """Red text, for failures."""
        return self.paint(text, _RED)

    def bold(self, text: str) -> str:
        """Bold text, for headings."""
        return self.paint(text, _BOLD)

    def dim(self, text: str) -> str:
        """Faint text, for details."""
        return self.paint(text, _DIM)

    def say(self, text: str = "") -> None:
        """Print narration above the live table."""
        drawn = self._drawn
        self._erase()
        self._write(text + "\n")
        if drawn:
            self._draw(drawn)
        self._flush()

    def update(self, frame: Frame) -> None:
        """Show `frame`: redraw the table on a terminal, else print a line when worth it."""
        if self.live:
            # Overwrite the old table line by line rather than erase-then-draw: no flicker.
            lines = self._table(frame)
            up = f"\x1b[{len(self._drawn)}F" if self._drawn else ""
            self._write(up + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
            self._drawn = lines
            self._flush()
            return
        key, line = self._plain(frame)
        now = time.monotonic()
        if (
            self._last_plain is None
            or key != self._last_plain[0]
            or now - self._last_plain[1] >= _PLAIN_EVERY_S
        ):
            self._last_plain = (key, now)
            elapsed = f"t+{now - self.started:4.1f}s"
            self._write(f"  {elapsed}  {line}\n")
            self._flush()

    def close(self) -> None:
        """Take the live table off the screen."""
        self._erase()
        self._flush()

    def _write(self, text: str) -> None:
        if self.gone:
            return
        try:
            self.stream.write(text)
        except OSError:
            self.gone = True

    def _flush(self) -> None:
        if self.gone:
            return
        try:
            self.stream.flush()
        except OSError:
            self.gone = True

    def _draw(self, lines: list[str]) -> None:
        self._write("".join(line + "\n" for line in lines))
        self._drawn = lines

    def _erase(self) -> None:
        if self._drawn:
            # Up to the table's first line, then clear everything below the cursor.
            self._write(f"\x1b[{len(self._drawn)}F\x1b[J")
            self._drawn = []

    def _table(self, frame: Frame) -> list[str]:
        width = max(20, shutil.get_terminal_size().columns - 1)
        status = frame.status
        if status is None:
            head = f"guardd  {self.bad('not answering')}   traffic: {frame.serving}"
            return [self.dim("  " + "-" * 58), "  " + head]
        state, active = clean(status.get("state")), status.get("active")
        head = (
            f"  guardd  {self.paint(state, _state_code(state))}   active "
            f"{self.bold(clean(active))}   traffic: {frame.serving}"
        )
        lines = [
            self.dim("  " + "-" * 58),
            head,
            self.dim(
                f"  {'color':<8}{'healthy':<9}{'fails':>7}{'errors':>9}{'p95':>10}"
                f"   (P0: {frame.threshold} fails in a row)"
            ),
        ]
        if frame.load:
            lines.append(self.dim(f"  load    {frame.load}"))
        for color in COLORS:
            up = _upstream(status, color)
            healthy, code = _healthy(up)
            name = f"{color}{'*' if color == active else ''}"
            fails = clean(up.get("consecutive_failures", "-"))
            lines.append(
                f"  {name:<8}{self.paint(f'{healthy:<9}', code)}{fails:>7}"
                f"{_ratio(up.get('error_ratio')):>9}{_ms(up.get('p95_ms')):>10}"
            )
        # A wrapped line would throw the cursor arithmetic off: cut to the terminal.
        cut = _RESET if self.color else ""
        return [line if _visible(line) <= width else line[:width] + cut for line in lines]

    def _plain(self, frame: Frame) -> tuple[str, str]:
        """The line for `frame`, and the part of it whose change is news (not the latencies)."""
        status = frame.status
        if status is None:
            text = f"guardd not answering | traffic: {frame.serving}"
            return text, text
        head = (
            f"{clean(status.get('state'))}, active {clean(status.get('active'))}, "
            f"traffic: {frame.serving}"
        )
        key, parts = [head], [head]
        for color in COLORS:
            up = _upstream(status, color)
            healthy, _ = _healthy(up)
            fails = f"{color} {healthy} fails {clean(up.get('consecutive_failures', '-'))}"
            key.append(fails)
            parts.append(f"{fails} err {_ratio(up.get('error_ratio'))} p95 {_ms(up.get('p95_ms'))}")
        if frame.load:
            parts.append(f"load {frame.load}")
        return " | ".join(key), " | ".join(parts)


def _upstream(status: Mapping[str, Any], color: str) -> Mapping[str, Any]:
    upstreams = status.get("upstreams")
    found = upstreams.get(color) if isinstance(upstreams, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def _healthy(up: Mapping[str, Any]) -> tuple[str, str | None]:
    if up.get("stale"):
        return "stale", _YELLOW
    if up.get("healthy") is True:
        return "yes", _GREEN
    if up.get("healthy") is False:
        return "NO", _RED
    return "-", None


def _state_code(state: str) -> str:
    if state == "steady":
        return _GREEN
    return _RED if state == "hold" else _YELLOW


def _ratio(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value * 100:.1f}%"
    return "-"


def _ms(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}ms"
    return "-"


def _visible(line: str) -> int:
    """The printed width of `line`, ANSI codes left out."""
    out, skipping = 0, False
    for c in line:
        if c == "\x1b":
            skipping = True
        elif skipping:
            skipping = c != "m"
        else:
            out += 1
    return out
