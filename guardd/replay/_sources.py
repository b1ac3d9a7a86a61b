"""Evidence replay reads where it lies: access logs and applications' logs (rotated and
`.gz` files included), and Prometheus' own history (`query_range`).

Each source gives batches in wall-clock order: `(wall, signal, what)` where `wall` is the
end of the `PULSE_S` slot the lines fall in (the daemon wakes its decision loop at most
this often for new lines) or a Prometheus sample's own time.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from guardd import untrusted_json
from guardd.fsutil import open_regular
from guardd.signals._tail import READ_CHUNK, Tail
from guardd.timestamps import rfc3339

#: The daemon's signal pulse (`guardd.supervisor._SIGNAL_PULSE_S`): lines are handed over
#: in slots of this many seconds, each followed by a decision tick.
PULSE_S: Final = 0.25
#: A line stamped this much past the lines before it may be stamped ahead rather than
#: written after a quiet stretch: the lines after it tell (`_placed`). nginx's `$msec` is
#: the time of the write, so its lines are in order to a few milliseconds.
AHEAD_S: Final = 2.0
#: How many lines after such a line are read to tell, at most (what waits is held).
MAX_AHEAD_LINES: Final = 1000
#: Compressed bytes handed to zlib at a time: what a damaged file's reader may lose at most
#: is what one piece decompresses to.
_GZIP_PIECE: Final = 16384
#: Lines of a log_match file looked at for a timestamp before it is judged to have none.
PROBE_LINES: Final = 50
#: The first lines two files must share to be one a copy of the other (a gzip file's first
#: piece holds that many lines, plain or not).
_HEAD_LINES: Final = 64
#: A stretch without a line between two files is a hole when longer than this many times
#: the mean spacing of the lines before it (and `hole_s`).
_HOLE_SPACINGS: Final = 20
#: The mean step between slots with lines moves by 1/this of each step (`slots`).
_STEP_WEIGHT: Final = 16
#: Holes within files told at most (`_within`).
_MAX_HOLES: Final = 256
#: The lines of a file's end compared with the next file's beginning (`without_overlap`).
OVERLAP_LINES: Final = 1000
#: Lines handed over behind their time (`SourceReport.fell_behind`): stretches closer than
#: this are one, and at most `_MAX_BEHIND` are kept (coarser beyond).
_BEHIND_MERGE_S: Final = 5.0
_MAX_BEHIND: Final = 256
#: At most this many points per `query_range` request (Prometheus refuses > 11,000).
RANGE_POINTS: Final = 10_000
_ROTATED: Final = re.compile(r"^\.(\d+)(\.gz)?$")


@dataclass
class SourceReport:
    """What one signal's replay read and skipped."""

    kind: str
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Lines (or samples) read that fell outside the history replayed.
    outside: int = 0
    #: The latest time of those before the history's first record (None: none).
    before_history: float | None = None
    #: How the signal was replayed, in words; None when it could not be (then `why`).
    replayed: str | None = None
    why: str | None = None
    #: Lines without a time of their own (log_match), placed at the line before them.
    untimed: int = 0
    #: Lines stamped ahead of the lines written after them, placed as written (`_placed`).
    ahead: int = 0
    #: Lines left out as the repeat of lines read before (`without_overlap`).
    twice: int = 0
    #: Lines stamped within the history but found after lines later than them, and so not
    #: replayed (a log concatenated out of order, the same lines twice).
    disordered: int = 0
    #: The times (seconds) of the first and last lines, to a `PULSE_S` slot; None: none.
    first_line: float | None = None
    last_line: float | None = None
    #: Stretches without a line, seconds: (the last line before, the first after, where:
    #: "between two files" or "within a file"); `without_overlap` and `slots` say which.
    holes: list[tuple[float, float, str]] = field(default_factory=list)
    #: Where one file ends and the next begins, seconds (`without_overlap`): a stretch
    #: without a line there is judged as one between two files, never again within one.
    seams: list[tuple[float, float]] = field(default_factory=list)
    #: Where holes within files stopped being told (`_MAX_HOLES`), seconds; None: never.
    untold: float | None = None
    #: The `holes` lines handed over afterwards fall in (files read out of their time
    #: order): no hole, their indices.
    filled: set[int] = field(default_factory=set)
    #: Stretches of lines handed over well after their time, or never (found after later
    #: lines): `[first, last, handed at (inf: never), lines]`, seconds, merged, bounded.
    behind: list[list[float]] = field(default_factory=list)

    def fill(self, start: float, end: float) -> None:
        """Lines stamped from `start` to `end` were found (handed over or not): a hole
        they lie well within was no stretch without a line (files read out of their time
        order)."""
        for i, (lo, hi, _) in enumerate(self.holes):
            if lo + PULSE_S < start and end < hi - PULSE_S:
                self.filled.add(i)

    def fell_behind(self, lo: float, hi: float, handed: float, n: int) -> None:
        """Lines stamped from `lo` to `hi` were handed over only at `handed` (inf: never)."""
        last = self.behind[-1] if self.behind else None
        if last is not None and lo <= last[1] + _BEHIND_MERGE_S and hi >= last[0] - _BEHIND_MERGE_S:
            last[0], last[1] = min(last[0], lo), max(last[1], hi)
            last[2], last[3] = max(last[2], handed), last[3] + n
            return
        self.behind.append([lo, hi, handed, n])
        if len(self.behind) > _MAX_BEHIND:
            # Coarser, never lost: two neighbours as one (their times may not touch).
            pairs = zip(self.behind[::2], self.behind[1::2], strict=False)
            merged = [
                [min(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2]), a[3] + b[3]] for a, b in pairs
            ]
            self.behind = merged + ([self.behind[-1]] if len(self.behind) % 2 else [])

    def covers(self, at: float, window: float = 0.0) -> str | None:
        """Why this source's lines do not hold what a rule judged at `at` over `window`
        seconds before it (None: they may)."""
        # (First: lines found after later ones are there, not rotated away.)
        for lo, hi, handed, n in self.behind:
            if lo < at and at - window < hi and handed > at + PULSE_S:
                return (
                    f"{n:.0f} of its lines stamped from {rfc3339(lo)} to {rfc3339(hi)}, within "
                    "the window it was judged on, were found after later lines (a log "
                    "concatenated out of order, lines copied): not read at their time"
                )
        if self.first_line is None or self.last_line is None:
            if self.why is not None:
                return f"it could not be replayed: {self.why}"
            return "not one line of it was replayed (no file, an empty one, or none in the history)"
        if at - window < self.first_line - PULSE_S:
            when = "after it" if at < self.first_line else "within the window it was judged on"
            # (A log read up to the history's first record goes on before it: the history,
            # not the log, begins there, as the daemon reading it live began at its end.)
            goes_on = self.before_history is not None and (
                self.before_history >= self.first_line - _GOES_ON_S
            )
            why = "rotated away?"
            if goes_on:
                why = "the lines before it are before the history's first record"
            return f"its lines begin at {rfc3339(self.first_line)}, {when} ({why})"
        if at > self.last_line + PULSE_S:
            return f"its lines end at {rfc3339(self.last_line)}, before it"
        if self.untold is not None and at > self.untold:
            return (
                f"more than {_MAX_HOLES} stretches without a line, those from "
                f"{rfc3339(self.untold)} on not told: it may lack lines of the window it was "
                "judged on"
            )
        for i, (lo, hi, where) in enumerate(self.holes):
            if i not in self.filled and lo < at and at - window < hi:
                return (
                    f"no line of it from {rfc3339(lo)} to {rfc3339(hi)}, {where}, "
                    "within the window it was judged on"
                )
        return None

    def to_json(self) -> dict[str, Any]:
        """The `sources.NAME` object of the JSON report (docs/contract.md)."""
        return {
            "kind": self.kind,
            "replayed": self.replayed,
            "why": self.why,
            "files": self.files,
            "problems": self.problems,
            "outside_history": self.outside,
            "untimed_lines": self.untimed,
            "ahead_lines": self.ahead,
            "repeated_lines": self.twice,
            "out_of_order_lines": self.disordered,
            "lines_span": (
                None
                if self.first_line is None or self.last_line is None
                else [rfc3339(self.first_line), rfc3339(self.last_line)]
            ),
            "holes": [
                [rfc3339(lo), rfc3339(hi)]
                for i, (lo, hi, _) in enumerate(self.holes)
                if i not in self.filled
            ],
        }


