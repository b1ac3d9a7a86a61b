"""How replay reads a log's lines (`guardd.replay._sources.read_lines`) and places them in
time (`slots`: pure, no I/O)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardd.replay import _sources
from guardd.replay._sources import (
    MAX_AHEAD_LINES,
    PULSE_S,
    SourceReport,
    msec_reader,
    read_lines,
    slots,
    without_overlap,
)
from guardd.signals._tail import Tail


def _lines(*times: float | None) -> Iterator[list[str]]:
    """One chunk of lines `"<i> <time>"` (`"<i> -"`: a line without a time)."""
    yield [f"{i} {'-' if t is None else repr(t)}" for i, t in enumerate(times)]


def _time(line: str) -> float | None:
    text = line.split()[1]
    return None if text == "-" else float(text)


def _placed(*times: float | None) -> tuple[dict[int, float], SourceReport]:
    """Each line's index -> the end of the slot it was handed in."""
    report = SourceReport("access_log")
    at = {
        int(line.split()[0]): end
        for end, batch in slots(_lines(*times), _time, report)
        for line in batch
    }
    assert sorted(at) == list(range(len(times)))  # every line, once
    return at, report


def test_lines_in_order_each_go_in_the_slot_of_their_own_time() -> None:
    at, report = _placed(10.0, 10.1, 10.3, None, 11.0, 10.9)
    assert at == {0: 10.25, 1: 10.25, 2: 10.5, 3: 10.5, 4: 11.25, 5: 11.25}
    assert (report.untimed, report.ahead) == (1, 0)


def test_lines_stamped_ahead_are_handed_when_written_and_every_line_after_them_too() -> None:
    """One line a day ahead, then a run of three an hour ahead (with a line without a time
    among them): each is placed with the lines written before it, and the lines after
    them at their own time, never carried to the future slot."""
    day, hour = 86_400.0, 3_600.0
    at, report = _placed(10.0, 10.1, 10.1 + day, 10.2, 10.6, 10.7 + hour, None, 10.7 + hour,
                         10.8 + hour, 10.9, 11.3)  # fmt: skip
    assert at == {0: 10.25, 1: 10.25, 2: 10.25, 3: 10.25, 4: 10.75, 5: 10.75, 6: 10.75,
                  7: 10.75, 8: 10.75, 9: 11.0, 10: 11.5}  # fmt: skip
    assert report.ahead == 4 and report.untimed == 1


def test_a_log_that_moves_on_after_a_quiet_stretch_keeps_its_times() -> None:
    """Minutes without a request, then traffic again: the lines after the quiet stretch
    are not ahead of anything that follows, and keep their own time, as does a log that
    ends there."""
    at, report = _placed(10.0, 300.0, 300.1, 300.2, 600.0)
    assert at == {0: 10.25, 1: 300.25, 2: 300.25, 3: 300.25, 4: 600.25}
    assert report.ahead == 0


def test_what_waits_to_be_told_is_bounded() -> None:
    """Past `MAX_AHEAD_LINES` lines after a jump the log has moved on: they keep their own
    time (what is held is bounded), and a line back in the old time after them is on a
    clock stepped back (see the next test)."""
    ahead = [1000.0 + i * 0.01 for i in range(MAX_AHEAD_LINES)]
    at, report = _placed(10.0, *ahead, 10.1)
    assert at[1] == 1000.0 + PULSE_S and at[MAX_AHEAD_LINES] == 1010.0
    assert at[MAX_AHEAD_LINES + 1] == 10.25
    assert report.ahead == 0


def test_a_line_a_little_late_stays_in_its_slot_and_a_clock_stepped_back_goes_on_from_there() -> (
    None
):
    """nginx's lines are in the order written, to a few milliseconds: one up to `AHEAD_S`
    older than its slot was written late and stays in that slot; one further back is on a
    host clock stepped back (so are the records), and the lines after it go on from its
    time, each in its own slot, and may be stamped ahead of it again."""
    at, report = _placed(100.0, 101.0, 99.5, 101.1, 60.0, 60.1, 60.3, 60.3 + 86_400, 60.4)
    assert at == {0: 100.25, 1: 101.25, 2: 101.25, 3: 101.25, 4: 60.25, 5: 60.25, 6: 60.5,
                  7: 60.5, 8: 60.5}  # fmt: skip
    assert report.ahead == 1