def rotated_files(path: Path, report: SourceReport | None = None) -> list[Path]:
    """`path` and its rotations, oldest first: `path-DATE[.gz]` by name, then `path.N[.gz]`
    from the highest N, then `path` itself (each only if it is there).

    A rotation there both plain and compressed (`path.1` and `path.1.gz`: gzip cut short
    leaves both, the same lines) is read from both, the plain file first (a cut `.gz`
    lacks its end, an emptied plain file all of it): the lines they share are read once
    (`_Seen`), what only one holds too; said in `report.problems`.
    """
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        siblings = []
    numbered: list[tuple[int, bool, Path]] = []
    dated: list[tuple[str, bool, Path]] = []
    for p in siblings:
        if not p.name.startswith(path.name) or p.name == path.name:
            continue
        rest = p.name[len(path.name) :]
        m = _ROTATED.match(rest)
        if m is not None:
            numbered.append((int(m.group(1)), m.group(2) is not None, p))
        elif rest.startswith("-") and rest[1:2].isdigit():
            dated.append((rest.removesuffix(".gz"), rest.endswith(".gz"), p))
    files = [
        *_pairs_said(sorted(dated), report),
        *_pairs_said(sorted(numbered, key=lambda n: (-n[0], n[1])), report),
    ]
    if path.exists():
        files.append(path)
    return files


def _pairs_said(rotations: list[tuple[Any, bool, Path]], report: SourceReport | None) -> list[Path]:
    """`rotations` (key, compressed, path), in order, each key's plain file before its
    compressed one; a key's second said."""
    first: dict[Any, Path] = {}
    for key, _, p in rotations:
        if key in first and report is not None:
            report.problems.append(
                f"{p}: {first[key].name} is there too, the same rotation (a compression cut "
                "short leaves both): read after it, the lines they share once"
            )
        first.setdefault(key, p)
    return [p for _, _, p in rotations]


#: Lines of a rotation are sampled (those whose hash is a multiple of the rate) to tell a
#: line found again in a later file, a copy, from a new one: first one in this many, the
#: rate doubled whenever more than `_SAMPLED` are kept (memory bounded by it).
_SAMPLE_RATE: Final = 4
_SAMPLED: Final = 1 << 15
#: Lines held between two sampled ones, at most (then judged by the one before alone).
_HELD: Final = 4096
#: How near the history's first line a line before it says the log went on (seconds).
_GOES_ON_S: Final = 60.0
#: The files whose times are kept (the newest), to judge a line between sampled ones.
_MAX_SPANS: Final = 64


#: The places kept of alike lines (requests alike in one millisecond), per line.
_ALIKE_PLACES: Final = 16


class _Seen:
    """What the files read so far hold: a sample of their lines (by hash: a line found in
    it is one read before, with its place among the sampled lines) and the times each file
    spans (`(first, last)`, seconds).

    nginx writes a line once, to one file: a later file holding lines of the sample is a
    copy of an earlier one, in part or whole (`tail -n +2 access.log.1 > access.log.2`,
    a rotation concatenated onto the next), and so is a file holding its own lines again,
    stamped before a time it had reached (a log appended to itself, a stretch sent twice).
    A copy is a run: a sampled line is one only beside another, the two in the places
    they had (one line alike may be chance: an error logged alike again after a clock
    stepped back). A line between two sampled ones is judged as both are when they agree;
    where one is a copy and the other not, by its time: a copy when an earlier file spans
    it, or the file had passed it. New lines at times an earlier file spans (a clock
    stepped back) are none of the sample, and each is read."""

    def __init__(self, time_of: Callable[[str], float | None]) -> None:
        self.time_of = time_of
        self.rate = _SAMPLE_RATE
        #: hash -> its place among the sampled lines read, in reading order; alike lines
        #: (requests alike, logged in one millisecond) -> the places of each, up to
        #: `_ALIKE_PLACES` of them.
        self.sample: dict[int, int | list[int]] = {}
        self.places = 0  # sampled lines read (the next place)
        self.begin = 0  # the first place of the file being read
        self.spans: list[tuple[float, float]] = []
        #: Per span, the lines its file ended with at its last time: a line stamped at
        #: that very time is a copy only when it is one of them (requests logged in the
        #: millisecond a file was cut at, whole only in the file read after it, are new).
        self.ends: list[frozenset[str]] = []
        self._last_timed: list[str] = []  # (the last chunk with a time of the file read)

    def read(
        self, path: Path, chunks: Iterable[list[str]], report: SourceReport
    ) -> Iterator[list[str]]:
        """`chunks`, one file's lines, but those read before (counted in `report.twice`,
        and said); the file's lines join what was read."""
        self.begin = self.places
        span = [math.inf, -math.inf]  # (the times of its lines, sampled and first and last)
        # From its first time to the latest of a line of it read as new: exact where it
        # matters, after the lines judged by their time (`_judged`).
        own = [math.inf, -math.inf]
        held: list[str] = []  # the lines since the last sampled one judged, not judged yet
        was: bool | None = None  # whether that one was a copy (None: none yet)
        last: int | None = None  # the last sampled line's place, when read before
        pending = False  # that line, read before but not beside another: in `held`
        twice = 0
        self._last_timed = []
        for chunk in chunks:
            self._spanned(span, own, chunk)
            out: list[str] = []
            for line in chunk:
                # (Not `hash`: a string's is seeded anew in each process, and which lines
                # are sampled would change from one replay of the same files to the next.)
                h = zlib.crc32(line.encode("utf-8", "surrogateescape"))
                if h % self.rate:
                    held.append(line)
                    if len(held) >= _HELD:
                        twice += self._judged(held, was, None, out, own)
                        pending = False
                    continue
                t = self.time_of(line)
                self._widen(span, t)
                place = self._before(h, t, own[1], last)
                linked = place is not None and last is not None and place == last + 1
                last = place
                if place is not None and not linked:
                    # The first of a copied run, or chance: the next sampled line tells.
                    if pending:  # (the one before was chance)
                        twice += self._judged(held, was, False, out, own)
                        was = False
                    held.append(line)
                    pending = True
                    continue
                twice += self._judged(held, was, linked, out, own) + linked
                if not linked:
                    out.append(line)
                    own[1] = max(own[1], own[1] if t is None else t)
                was, pending = linked, False
                if place is None:
                    self._add(h, self.places)
                    self.places += 1
                    if len(self.sample) > _SAMPLED:
                        self._thinned()
                        last = None
            if out:
                yield out
        out = []
        twice += self._judged(held, was, None, out, own)
        if out:
            yield out
        self._done(path, span, twice, report, self._ended(self._last_timed, span[1]))

    def _spanned(self, span: list[float], own: list[float], chunk: list[str]) -> None:
        """Widen a file's `span` by the first and last times of its `chunk` (a span of the
        sampled lines alone would leave copied lines before its first sampled one out of
        it), `own` with it; keep the chunk when it has a time, as the file's last so far."""
        first = _first_time(chunk, self.time_of)
        self._widen(span, first)
        self._widen(span, _first_time(reversed(chunk), self.time_of))
        own[0] = span[0]
        if first is not None:
            # (Not a cut last line alone, given apart at the file's end: `read_lines`.)
            self._last_timed = chunk

    def _ended(self, last: list[str], at: float) -> frozenset[str]:
        """The lines of the chunk `last` (a file's last) stamped at time `at`, its latest."""
        lines = []
        for line in reversed(last):
            t = self.time_of(line)
            if t is not None and t < at:
                break
            if t == at:
                lines.append(line)
        return frozenset(lines)

    def _done(
        self, path: Path, span: list[float], twice: int, report: SourceReport, ended: frozenset[str]
    ) -> None:
        """The file at `path` read: its times kept (with the lines `ended` it ended with at
        the last of them), the lines it held twice said."""
        if span[0] <= span[1]:
            self.spans.append((span[0], span[1]))
            self.ends.append(ended)
            del self.spans[:-_MAX_SPANS]
            del self.ends[:-_MAX_SPANS]
        if twice:
            report.twice += twice
            report.problems.append(
                f"{path}: {twice} line(s) read before (the same lines: a copy of a rotation "
                "or of its own lines, in part or whole): read once"
            )

    def _before(self, h: int, t: float | None, reached: float, last: int | None) -> int | None:
        """The place of the sampled line of hash `h` (time `t`) when it was read before: in
        an earlier file, or in this one at a time before it `reached` (alike lines at the
        time a file is at are requests alike, not a copy); else None.

        Of alike lines read in an earlier file, the one after `last` when there is one: a
        copy of alike requests (a busy nginx logs some in one millisecond) goes on the run.
        Within this file, the first only: a line logged again and again, stamped to the
        second, after a clock stepped back, is new lines, never a run of them.
        """
        got = self.sample.get(h)
        if got is None:
            return None
        first = got if isinstance(got, int) else got[0]
        if first >= self.begin and (t is None or t >= reached):
            return None
        if isinstance(got, list) and last is not None and last + 1 < self.begin and last + 1 in got:
            return last + 1
        return first

    def _add(self, h: int, place: int) -> None:
        """Keep the place of a sampled line of hash `h` read as new."""
        got = self.sample.get(h)
        if got is None:
            self.sample[h] = place
        elif isinstance(got, int):
            self.sample[h] = [got, place]
        elif len(got) < _ALIKE_PLACES:
            got.append(place)

    @staticmethod
    def _widen(span: list[float], t: float | None) -> None:
        if t is not None:
            span[0], span[1] = min(span[0], t), max(span[1], t)

    def _judged(
        self,
        held: list[str],
        was: bool | None,
        now: bool | None,
        out: list[str],
        own: list[float],
    ) -> int:
        """The lines `held` between two sampled lines (a copy: `was`, `now`; None: no
        sampled line there), the new ones added to `out`; how many were copies. `own`:
        the file's first time and the latest of its lines read as new, moved on by those
        judged here. `held` is emptied."""
        n = 0
        if was and now:
            n = len(held)
        elif not (was or now):
            out += held
        else:
            copy = bool(was)
            for line in held:
                if (t := self.time_of(line)) is not None:
                    copy = own[0] <= t < own[1] or any(
                        lo <= t < hi or (t == hi and line in end)
                        for (lo, hi), end in zip(self.spans, self.ends, strict=True)
                    )
                    if not copy:
                        own[1] = max(own[1], t)
                if copy:
                    n += 1
                else:
                    out.append(line)
        held.clear()
        return n

    def _thinned(self) -> None:
        """Sample half as many lines until no more than `_SAMPLED` are kept, the places
        of those kept renumbered in order (a run's places stay side by side)."""
        while len(self.sample) > _SAMPLED:
            self.rate *= 2
            kept = sorted(
                (place, h)
                for h, got in self.sample.items()
                if not h % self.rate
                for place in ([got] if isinstance(got, int) else got)
            )
            self.begin = sum(place < self.begin for place, _ in kept)
            self.sample = {}
            for i, (_, h) in enumerate(kept):
                self._add(h, i)
            self.places = len(kept)