def test_lines_written_late_leave_the_lines_after_them_on_the_logs_own_clock() -> None:
    """Two lines written 30 s late among the others: each goes in a slot of its own time
    (the engine reads it when written); the lines after them, back on the log's clock,
    are not stamped ahead of the late ones, and keep their own time."""
    at, report = _placed(100.0, 100.3, 70.3, 100.6, 100.8, 70.8, 101.1, 101.4)
    assert at == {0: 100.25, 1: 100.5, 2: 70.5, 3: 100.75, 4: 101.0, 5: 71.0, 6: 101.25,
                  7: 101.5}  # fmt: skip
    assert report.ahead == 0


def test_a_clock_stepped_back_for_good_is_the_clock_lines_are_ahead_of() -> None:
    """A host clock stepped back 600 s, and the log goes on from there past
    `MAX_AHEAD_LINES` lines: a line then stamped an hour ahead of the new clock is ahead
    (placed with the lines before it), as on any clock."""
    # (Most of the log's first lines before the step: else they were the ones ahead.)
    before = [1000.0 + i * 0.01 for i in range(MAX_AHEAD_LINES * 3 // 5)]
    after = [400.0 + i * 0.01 for i in range(MAX_AHEAD_LINES + 10)]
    glitch = after[-1] + 3600.0
    at, report = _placed(*before, *after, glitch, after[-1] + 0.01)
    n = len(before) + len(after)
    assert at[n] == at[n - 1], at[n - 1]
    assert at[0] == 1000.0 + PULSE_S and at[len(before)] == 400.0 + PULSE_S
    assert report.ahead == 1


@pytest.mark.parametrize("n", [1, 3, 40])
@pytest.mark.parametrize("lines", [200, MAX_AHEAD_LINES + 200])
def test_a_log_beginning_with_lines_stamped_ahead_keeps_the_time_of_the_lines_after_them(
    n: int, lines: int
) -> None:
    """A log whose first `n` lines are stamped a day ahead (with a line without a time
    among them), then `lines` on the log's clock: nothing before them tells, the lines
    after them do: they are ahead, placed with the first line after them, and every other
    line keeps its own time (before: the first line was the log's clock, and every line
    after it waited behind it, never replayed)."""
    day = 86_400.0
    times: list[float | None] = [day + 100.0 + i for i in range(n)]
    times += [None, *(100.0 + i * 0.1 for i in range(lines))]
    at, report = _placed(*times)
    assert report.ahead == n and report.untimed == 1
    assert {at[i] for i in range(n + 1)} == {100.0 + PULSE_S}
    for i, t in enumerate(times[n + 1 :], start=n + 1):
        assert t is not None and t < at[i] <= t + PULSE_S, (i, t, at[i])


def test_lines_stamped_ahead_after_a_quiet_stretch_go_with_the_line_after_them() -> None:
    """A request, 60 s of quiet, then a line stamped a day ahead and 300 on the log's
    clock: it was written with the first of them, not with the request before the quiet
    stretch (nor kept a day ahead)."""
    times = [100.0, 160.0 + 86_400.0] + [160.0 + i * 0.1 for i in range(300)]
    at, report = _placed(*times)
    assert report.ahead == 1
    assert at[1] == at[2] == 160.0 + PULSE_S


@pytest.mark.parametrize("after", [200, MAX_AHEAD_LINES + 200])
def test_a_line_stamped_ahead_after_a_quiet_stretch_is_ahead_not_the_logs_clock(
    after: int,
) -> None:
    """A first request, 10 s of quiet, then traffic (`after` lines, 0.1 s apart: the log
    ends while they wait, or moves on past `MAX_AHEAD_LINES`) with one line stamped 60 s
    ahead among them: that line is ahead, and every other keeps its own time (none looks
    written late behind it)."""
    times = [100.0] + [110.0 + i * 0.1 for i in range(after)]
    times.insert(101, times[100] + 60.0)
    at, report = _placed(*times)
    assert report.ahead == 1
    assert at[101] == at[100]  # with the line written before it
    for i, t in enumerate(times):
        if i != 101:
            assert t < at[i] <= t + PULSE_S, (i, t, at[i])


@pytest.mark.parametrize("back_s", [10.0, 120.0, 3600.0])
def test_a_line_far_back_after_a_quiet_start_leaves_the_lines_before_it_their_time(
    back_s: float,
) -> None:
    """A request, 10 s of quiet, 400 requests 0.1 s apart, then one line stamped `back_s`
    earlier than the one before it, then more: no line is stamped ahead (the 400 are not,
    for the line far back after them); each line, the far one too, goes in its own slot."""
    times = [100.0] + [110.0 + i * 0.1 for i in range(400)]
    times.append(times[-1] - back_s)
    times += [times[-2] + 0.1 * (i + 1) for i in range(50)]
    at, report = _placed(*times)
    assert report.ahead == 0
    for i, t in enumerate(times):
        assert t < at[i] <= t + PULSE_S, (i, t, at[i])


def test_a_time_no_clock_says_is_no_time() -> None:
    """An `msec` of 400 digits (read as infinity) or past year 9999: a line without a
    time of its own, never a slot out of range (an OverflowError before)."""
    time_of = msec_reader("msec")
    assert time_of('{"msec":"' + "9" * 400 + '"}') is None
    assert time_of('{"msec":"253402300800.000"}') is None
    assert time_of('{"msec":"1796083200.125"}') == 1796083200.125


@pytest.mark.parametrize(
    ("line", "t"),
    [
        ('{"msec":"17963030549sponse_time":"0.018"}', None),  # (digits run into other text)
        ('{"msec":"1796tream_response_time":"0.009"}', None),
        ('{"msec":17x}', None),
        ('{"msec": 1796083200.5, "status":"200"}', 1796083200.5),
        ('{"msec":1796083200}', 1796083200.0),
        ('{"status":"200", "msec" : "1796083200.250"}', 1796083200.25),
    ],
)
def test_a_time_is_a_whole_value(line: str, t: float | None) -> None:
    """A corrupt rotation decompresses to lines whose `msec` runs into other text: those
    digits are no time (a year 2539 there steered the log's clock before), a whole number,
    quoted or not, is."""
    assert msec_reader("msec")(line) == t


def test_garbled_times_both_ways_leave_the_lines_after_them_their_own_time() -> None:
    """A damaged stretch whose times go far ahead and far back in turn (what a corrupt
    deflate stream makes of a log), then the log goes on: each line after it is placed at
    its own time. Before, a line far back settled the lines that waited far ahead as the
    log moving on, and every line after them was late behind a time 500 years on."""
    t0 = 1_796_303_000.0  # (2026-12-03: digits of it, cut or run on, give the others)
    ahead, back = 17_963_030_549.0, 179_630_305.0
    times: list[float | None] = [t0 + i * 0.1 for i in range(100)]
    times += [ahead, back, ahead + 3, 17.0] * 20
    times += [t0 + 10.0 + i * 0.1 for i in range(300)]
    at, report = _placed(*times)
    assert report.ahead == 40
    for i, t in enumerate(times):
        if t is not None and t0 <= t < t0 + 100.0:
            assert t < at[i] <= t + PULSE_S, (i, t, at[i])


def test_a_clock_stepped_back_for_good_while_lines_wait_ahead_goes_on_from_there() -> None:
    """Lines stamped an hour ahead wait; then the clock is stepped back a day, for good
    (`MAX_AHEAD_LINES` lines and more): the lines after the step keep the stepped clock's
    time, as they do without lines waiting."""
    hour, day = 3_600.0, 86_400.0
    times: list[float | None] = [day + i * 0.1 for i in range(100)]
    times += [day + 10.0 + hour + i * 0.1 for i in range(5)]
    times += [100.0 + i * 0.1 for i in range(MAX_AHEAD_LINES + 100)]
    at, _ = _placed(*times)
    for i in range(105 + MAX_AHEAD_LINES, len(times)):
        t = times[i]
        assert t is not None and t < at[i] <= t + PULSE_S, (i, t, at[i])


def _split(tail: Tail, chunk: bytes) -> list[str]:
    data = tail.pending + chunk
    cut = data.rfind(b"\n")
    tail.pending = data[cut + 1 :]
    return data[: max(cut, 0)].decode().split("\n")


@pytest.mark.parametrize("n", [700, 30_000])
def test_a_rotated_log_cut_short_gives_every_whole_line_before_the_cut(
    tmp_path: Path, n: int
) -> None:
    """As `gzip -dc` does: a small file cut in half gave none of its lines before."""
    text = "".join(f"{i} {'x' * 40}\n" for i in range(n)).encode()
    packed = gzip.compress(text)
    cut = packed[: len(packed) // 2]
    (tmp_path / "access.log.1.gz").write_bytes(cut)
    report = SourceReport("access_log")
    got = [
        line for lines in read_lines(tmp_path / "access.log.1.gz", _split, report) for line in lines
    ]
    whole = zlib.decompressobj(31).decompress(cut).count(b"\n")  # what gzip -dc gives
    assert got == text.decode().splitlines()[:whole] and whole > n // 3
    [problem] = report.problems
    assert (
        "ended before the end-of-stream marker" in problem
        and "the rest of it is skipped" in problem
    )


def test_a_rotated_log_of_several_members_and_padding_is_read_whole(tmp_path: Path) -> None:
    """`cat a.gz b.gz` (and zero padding after the last member, as gzip allows)."""
    a, b = "".join(f"a{i}\n" for i in range(5000)), "".join(f"b{i}\n" for i in range(5000))
    (tmp_path / "x.gz").write_bytes(
        gzip.compress(a.encode()) + gzip.compress(b.encode()) + bytes(8)
    )
    report = SourceReport("access_log")
    got = [line for lines in read_lines(tmp_path / "x.gz", _split, report) for line in lines]
    assert got == (a + b).splitlines() and report.problems == []


@pytest.mark.parametrize("damaged", ["first", "second", "third"])
def test_a_rotated_log_with_a_damaged_member_gives_the_members_before_it_only(
    tmp_path: Path, damaged: str
) -> None:
    """Bits flipped in one member of three: what zlib decompresses that member to before
    its check fails is garbage, so neither it nor any byte after it is given; the members
    before it are, whole."""
    parts = [("".join(f"{m}{i} {'y' * 30}\n" for i in range(20_000))) for m in "abc"]
    members = [bytearray(gzip.compress(p.encode(), mtime=0)) for p in parts]
    at = ["first", "second", "third"].index(damaged)
    middle = len(members[at]) // 2
    members[at][middle : middle + 40] = bytes(b ^ 0x55 for b in members[at][middle : middle + 40])
    (tmp_path / "x.gz").write_bytes(b"".join(members))
    report = SourceReport("access_log")
    got = [line for lines in read_lines(tmp_path / "x.gz", _split, report) for line in lines]
    assert got == "".join(parts[:at]).splitlines()
    [problem] = report.problems
    said = f"{tmp_path / 'x.gz'}: damaged (Error -3 while decompressing"
    assert problem.startswith(said), problem


def _files(tmp: Path, **files: list[float]) -> list[Path]:
    """Files of lines `"<name>:<i> <time>"`, one per keyword (its name), in that order."""
    paths = []
    for name, times in files.items():
        path = tmp / name
        path.write_text("".join(f"{name}:{i} {t!r}\n" for i, t in enumerate(times)))
        paths.append(path)
    return paths


def _read(paths: list[Path], report: SourceReport) -> list[str]:
    def read(path: Path) -> Iterator[list[str]]:
        text = path.read_text().splitlines()
        for i in range(0, len(text), 100):  # (chunks, as `read_lines` gives them)
            yield text[i : i + 100]

    return [line for chunk in without_overlap(paths, read, report, _time) for line in chunk]


def test_new_lines_at_times_an_earlier_rotation_holds_are_read(tmp_path: Path) -> None:
    """A host clock stepped back an hour over a rotation: the next file's lines are at
    times the file before it holds, and none is one of its lines: each is read."""
    report = SourceReport("access_log")
    older = [10_000.0 + i * 0.5 for i in range(8000)]
    newer = [12_000.0 + i * 0.5 for i in range(8000)]  # (within `older`'s times)
    got = _read(_files(tmp_path, a=older, b=newer), report)
    assert len(got) == 16_000 and report.twice == 0, report.problems


def test_copies_are_found_with_the_sample_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Far more lines than the sample keeps: it is thinned (half as many lines, as often
    as needed), never grows past `_SAMPLED`, and a part of a file copied into the next is
    still found and read once."""
    monkeypatch.setattr(_sources, "_SAMPLED", 256)
    seen: list[_sources._Seen] = []
    real = _sources._Seen

    def keep(*args: object) -> _sources._Seen:
        seen.append(real(*args))  # type: ignore[arg-type]
        return seen[-1]

    monkeypatch.setattr(_sources, "_Seen", keep)
    times = [1000.0 + i * 0.01 for i in range(40_000)]
    [original] = _files(tmp_path, a=times)
    lines = original.read_text().splitlines(keepends=True)
    copy = tmp_path / "b"
    copy.write_text("".join(lines[5000:30_000]) + "b:new 1400.5\n")
    report = SourceReport("access_log")
    got = _read([original, copy], report)
    assert got == [line.rstrip("\n") for line in lines] + ["b:new 1400.5"]
    assert report.twice == 25_000, report.problems
    assert len(seen[0].sample) <= 256 and seen[0].rate > _sources._SAMPLE_RATE


def test_alike_lines_again_after_a_clock_stepped_back_are_read(tmp_path: Path) -> None:
    """An application logging the same error every 50 ms, stamped to the second, and its
    host's clock stepped back a minute: the lines after the step are alike to the byte to
    lines written a minute before, one by one, and are new lines all the same (a copy is a
    run of lines in their places; these repeat one line each second). Each is read."""
    before = [f"{100 + i // 20} ERROR upstream timed out" for i in range(20 * 120)]
    after = [f"{160 + i // 20} ERROR upstream timed out" for i in range(20 * 60)]
    log = tmp_path / "app.log"
    log.write_text("".join(f"{line}\n" for line in before + after))

    def read(path: Path) -> Iterator[list[str]]:
        yield path.read_text().splitlines()

    report = SourceReport("log_match")
    got = [
        line
        for chunk in without_overlap([log], read, report, lambda line: float(line.split()[0]))
        for line in chunk
    ]
    assert got == before + after and report.twice == 0, report.problems


@pytest.mark.parametrize(
    ("before_history", "why"),
    [
        (None, "rotated away?"),  # (no line before: the log's beginning is lost)
        (995.0, "the lines before it are before the history's first record"),
        (100.0, "rotated away?"),  # (lines long before, none near: a rotation lost between)
    ],
)
def test_a_window_before_the_first_line_says_whether_the_log_went_on_before_it(
    before_history: float | None, why: str
) -> None:
    """A rule judged at 1,010 s over 60 s, the log's lines replayed from 1,000 s: when the
    log went on up to the history's first record (its lines before it outside the
    history, as a daemon started then reads from the log's end), that is why, never
    "rotated away?"."""
    report = SourceReport("access_log", first_line=1000.0, last_line=2000.0)
    report.before_history = before_history
    said = report.covers(1010.0, 60.0)
    assert said is not None and said.endswith(f"within the window it was judged on ({why})")


def _holes(times: list[float], hole_s: float = 5.0) -> SourceReport:
    report = SourceReport("access_log")
    ends = [end for end, _ in slots(_lines(*times), _time, report, hole_s)]
    # (What the engine counts of the lines it replays: `covers` asks it.)
    report.first_line, report.last_line = ends[0] - PULSE_S, ends[-1]
    return report


def test_a_stretch_without_a_line_within_a_file_is_a_hole() -> None:
    """Ten lines a second, then none for 30 s, then ten a second again: a hole within the
    file, from the last line's slot to the next line's, said under the source's problems;
    one as long among lines minutes apart (a quiet log) is none, nor is one shorter than
    `hole_s`."""
    steady = [100.0 + i / 10 for i in range(600)]
    report = _holes(steady + [190.0 + i / 10 for i in range(100)])
    assert report.holes == [(160.0, 190.0, "within a file")], report.holes
    said = (
        "no line from 1970-01-01T00:02:40.000Z to 1970-01-01T00:03:10.000Z (30s), within a "
        "file: lines lost (a log truncated or rewritten), no traffic then, or a wrong clock"
    )
    assert report.problems == [said], report.problems
    assert report.covers(195.0, 10.0) == (
        "no line of it from 1970-01-01T00:02:40.000Z to 1970-01-01T00:03:10.000Z, within a file, "
        "within the window it was judged on"
    )
    assert report.covers(200.0, 5.0) is None  # (a window after it: whole)
    quiet = [100.0 + 120 * i for i in range(20)]
    assert _holes([*quiet, quiet[-1] + 600.0]).holes == []
    assert _holes(steady + [164.0 + i / 10 for i in range(100)]).holes == []  # (4 s < 5 s)


def test_a_hole_where_one_file_ends_and_the_next_begins_is_judged_once() -> None:
    """A stretch without a line at a seam between two files is `without_overlap`'s to
    judge (between two files): `slots` does not say it again as one within a file."""
    report = SourceReport("access_log")
    report.seams.append((160.0, 190.0))
    times = [100.0 + i / 10 for i in range(600)] + [190.0 + i / 10 for i in range(100)]
    for _ in slots(_lines(*times), _time, report, 5.0):
        pass
    assert report.holes == [] and report.problems == [], report


def test_holes_within_a_file_are_told_up_to_a_bound_and_fail_closed_past_it() -> None:
    """A log crafted of bursts and pauses: at most `_MAX_HOLES` holes are kept; a decision
    after the last told gets a caveat all the same (fail closed, never "whole")."""
    times: list[float] = []
    t = 0.0
    for _ in range(_sources._MAX_HOLES + 5):
        times += [t + i / 10 for i in range(200)]
        t += 20.0 + 60.0
    report = _holes(times)
    assert len(report.holes) == _sources._MAX_HOLES, len(report.holes)
    assert report.untold is not None
    assert sum("are not told" in p for p in report.problems) == 1, report.problems[-1]
    why = report.covers(times[-1], 10.0)
    assert why is not None and "not told" in why, why