def without_overlap(
    files: list[Path],
    read: Callable[[Path], Iterator[list[str]]],
    report: SourceReport,
    time_of: Callable[[str], float | None] | None = None,
    hole_s: float = math.inf,
) -> Iterator[list[str]]:
    """The lines of `files` in order (`read` gives one file's, a chunk at a time), with a
    file's first lines left out where they repeat the last lines of the file before it:
    at least two, up to `OVERLAP_LINES` (a rotation copied with lines already in the next
    file). Counted in `report.twice`, and said.

    Two or more requests in a row, alike to the byte, ending one file and beginning the
    next, are no rotation's doing: nginx writes a line once, to one file. So are lines of
    an earlier file found anywhere in a later one (`_Seen`, with `time_of`): left out too.
    """
    tail: deque[str] = deque(maxlen=OVERLAP_LINES)
    previous: Path | None = None
    seen = None if time_of is None else _Seen(time_of)
    reached: tuple[float, Path] | None = None  # the latest end of a file read, and which
    for path in _in_reading_order(files, report, time_of):
        chunks = read(path)
        head: list[str] = []
        for chunk in chunks:
            head += chunk
            if len(head) >= OVERLAP_LINES:
                break
        skip = _overlap(tail, head) if previous is not None else 0
        if skip:
            report.twice += skip
            report.problems.append(
                f"{path}: its first {skip} line(s) repeat the last of {previous}: read once"
            )
        if previous is not None and time_of is not None:
            # Where one file ends and the next begins: a stretch without a line longer than
            # the rules look back is a file cut short or missing (or no traffic at all).
            ended = _edge(reversed(tail), time_of)
            began = _edge(head[skip:], time_of)
            since = _first_time(tail, time_of)
            # (From the furthest any file read reached: a copy read after its original,
            # cut shorter, ends before the lines the original held.)
            if ended is not None and (reached is None or ended > reached[0]):
                reached = (ended, previous)
            if reached is not None and began is not None:
                report.seams.append((min(reached[0], began), max(reached[0], began)))
            # Longer than the lines before came apart, many times over: a quiet log's
            # rotation is no hole (its lines come minutes apart anyway).
            if (
                ended is not None
                and reached is not None
                and since is not None
                and began is not None
                and began - reached[0]
                > max(hole_s, _HOLE_SPACINGS * (ended - since) / max(1, len(tail) - 1))
            ):
                report.holes.append((reached[0], began, "between two files"))
                report.problems.append(
                    f"{path}: begins {began - reached[0]:.0f}s after {reached[1]} ends: no "
                    "line between (a file cut short or missing, no traffic then, or a wrong "
                    "clock)"
                )
        lines = _kept(itertools.chain([head[skip:]], chunks), tail)
        yield from lines if seen is None else seen.read(path, lines, report)
        previous = path


def _kept(chunks: Iterable[list[str]], tail: deque[str]) -> Iterator[list[str]]:
    """`chunks` but the empty ones, each kept in `tail` too (the end of the file before)."""
    for lines in chunks:
        if lines:
            tail.extend(lines)
            yield lines


def _in_reading_order(
    files: list[Path], report: SourceReport, time_of: Callable[[str], float | None] | None
) -> list[Path]:
    """`files` in the order they are read. Those that begin as a later one does (the same
    first lines, two or more, up to `_HEAD_LINES`: a rotation copied under another name)
    are read right after the newest of them (a copy made as `.3` of `.1` is older by its
    name only), where `_Seen` leaves out the lines they share and keeps what only one of
    them holds (the other cut short); said. Without `time_of` (no `_Seen`), left out.

    Then a file whose first lines' median time falls within a later-named file's times
    (from that file's first lines to the next file's, or to its own last line), and whose
    first two lines that file holds too, is read after it: a part of a rotation copied
    under an older name (`tail -n +2 access.log.1 > access.log.2`) comes after the lines
    it repeats, where `_Seen` finds them, instead of before them, making every line it
    skipped late. New lines at those times (a clock stepped back) move no file.
    """
    if len(files) <= 1:
        return files
    kept: list[tuple[Path, list[bytes]]] = []
    newest: dict[int, Path] = {}
    copies: dict[Path, list[Path]] = {}
    for path in reversed(files):
        head = _peek(path)
        key = hash(tuple(head)) if len(head) >= 2 else None
        if key is not None and key in newest and not _twins(path, newest[key]):
            if time_of is None:
                report.problems.append(
                    f"{path}: not read: it begins as {newest[key].name} does (the same first "
                    "lines: a copy under another name); its lines are read there, once"
                )
            else:
                copies.setdefault(newest[key], []).insert(0, path)
                report.problems.append(
                    f"{path}: begins as {newest[key].name} does (the same first lines: a "
                    "copy under another name): read after it, the lines they share once"
                )
            continue
        if key is not None:
            newest[key] = path
        kept.append((path, head))
    kept.reverse()
    if time_of is None:
        return [path for path, _ in kept]
    starts = [_median_time(head, time_of) for _, head in kept]
    ends: list[float | None] = []
    for i, (path, _) in enumerate(kept):
        begin, after = starts[i], starts[i + 1] if i + 1 < len(kept) else None
        if begin is not None and after is not None and after > begin:
            ends.append(after)
        else:
            ends.append(_last_time(path, time_of) if path.suffix != ".gz" else begin)
    place: list[float] = []
    for i, start in enumerate(starts):
        within = [
            j
            for j in range(i + 1, len(kept))
            if start is not None
            and (begin := starts[j]) is not None
            and (end := ends[j]) is not None
            and begin < start <= end
            # (Its first lines are there too: a copy, not a clock stepped back.)
            and _holds(kept[j][0], kept[i][1][:2])
        ]
        place.append(within[-1] + 0.5 if within else float(i))
    ordered = sorted(zip(place, kept, strict=True), key=lambda x: x[0])
    return [p for _, (path, _) in ordered for p in (path, *copies.get(path, []))]


def _twins(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one rotation, plain and compressed (`access.log.1` and
    `access.log.1.gz`): read in the order `_pairs_said` said, not as a copy of the other."""
    return a.name.removesuffix(".gz") == b.name.removesuffix(".gz")


def _holds(path: Path, lines: list[bytes]) -> bool:
    """Whether file `path` (gzip when it ends in `.gz`) holds `lines` (two or more, whole),
    one after the other: read through until they are found (damage ends it: not)."""
    if len(lines) < 2:
        return False
    wanted = b"\n" + b"\n".join(lines) + b"\n"
    try:
        with open_regular(path) as raw:
            chunks = (
                _gunzipped(raw) if path.suffix == ".gz" else iter(lambda: raw.read(READ_CHUNK), b"")
            )
            carry = b"\n"  # (the file's first line follows a line's end too)
            for chunk in chunks:
                data = carry + chunk
                if wanted in data:
                    return True
                carry = data[-len(wanted) :]
    except (OSError, EOFError, zlib.error):
        pass
    return False


def _median_time(head: list[bytes], time_of: Callable[[str], float | None]) -> float | None:
    """The median time of a file's first lines `head` (None: none has one)."""
    times = sorted(
        t for raw in head if (t := time_of(raw.decode("utf-8", "surrogateescape"))) is not None
    )
    return times[(len(times) - 1) // 2] if times else None


def _last_time(path: Path, time_of: Callable[[str], float | None]) -> float | None:
    """The time of the last line of plain file `path` that has one, from its last bytes."""
    try:
        with open_regular(path) as raw:
            raw.seek(max(0, raw.seek(0, 2) - READ_CHUNK))
            lines = raw.read(READ_CHUNK).split(b"\n")[1:]
    except OSError:
        return None
    whole = (x.decode("utf-8", "surrogateescape") for x in reversed(lines) if x.strip())
    return _first_time(whole, time_of)


def _peek(path: Path) -> list[bytes]:
    """The first whole lines of `path` (at most `_HEAD_LINES`, from its first piece),
    raw: looked at, not read (nothing counted; damage gives fewer)."""
    try:
        with open_regular(path) as raw:
            gz = path.suffix == ".gz"
            chunk = next(_gunzipped(raw), b"") if gz else raw.read(READ_CHUNK)
    except (OSError, EOFError, zlib.error):
        return []
    return chunk.split(b"\n")[:-1][:_HEAD_LINES]


def _edge(lines: Iterable[str], time_of: Callable[[str], float | None]) -> float | None:
    """The time of the first of `lines` (of the first `_HEAD_LINES`) within Tukey's far
    fences of theirs: where a file begins (or, its lines reversed, ends). One line stamped
    a year ahead, or at the epoch, is no file's edge, and makes no hole."""
    times = [t for line in itertools.islice(lines, _HEAD_LINES) if (t := time_of(line)) is not None]
    if not times:
        return None
    ranked = sorted(times)
    q1, q3 = ranked[len(ranked) // 4], ranked[3 * len(ranked) // 4]
    lo, hi = q1 - 3 * (q3 - q1) - AHEAD_S, q3 + 3 * (q3 - q1) + AHEAD_S
    return next(t for t in times if lo <= t <= hi)


def _first_time(lines: Iterable[str], time_of: Callable[[str], float | None]) -> float | None:
    """The time of the first of `lines` that has one (at most `OVERLAP_LINES` looked at)."""
    for line in itertools.islice(lines, OVERLAP_LINES):
        t = time_of(line)
        if t is not None:
            return t
    return None


def _overlap(tail: deque[str], head: list[str]) -> int:
    """How many of `head`'s first lines repeat the end of `tail` (0 below two)."""
    if len(head) < 2 or len(tail) < 2:
        return 0
    last = list(tail)
    first = head[0]
    # The longest overlap first: the earliest place in the tail where the head begins.
    for i, line in enumerate(last):
        n = len(last) - i
        if line == first and n >= 2 and n <= len(head) and last[i:] == head[:n]:
            return n
    return 0


def read_lines(
    path: Path, split: Callable[[Tail, bytes], list[str]], report: SourceReport
) -> Iterator[list[str]]:
    """The complete lines of one file (gzip when it ends in `.gz`), a chunk at a time.

    `split` is the adapter's own line splitter (bounded: an overlong line is counted by it
    and never held whole). Damage ends the file, reported; it never raises.
    """
    tail = Tail(-1, (0, 0), 0, 0.0)
    try:
        raw = open_regular(path)  # (a FIFO or a device behind the name would never end)
    except OSError as e:
        report.problems.append(f"{path}: cannot open: {e.strerror or e}")
        return
    report.files.append(str(path))
    with raw:
        if path.suffix == ".gz":
            chunks = _trusted(raw, path, report)
        else:
            chunks = iter(lambda: raw.read(READ_CHUNK), b"")
        try:
            for chunk in chunks:
                lines = split(tail, chunk)
                if lines:
                    yield lines
        except (OSError, EOFError, zlib.error) as e:
            # Every whole line before the damage was read (its last, cut line is not).
            report.problems.append(f"{path}: cannot read on ({e}); the rest of it is skipped")
            return
    if tail.pending.strip():
        yield [tail.pending.decode("utf-8", "surrogateescape")]


def _trusted(raw: Any, path: Path, report: SourceReport) -> Iterator[bytes]:
    """`_gunzipped(raw)`, but only the members that check out, when one does not.

    A gzip member whose bits were flipped decompresses to garbage (lines with times years
    away, lines that parse as other requests) and says so only at its end, where its CRC
    fails: by then the garbage would have been counted. So the file is decompressed once
    first, to find where the first member that fails begins, and its content from there
    on is not read (said in `report.problems`). A file merely cut short is read up to the
    cut, as before: what deflate gave before it is what was written.
    """
    ends: list[int] = []
    try:
        for _ in _gunzipped(raw, ends):
            pass
    except EOFError:
        pass  # cut short: read up to the cut (the read itself says so)
    except (OSError, zlib.error) as e:
        upto = ends[-1] if ends else 0
        kept = f"read only its first {upto} byte(s), whole members" if upto else "not read"
        report.problems.append(
            f"{path}: damaged ({e}): {kept} (a damaged gzip member decompresses to bytes "
            "that cannot be trusted)"
        )
        raw.seek(0)
        return _upto(_gunzipped(raw), upto)
    raw.seek(0)
    return _gunzipped(raw)


def _upto(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The first `n` bytes of `chunks`."""
    for chunk in chunks:
        if n <= 0:
            return
        yield chunk[:n]
        n -= len(chunk)


def _gunzipped(raw: Any, ends: list[int] | None = None) -> Iterator[bytes]:
    """A gzip file's bytes (every member, as logrotate or `cat a.gz b.gz` leave them), a
    bounded piece at a time, each given as soon as it is out: a file cut short or damaged
    gives every byte before the damage, then raises (EOFError, zlib.error). `gzip.GzipFile`
    loses what its last `read` had decompressed, a whole small file. `ends`, when given,
    gets the count of bytes given so far at the end of each member (its CRC checked)."""
    unzip = zlib.decompressobj(31)
    begun = False
    given = 0
    while data := raw.read(_GZIP_PIECE):
        while data:
            begun = True
            out = unzip.decompress(data, READ_CHUNK)  # (never more out than a chunk: bombs)
            if out:
                given += len(out)
                yield out
            if unzip.eof:
                if ends is not None:
                    ends.append(given)
                data = unzip.unused_data
                unzip, begun = zlib.decompressobj(31), False
                if not data.strip(b"\0"):
                    break  # zero padding after the last member, as gzip(1) allows
            else:
                data = unzip.unconsumed_tail
    while begun and not unzip.eof:
        # (zlib may still hold what the last piece decompressed to, past `READ_CHUNK`.)
        out = unzip.decompress(unzip.unconsumed_tail, READ_CHUNK)
        if not out:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        given += len(out)
        yield out
    if begun and ends is not None:
        ends.append(given)  # (the last member, ended in the loop above)


def slots(
    lines: Iterator[list[str]],
    time_of: Callable[[str], float | None],
    report: SourceReport,
    hole_s: float = math.inf,
) -> Iterator[tuple[float, list[str]]]:
    """Lines grouped in `PULSE_S` slots of their own time: `(slot end, lines)`, in order.

    A line without a time, or stamped ahead (`_placed`), goes with the line before it
    (lines before the first time, with the first slot); a line older than its slot (written
    late) stays in the current slot, unless it is more than `AHEAD_S` older: the host's
    clock was stepped back, and the lines from it on are slotted on the stepped clock (so
    is the recorded history, which the engine follows: see `Replay._step`).

    A stretch without a line within a file, longer than `hole_s` seconds and `_HOLE_SPACINGS`
    times the mean step between slots with lines before it, is a hole (`_within`).
    """
    back = AHEAD_S / PULSE_S
    slot: int | None = None
    step: float | None = None  # the mean step between slots with lines (slots; moving)
    batch: list[str] = []
    for placed in _placed(lines, time_of, report):
        for line, s in placed:
            if s is not None:
                if slot is None:
                    slot = s
                elif s > slot or s < slot - back:
                    if batch:
                        yield (slot + 1) * PULSE_S, batch
                    if s > slot:
                        # (Per slot, not per line: a day's million lines fill ~350,000.)
                        gone = s - slot
                        if step is not None and gone * PULSE_S > hole_s:
                            _within(report, slot, s, step)
                        step = gone if step is None else step + (gone - step) / _STEP_WEIGHT
                    batch, slot = [], s
            batch.append(line)
    if batch and slot is not None:
        yield (slot + 1) * PULSE_S, batch


def _within(report: SourceReport, last: int, first: int, step: float) -> None:
    """Say a hole from slot `last` (its lines' slot) to slot `first` (the next lines'),
    `step` the mean step between slots before it, unless it is no longer than
    `_HOLE_SPACINGS` steps (a quiet log's lines come minutes apart anyway) or where one file
    ends and the next begins (`without_overlap` judged it)."""
    if first - last <= _HOLE_SPACINGS * step:
        return
    lo, hi = (last + 1) * PULSE_S, first * PULSE_S
    if any(a <= hi + PULSE_S and lo - PULSE_S <= b for a, b in report.seams):
        return
    if len(report.holes) >= _MAX_HOLES:
        # (Bounded: a log crafted of bursts and pauses. Past the last told, fail closed.)
        if report.untold is None:
            report.untold = lo
            report.problems.append(
                f"more than {_MAX_HOLES} stretches without a line: those from "
                f"{rfc3339(lo)} on are not told"
            )
        return
    report.holes.append((lo, hi, "within a file"))
    report.problems.append(
        f"no line from {rfc3339(lo)} to {rfc3339(hi)} ({hi - lo:.0f}s), within a file: lines "
        "lost (a log truncated or rewritten), no traffic then, or a wrong clock"
    )


def _placed(
    lines: Iterator[list[str]], time_of: Callable[[str], float | None], report: SourceReport
) -> Iterator[list[tuple[str, int | None]]]:
    """Each line with the `PULSE_S` slot of its own time, a chunk at a time; None for a
    line without a time (counted in `report.untimed`) or one stamped ahead.

    A line stamped more than `AHEAD_S` past the lines before it waits for the lines after
    it (at most `MAX_AHEAD_LINES`). When one of them is back within `AHEAD_S` of the lines
    before, those that waited were stamped ahead (a clock that jumped for a moment): they
    are placed as written, with the lines before them, as the daemon reading them live
    places a line from its future at the time it reads it (counted in `report.ahead`).
    Otherwise the log did move on (after a quiet stretch) and they keep their own time.
    Without that, one line stamped a day ahead carried every line after it to its slot,
    outside the history.

    "The lines before" are the highest time the log reached: lines written late (a
    buffered log, several workers) fall back below it, and the lines after them, back on
    the log's clock, are not ahead. Only `MAX_AHEAD_LINES` lines in a row more than
    `AHEAD_S` below it (a clock stepped back for good) lower it. A log's first lines,
    with no line before them, are told by the lines after them (`_begun`).
    """
    lead, rest = _begun(lines, time_of, report)
    if lead:
        yield lead
    yield from _after(rest, time_of, report)


def _after(  # noqa: PLR0915 - one loop over every line, its cases inline: a call a line costs seconds
    lines: Iterator[list[str]], time_of: Callable[[str], float | None], report: SourceReport
) -> Iterator[list[tuple[str, int | None]]]:
    """`_placed` for the lines after a log's first lines stamped ahead."""
    jump = AHEAD_S / PULSE_S
    last: int | None = None  # the latest slot placed
    high: int | None = None  # the highest slot placed (since the clock last went back)
    below = 0  # lines in a row placed more than `jump` below `high`
    waiting: list[tuple[str, int | None]] = []
    for chunk in lines:
        out: list[tuple[str, int | None]] = []
        for line in chunk:
            s = _slot(time_of(line))
            if s is None:
                report.untimed += 1
                (waiting or out).append((line, None))
                continue
            if waiting:
                assert high is not None  # noqa: S101 - a line waits only after a placed one
                if s > high + jump:
                    waiting.append((line, s))
                    if len(waiting) >= MAX_AHEAD_LINES:  # moved on
                        settled, last = _settled(waiting, jump, report)
                        out += settled
                        high, below = last, 0
                        waiting = []
                    continue
                assert last is not None  # noqa: S101 - set with `high`
                if s < last - jump and below + 1 < MAX_AHEAD_LINES:
                    # Far below the lines before the jump too (a line written late, or
                    # damage: a corrupt rotation's garbled times go both ways): it tells
                    # nothing of those that wait, which go on waiting; it is placed at its
                    # own time, as without them. Only `MAX_AHEAD_LINES` of them (below `high`
                    # in a row) say the clock went back for good, as below.
                    below += 1
                    out.append((line, s))
                    continue
                if abs(s - last) > jump:
                    # Not back with the lines before the jump: far below them (written
                    # late, or a clock stepped back), or late among those that waited. No
                    # sign that those were a glimpse ahead: the log had moved on with them
                    # (each judged by the lines after it among them); this one follows.
                    settled, last = _settled(waiting, jump, report)
                    out += settled
                    high, below = last, 0
                else:
                    report.ahead += sum(slot is not None for _, slot in waiting)
                    out += [(waited, None) for waited, _ in waiting]
                waiting = []
            elif high is not None and s > high + jump:
                waiting.append((line, s))
                continue
            if last is None or s > last or s < last - jump:
                last = s  # (far below: the clock was stepped back, and goes on from there)
            if high is None or s >= high:
                high, below = s, 0
            elif s < high - jump:
                below += 1
                if below >= MAX_AHEAD_LINES:  # the clock went back for good
                    high, below = last, 0
            else:
                below = 0
            out.append((line, s))
        if out:
            yield out
    if waiting:  # the log ends there: only the lines that waited tell
        yield _settled(waiting, jump, report)[0]


def _begun(
    lines: Iterator[list[str]], time_of: Callable[[str], float | None], report: SourceReport
) -> tuple[list[tuple[str, int | None]], Iterator[list[str]]]:
    """A log's first lines stamped ahead (`_lead`), placed; and the lines after them.

    A log's first lines have no line before them to be ahead of: the lines after them
    tell. Without this, a first line stamped a day ahead was the log's clock, and every
    line after it waited behind it, never replayed."""
    begun: list[str] = []
    for chunk in lines:
        begun += chunk
        if len(begun) >= MAX_AHEAD_LINES:
            break
    first = [(line, _slot(time_of(line))) for line in begun[:MAX_AHEAD_LINES]]
    lead = _lead(first, AHEAD_S / PULSE_S, report)
    report.untimed += sum(time_of(line) is None for line in begun[:lead])
    return first[:lead], itertools.chain([begun[lead:]], lines)


def _settled(
    waiting: list[tuple[str, int | None]], jump: float, report: SourceReport
) -> tuple[list[tuple[str, int | None]], int]:
    """The lines that waited after a jump, the log having moved on (or ended): each keeps
    its slot, judged among them as `_placed` judges lines: a run more than `jump` past the
    highest slot before it, followed by a line back within `jump` of that slot, was
    stamped ahead (placed with the lines before it, counted in `report.ahead`); a line far
    below is written late and moves nothing. With the highest slot kept: the log's clock.

    Without this, one line stamped ahead among them set the log's clock to its own time,
    and every line after it looked written late."""
    lead = _lead(waiting, jump, report)
    settled = waiting[:lead]
    run: list[tuple[str, int | None]] = []
    ref: int | None = None  # the highest slot kept
    for line, slot in waiting[lead:]:
        if slot is None:
            (run or settled).append((line, None))
            continue
        if ref is None:
            ref = slot
        elif run:
            if slot > ref + jump:
                run.append((line, slot))
                continue
            if abs(slot - ref) <= jump:
                report.ahead += sum(s is not None for _, s in run)
                settled += [(waited, None) for waited, _ in run]
            else:  # far below: the log had moved on with the run
                settled += run
                ref = max(s for _, s in run if s is not None)
            run = []
        elif slot > ref + jump:
            run.append((line, slot))
            continue
        settled.append((line, slot))
        ref = max(ref, slot)
    if run:  # nothing after it tells: the log moved on with it
        settled += run
        ref = max(s for _, s in run if s is not None)
    assert ref is not None  # noqa: S101 - the first line that waited had a slot
    return settled, ref


def _slot(t: float | None) -> int | None:
    """The `PULSE_S` slot of time `t` (None: none)."""
    return None if t is None else math.floor(t / PULSE_S)


def _lead(lines: list[tuple[str, int | None]], jump: float, report: SourceReport) -> int:
    """How many of `lines`' first (with their slots) were stamped ahead of the lines after
    them, where no line before them can tell (a log's beginning, the first lines after a
    quiet stretch): a run more than `jump` slots above the (lower) median slot of `lines`,
    fewer than half of their timed lines, followed by a line back within it. Those are
    given that line's slot (written with it, as far as anything tells), in place, and
    counted in `report.ahead`."""
    timed = sorted(s for _, s in lines if s is not None)
    median = timed[(len(timed) - 1) // 2] if timed else 0
    above = 0
    for i, (_, s) in enumerate(lines):
        if s is None:
            continue
        if s <= median + jump:
            if not above or 2 * above >= len(timed):
                return 0
            report.ahead += above
            lines[:i] = [(line, s) for line, _ in lines[:i]]
            return i
        above += 1
    return 0


#: 10000-01-01T00:00:00Z: a line's time must be before it.
_LAST_TIME: Final = 253_402_300_800.0


def msec_reader(key: str) -> Callable[[str], float | None]:
    """A line's `msec` (seconds since the epoch) found without parsing the whole line."""
    # The whole value, quoted or not: the digits a corrupt line runs into other text with
    # (`"msec":"17963030549sponse_time"`) are no time, which would steer the log's clock.
    number = r"(\d+(?:\.\d+)?)"
    pattern = re.compile(r'"' + re.escape(key) + rf'"\s*:\s*(?:"{number}"|{number}(?=\s*[,}}]))')

    def time_of(line: str) -> float | None:
        m = pattern.search(line)
        if m is None:
            return None
        t = float(m.group(1) or m.group(2))
        # A time no clock says (past year 9999; 400 digits read as infinity): no time.
        return t if t < _LAST_TIME else None

    return time_of


_MONTHS: Final = {
    m: i + 1
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    )
}
# ISO 8601 at the start of a line (`2026-12-01T04:13:24.123Z`, `2026-12-01 04:13:24,123`,
# `[2026-12-01 04:13:24 +0000]`), and nginx's error log (`2026/12/01 04:13:24`).
_ISO: Final = re.compile(
    r"^\W{0,2}(\d{4})[-/](\d{2})[-/](\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
    r"\s?(Z|[+-]\d{2}:?\d{2})?"
)
# The common log format's `[01/Dec/2026:04:13:24 +0000]`, anywhere in the line.
_CLF: Final = re.compile(r"\[(\d{2})/([A-Z][a-z]{2})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-]\d{4})\]")


def line_time(line: str) -> float | None:
    """The time a log line says it was written (seconds since the epoch), or None.

    Understood: ISO 8601 at the line's start (a time without an offset is taken as the
    local time of the host replaying), nginx's error log, and the common log format.
    """
    m = _ISO.match(line)
    if m is not None:
        y, mo, d, h, mi, s, frac, zone = m.groups()
        try:
            moment = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
        except ValueError:
            return None
        seconds = float(f"0.{frac}") if frac else 0.0
        if zone is None:
            # The host's local time (the usual meaning of a time without an offset).
            return time.mktime(moment.timetuple()) + seconds
        if zone == "Z":
            return moment.timestamp() + seconds
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[-2:]) * 60)
        return moment.timestamp() - offset + seconds
    m = _CLF.search(line)
    if m is not None:
        d, mon, y, h, mi, s, zone = m.groups()
        month = _MONTHS.get(mon)
        if month is None:
            return None
        try:
            moment = datetime(int(y), month, int(d), int(h), int(mi), int(s), tzinfo=UTC)
        except ValueError:
            return None
        sign = 1 if zone[0] == "+" else -1
        return moment.timestamp() - sign * (int(zone[1:3]) * 3600 + int(zone[3:]) * 60)
    return None


def has_timestamps(path: Path, report: SourceReport) -> bool:
    """Whether the first lines of `path` (its oldest rotation) carry a time of their own."""
    seen = 0
    probe = SourceReport(report.kind)

    def split(tail: Tail, chunk: bytes) -> list[str]:
        data = tail.pending + chunk
        cut = data.rfind(b"\n")
        tail.pending = data[cut + 1 :][-65536:]
        return data[: max(cut, 0)].decode("utf-8", "surrogateescape").split("\n")

    for lines in read_lines(path, split, probe):
        for line in lines:
            if not line.strip():
                continue
            if line_time(line) is not None:
                return True
            seen += 1
            if seen >= PROBE_LINES:
                return False
    return False


def parse_range(body: bytes) -> list[tuple[float, dict[str, Any]]]:
    """The samples of one series in a `/api/v1/query_range` answer: `(wall, payload)`.

    Raises ValueError (why) when the answer is not one series of a matrix.
    """
    doc = untrusted_json.loads(body)
    if not isinstance(doc, dict) or doc.get("status") != "success":
        why = doc.get("error") if isinstance(doc, dict) else None
        raise ValueError(f"Prometheus refused the range query: {str(why)[:200]}")
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        raise ValueError("the answer is not a matrix")
    result = data.get("result")
    if not isinstance(result, list):
        raise ValueError("the matrix is not a list")  # noqa: TRY004 - an answer's reason
    if len(result) > 1:
        raise ValueError(f"{len(result)} series where one is expected")
    if not result:
        return []
    values = result[0].get("values") if isinstance(result[0], dict) else None
    if not isinstance(values, list):
        raise ValueError("a series has no values")  # noqa: TRY004 - an answer's reason
    out: list[tuple[float, dict[str, Any]]] = []
    for pair in values:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)):
            raise ValueError('a sample is not [timestamp, "value"]')
        at = float(pair[0])
        value = float(pair[1])
        if math.isfinite(value):
            out.append((at, {"outcome": "ok", "value": value}))
        else:
            out.append((at, {"outcome": "nan", "error": f"the value is {pair[1][:10]}"}))
    return out
