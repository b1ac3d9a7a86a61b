"""The observations format: written by the recorder, read back whatever happened to it.

Real files in a temporary directory, two clocks the tests set: runs across midnight,
several runs a day (gzip members), retention, files cut short or damaged anywhere, lines
that are not ours, a disk that refuses (a file in the way, a file size limit), and secrets
that must not be written.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd import observations
from guardd.exceptions import StorageError
from guardd.observations import (
    MAX_LINE_BYTES,
    MAX_PENDING,
    HistoryUnreadable,
    ReadReport,
    Record,
    Recorder,
    day_of,
    history_files,
    read_history,
)

DAY = 86400.0
#: 2026-11-30 23:59:50 UTC: ten seconds before midnight.
EVE = 1_796_083_190.0


class Clocks:
    """A wall and a monotonic clock that the test moves."""

    def __init__(self, wall: float = EVE, mono: float = 500.0) -> None:
        self.wall_s, self.mono_s = wall, mono

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s

    def tick(self, s: float) -> None:
        self.wall_s += s
        self.mono_s += s


def recorder(
    directory: Path, clocks: Clocks, guard: str = "web", keep_s: float = 7 * DAY
) -> Recorder:
    return Recorder(directory, guard, keep_s=keep_s, wall=clocks.wall, monotonic=clocks.mono)


def read(directory: Path, **kw: Any) -> tuple[list[Record], ReadReport]:
    report = ReadReport()
    return list(read_history(directory, report, **kw)), report


def run(
    directory: Path, clocks: Clocks, probes: int, *, sizes: list[int] | None = None
) -> list[dict[str, Any]]:
    """One daemon run: a start, then a probe of each color and a write every second;
    `sizes` gets the file's size after each write. Returns every record in `directory`."""
    rec = recorder(directory, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    for i in range(probes):
        clocks.tick(1.0)
        rec.probe("blue", "ok", 0.01 * i, status=200)
        rec.probe("green", "fail", 0.5, error="connection refused", status=None)
        rec.write()
        if sizes is not None:
            sizes.append(history_files(directory)[-1].stat().st_size)
    rec.close()
    return _written(directory)


def _written(directory: Path) -> list[dict[str, Any]]:
    """Every line of every file as `zcat` reads it (the gzip members in order)."""
    docs = []
    for path in history_files(directory):
        docs += [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    return docs


def test_two_runs_across_midnight_read_back_in_order(tmp_path: Path) -> None:
    clocks = Clocks()
    run(tmp_path, clocks, 20)  # 23:59:50 to 00:00:10
    clocks.wall_s += 3600  # an hour later, a new run and a new monotonic clock (a reboot)
    clocks.mono_s = 7.0
    run(tmp_path, clocks, 5)
    names = [p.name for p in history_files(tmp_path)]
    assert names == ["web-2026-11-30.jsonl.gz", "web-2026-12-01.jsonl.gz"]
    # The second day's file holds two members (one a run), as zcat reads them.
    assert gzip.decompress((tmp_path / names[1]).read_bytes()).count(b'"kind":"start"') == 1
    records, report = read(tmp_path)
    assert [r.doc for r in records] == _written(tmp_path)
    # The run that went on past midnight opened the second day's file with a `context`
    # record: that file alone still says which color was served, and at what interval.
    assert report.runs == 2 and report.records == 2 + 2 * 25 + 1
    assert not report.skipped and not report.problems and not report.clock_steps
    assert [r.kind for r in records][:3] == ["start", "probe", "probe"]
    assert all(day_of(r.ts) == "2026-11-30" for r in records[:19])
    head = records[19]
    assert head.kind == "context" and day_of(head.ts) == "2026-12-01"
    assert {k: head.doc[k] for k in ("guard", "active", "probe_interval_s")} == {
        "guard": "web",
        "active": "blue",
        "probe_interval_s": 1.0,
    }
    assert (head.ts, head.at) == (records[20].ts, records[20].at)
    # The history's clock only moves forward: by mono within a run, by the wall across.
    ats = [r.at for r in records]
    assert ats == sorted(ats)
    second = next(i for i, r in enumerate(records) if r.kind == "start" and i > 0)
    assert records[second].at - records[second - 1].at == pytest.approx(3600)
    assert records[1].at - records[0].at == pytest.approx(1.0)
    # since / until bound what is yielded by wall time.
    some, _ = read(tmp_path, since=EVE + 10, until=EVE + 15)
    assert {r.ts for r in some} == {EVE + 10 + i for i in range(6)}
    with pytest.raises(HistoryUnreadable, match="no observation file"):
        read(tmp_path, guard="other")


def test_files_of_old_days_are_pruned_and_nothing_else(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 20)  # 2026-12-01
    for back in range(12):
        day = day_of(clocks.wall_s - back * DAY)
        (tmp_path / f"web-{day}.jsonl.gz").write_bytes(b"")
        (tmp_path / f"web-2-{day}.jsonl.gz").write_bytes(b"")  # another guard
    (tmp_path / "notes.txt").write_text("mine")
    rec = recorder(tmp_path, clocks, keep_s=3 * DAY)
    removed = rec.prune()
    assert sorted(p.name for p in removed) == [
        f"web-{day_of(clocks.wall_s - back * DAY)}.jsonl.gz" for back in range(11, 3, -1)
    ]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("web-2026"))
    assert left == [f"web-{day_of(clocks.wall_s - b * DAY)}.jsonl.gz" for b in (3, 2, 1, 0)]
    assert len(list(tmp_path.glob("web-2-*"))) == 12 and (tmp_path / "notes.txt").exists()
    # Opening a day's file (each start, each new day) prunes too.
    (tmp_path / "web-2020-01-01.jsonl.gz").write_bytes(b"")
    rec.probe("blue", "ok", 0.1)
    rec.write()
    assert not (tmp_path / "web-2020-01-01.jsonl.gz").exists()
    # A directory that cannot be listed prunes nothing and says nothing.
    assert recorder(tmp_path / "none", clocks).prune() == []


def _two_runs_one_day(
    tmp_path: Path,
) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """A day's file of two runs: it, each run's records, the file's size after each of
    run 1's writes (the last: where run 2's member begins)."""
    clocks = Clocks(wall=EVE + 100)
    sizes: list[int] = []
    first = run(tmp_path, clocks, 30, sizes=sizes)
    sizes[-1] = history_files(tmp_path)[0].stat().st_size  # after the member's end
    clocks.mono_s = 3.0
    run(tmp_path, clocks, 10)
    second = _written(tmp_path)[len(first) :]
    return history_files(tmp_path)[0], first, second, sizes


def test_a_member_cut_short_anywhere_loses_only_its_unwritten_tail(tmp_path: Path) -> None:
    path, first, second, sizes = _two_runs_one_day(tmp_path)
    whole = path.read_bytes()
    boundary = sizes[-1]
    for cut in range(11, boundary, 3):
        # A crash cut run 1's member at `cut`; run 2 appended its member after.
        path.write_bytes(whole[:cut] + whole[boundary:])
        records, report = read(tmp_path)
        docs = [r.doc for r in records]
        got = len(docs) - len(second)
        assert docs[got:] == second, cut
        assert docs[:got] == first[:got], cut  # a prefix: nothing made up
        # Every batch written whole before the cut is read (the first write holds the
        # start record and two probes, the others two probes each).
        whole_batches = sum(size <= cut for size in sizes[:-1])
        assert got >= (1 + 2 * whole_batches if whole_batches else 0), cut
        assert not report.problems, (cut, report.problems)
        assert report.runs == (2 if got else 1)
    # Cut short at the very end (a crash, or a daemon still writing): the whole lines stay,
    # and a cut within a write is said.
    for cut in range(boundary + 1, len(whole), 5):
        path.write_bytes(whole[:cut])
        records, report = read(tmp_path)
        docs = [r.doc for r in records]
        assert docs[: len(first)] == first
        assert docs[len(first) :] == second[: len(docs) - len(first)]
        within = not whole[:cut].endswith(b"\x00\x00\xff\xff")
        assert report.problems == [CUT_IN_A_WRITE.format(path=path)] * within, cut


def test_corrupt_bytes_skip_to_the_next_member(tmp_path: Path) -> None:
    path, first, second, sizes = _two_runs_one_day(tmp_path)
    whole = path.read_bytes()
    for at in range(20, sizes[-1], 13):
        damaged = bytearray(whole)
        damaged[at : at + 4] = b"\xff\x00\xee\x11"
        path.write_bytes(bytes(damaged))
        records, report = read(tmp_path)
        known = [*first, *second]
        assert all(r.doc in known for r in records), at  # no garbage passes for a record
        assert [r.doc for r in records][-len(second) :] == second, at
        # Every batch before the damage is read (the output zlib gave with the error too),
        # in order; the damaged batch's lines are skipped, not taken for others.
        before = sum(size <= at for size in sizes[:-1])
        got = [r.doc for r in records][: len(records) - len(second)]
        kept = max(0, 1 + 2 * (before - 1))
        assert got[:kept] == first[:kept], at
        order = [first.index(doc) for doc in got]
        assert order == sorted(order), at
        if report.problems:
            assert report.skipped["corrupt member"] == 1
            assert "resumed at byte" in report.problems[0], report.problems
            # Where zlib noticed it: in the damaged member, at or after the damage (the
            # start of the few bytes it was given then), not where the chunk read began.
            said = re.search(r"corrupt near byte (\d+)", report.problems[0])
            assert said is not None, report.problems
            noticed = int(said[1])
            assert at - observations._SALVAGE_STEP < noticed < sizes[-1], (at, noticed)
    # Garbage appended after the last member is reported, not raised.
    path.write_bytes(whole + b"not gzip at all" * 10)
    records, report = read(tmp_path)
    assert [r.doc for r in records] == [*first, *second]
    assert report.skipped["corrupt member"] == 1
    assert "the rest of it is skipped" in report.problems[0]


@pytest.mark.parametrize("size", [MAX_LINE_BYTES + 1, 3 * 256 * 1024])
def test_a_line_over_the_limit_is_skipped_and_its_neighbours_kept(
    tmp_path: Path, size: int
) -> None:
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    rec.probe("blue", "ok", 0.1)
    rec.sample("big", "blue", {"outcome": "ok", "junk": "x" * size})
    rec.probe("green", "ok", 0.2)
    rec.write()
    rec.close()
    records, report = read(tmp_path)
    assert [r.kind for r in records] == ["start", "probe", "probe"]
    assert report.skipped == {"too long": 1}


def test_lines_that_are_not_records_are_counted_by_reason(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    rec.add("weird", x=1)
    rec.add("probe", color="blue", outcome="ok", latency_s=0.1, error=None, status=200)
    rec.write()
    rec.close()
    extra = b'{"kind":"probe","ts":1}\n[1,2]\n{"kind":"probe","ts":1,"mono":true}\nnot json\n'
    with (tmp_path / "web-2026-12-01.jsonl.gz").open("ab") as f:
        f.write(gzip.compress(extra, mtime=0))
    records, report = read(tmp_path)
    assert [r.kind for r in records] == ["start", "probe"]
    assert report.skipped == {
        "unknown kind 'weird'": 1,
        "no ts or mono": 2,
        "not an object": 1,
        "invalid JSON": 1,
    }


@pytest.mark.parametrize("blank", [b"", b" ", b"\r", b" \t "], ids=repr)
def test_blank_lines_are_left_out_silently_and_the_rest_is_read(
    tmp_path: Path, blank: bytes
) -> None:
    """A blank line (empty, or blanks only: a hand-edited file) is no record and no damage:
    the records around it are all read, in order, and nothing is counted as skipped."""
    lines = [
        json.dumps({"kind": "probe", "ts": EVE + i, "mono": 10.0 + i, "n": i}).encode()
        for i in range(50)
    ]
    body = b"\n".join([*lines[:20], blank, blank, *lines[20:], blank]) + b"\n"
    (tmp_path / "web-2026-12-01.jsonl.gz").write_bytes(gzip.compress(body, mtime=0))
    records, report = read(tmp_path)
    assert [r.doc["n"] for r in records] == list(range(50))
    assert not report.skipped and not report.problems


def test_missing_and_unreadable_files_and_directories(tmp_path: Path) -> None:
    with pytest.raises(HistoryUnreadable, match="no such directory"):
        read(tmp_path / "absent")
    with pytest.raises(HistoryUnreadable, match="no observation file"):
        read(tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HistoryUnreadable) as e:
        read(tmp_path / "a-file")
    assert e.value.path == tmp_path / "a-file"
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.probe("blue", "ok", 0.1)
    rec.write()
    rec.close()
    (tmp_path / "web-2026-11-29.jsonl.gz").mkdir()  # listed, cannot be read as a file
    records, report = read(tmp_path)
    assert [r.kind for r in records] == ["probe"]
    assert report.problems == [
        (
            f"{tmp_path / 'a-file'}: not read: not named <guard>-<YYYY-MM-DD>.jsonl.gz as the "
            "daemon names its files"
        ),
        f"{tmp_path / 'web-2026-11-29.jsonl.gz'}: cannot open: not a regular file (a directory)",
    ]


def test_a_stepped_wall_clock_is_seen_and_does_not_stretch_the_history(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)  # a few seconds after midnight: stepped back over it
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    for step in (1.0, 1.0, 1.0):
        clocks.tick(step)
        rec.probe("blue", "ok", 0.1)
    clocks.wall_s += 600  # NTP steps the wall clock forward
    clocks.tick(1.0)
    rec.probe("blue", "ok", 0.1)
    clocks.wall_s -= 900  # and an operator back
    clocks.tick(1.0)
    rec.probe("blue", "ok", 0.1)
    rec.write()
    rec.close()
    records, report = read(tmp_path)
    assert [r.at - records[0].at for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [round(d) for _, d in report.clock_steps] == [600, -900]
    assert report.runs == 1
    # The run stays in the later day's file: the order it was written in is kept.
    assert [p.name for p in history_files(tmp_path)] == ["web-2026-12-01.jsonl.gz"]


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)
    blocked = tmp_path / "obs"
    blocked.write_text("a file where the directory should be")
    rec = recorder(blocked, clocks)
    for _ in range(MAX_PENDING + 5):
        rec.probe("blue", "ok", 0.1)
    assert rec.pending == MAX_PENDING and rec.dropped == 5
    with pytest.raises(StorageError, match="cannot write"):
        rec.write()
    assert rec.pending == MAX_PENDING and rec.errors == 1 and rec.written == 0
    # What failed waits, and counts against the bound: new records are dropped.
    rec.probe("green", "ok", 0.1)
    rec.probe("green", "ok", 0.1)
    assert rec.pending == MAX_PENDING and rec.dropped == 7
    assert {r["color"] for r in rec.take()} == {"blue"}


def test_a_refused_write_is_retried_and_nothing_is_written_twice(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)
    where = tmp_path / "obs"
    where.write_text("in the way")
    rec = recorder(where, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    rec.probe("blue", "ok", 0.1)
    with pytest.raises(StorageError) as e:
        rec.write()
    failed = rec.last_error
    assert failed is not None and str(where) in failed and rec.errors == 1
    assert str(e.value) == failed
    rec.probe("green", "ok", 0.2)
    where.unlink()
    assert rec.write() == 3
    assert rec.last_error is None and rec.written == 3 and rec.pending == 0
    rec.close()
    assert [d["kind"] for d in _written(where)] == ["start", "probe", "probe"]


def test_a_write_that_fails_half_way_leaves_no_half_batch(tmp_path: Path) -> None:
    """A file size limit (EFBIG) refuses a batch part way: the part is taken back, and
    once the limit is lifted every record is in the file exactly once."""
    script = textwrap.dedent(
        f"""
        import json, resource, signal, sys
        from pathlib import Path
        from guardd.observations import Recorder
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        t = [{EVE + 100}]
        clock = lambda: t[0]
        rec = Recorder(Path(sys.argv[1]), "web", keep_s=1e6, wall=clock, monotonic=clock)
        rec.start(active="blue", probe_interval_s=1.0)
        rec.write()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        failures = 0
        for i in range(2000):
            t[0] += 1
            rec.probe("blue", "ok", 0.001, error=f"{{i}}-" + "x" * (i % 50), status=200)
            if i % 100 == 99:
                try:
                    rec.write()
                except Exception:
                    failures += 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        rec.write()
        rec.close()
        print(json.dumps({{"failures": failures, "errors": rec.errors, "written": rec.written}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["failures"] >= 1 and result["errors"] == result["failures"]
    assert result["written"] == 2001
    records, report = read(tmp_path)
    errors = [r.doc["error"] for r in records if r.kind == "probe"]
    assert errors == [f"{i}-" + "x" * (i % 50) for i in range(2000)]
    assert not report.skipped


def test_secrets_are_not_written(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.probe("blue", "error", 0.1, error="GET https://ops:hunter2-pw@10.0.0.1/healthz failed")
    rec.probe("blue", "error", 0.1, error="Authorization: Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0")
    rec.front_door(False, "token=abcdef0123456789 refused")
    rec.switch("blue", "green", by="ops", reason="password=letmein please")
    rec.sample("q", "green", {"outcome": "unreachable", "error": "https://u:s3cr3tpw@prom:9090"})
    rec.write()
    rec.close()
    text = b"".join(gzip.decompress(p.read_bytes()) for p in history_files(tmp_path))
    for secret in (b"hunter2-pw", b"eyJhbGciOi", b"abcdef0123456789", b"letmein", b"s3cr3tpw"):
        assert secret not in text
    assert text.count(b"***") >= 5


def wait_for(what: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `what` (the writer thread's counters) until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.anyio
async def test_the_writer_thread_writes_every_batch_once_in_order(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.start_writer()
    with pytest.raises(RuntimeError, match="already started"):
        rec.start_writer()
    rec.start(active="blue", probe_interval_s=1.0)
    for i in range(100):
        rec.probe("blue", "ok", float(i))
        if i % 7 == 0:
            # Handed over while the thread may still write the last batch.
            assert rec.submit() > 0
    assert rec.submit() > 0
    assert rec.submit() == 0, "nothing pending, nothing handed over"
    with anyio.fail_after(30.0):
        await rec.aclose()
    assert rec.closed
    assert rec.submit() == 0, "a stopped writer takes nothing"
    assert rec.written == 101 and rec.pending == 0 and rec.errors == 0
    records, report = read(tmp_path)
    assert not report.problems
    assert [r.doc["latency_s"] for r in records if r.kind == "probe"] == [
        float(i) for i in range(100)
    ]


@pytest.mark.anyio
async def test_the_writer_thread_retries_a_failed_write_alone(tmp_path: Path) -> None:
    clocks = Clocks(wall=EVE + 100)
    where = tmp_path / "obs"
    where.write_text("a file where the directory should be")
    rec = recorder(where, clocks)
    rec.start_writer()
    rec.probe("blue", "ok", 0.1)
    assert rec.submit() == 1
    wait_for(lambda: rec.errors >= 1)
    failed = rec.last_error
    assert failed is not None and str(where) in failed
    # Held by the writer: still pending, counted against the bound, tried again.
    assert rec.pending == 1 and rec.written == 0
    rec.probe("green", "ok", 0.2)
    assert rec.pending == 2
    where.unlink()
    # No new batch comes: the writer tries again on its own, `RETRY_S` later.
    wait_for(lambda: rec.written == 1)
    assert rec.last_error is None and rec.pending == 1
    assert rec.submit() == 1
    with anyio.fail_after(30.0):
        await rec.aclose()
    colors = [r.doc["color"] for r in read(where)[0] if r.kind == "probe"]
    assert colors == ["blue", "green"], "the failed batch first, nothing twice"


def before_writes(
    monkeypatch: pytest.MonkeyPatch, rec: Recorder, before: Callable[[list[dict[str, Any]]], None]
) -> None:
    """Make the writer call `before(batch)` (which may raise, or block) ahead of each write."""
    write_batch = rec.write_batch

    def wrapped(batch: list[dict[str, Any]]) -> tuple[int, str | None]:
        before(batch)
        return write_batch(batch)

    monkeypatch.setattr(rec, "write_batch", wrapped)


@pytest.mark.anyio
async def test_a_long_outage_keeps_the_newest_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer holds what failed, within `MAX_PENDING`, and drops the oldest past it:
    what happened last (a rollback's `switch`) is what an outage must not cost."""
    monkeypatch.setattr(observations, "MAX_PENDING", 10)
    monkeypatch.setattr(observations, "RETRY_S", 0.2)
    clocks = Clocks(wall=EVE + 100)
    where = tmp_path / "obs"
    where.write_text("a file where the directory should be")
    rec = recorder(where, clocks)
    rec.start_writer()
    for i in range(8):
        rec.probe("blue", "ok", float(i))
    rec.submit()
    wait_for(lambda: rec.errors >= 1)
    started = time.monotonic()
    for i in range(8, 14):
        rec.probe("blue", "ok", float(i))
    rec.switch("green", "blue", by="guardd", reason="P0")
    rec.submit()
    wait_for(lambda: rec.dropped == 5)
    assert rec.pending == 10
    # Retried alone, `RETRY_S` apart: not in a spin.
    wait_for(lambda: rec.errors >= 4)
    assert time.monotonic() - started >= 2 * 0.2
    where.unlink()
    wait_for(lambda: rec.written == 10)
    with anyio.fail_after(30.0):
        await rec.aclose()
    records = read(where)[0]
    assert [r.doc["latency_s"] for r in records if r.kind == "probe"] == [
        float(i) for i in range(5, 14)
    ]
    assert records[-1].kind == "switch"


@pytest.mark.anyio
async def test_a_bug_in_a_write_loses_that_batch_never_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    calls: list[int] = []

    def buggy_once(batch: list[dict[str, Any]]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise TypeError("a bug")

    before_writes(monkeypatch, rec, buggy_once)
    rec.start_writer()
    rec.probe("blue", "ok", 0.1)
    rec.probe("blue", "ok", 0.2)
    rec.submit()
    wait_for(lambda: len(rec.bugs) == 1)
    assert str(rec.bugs.popleft()) == "a bug"
    # Dropped and counted: the same records would fail the same way again. Not a failed
    # write: the disk is not to blame.
    assert rec.dropped == 2 and rec.pending == 0
    assert rec.errors == 0 and rec.last_error is None
    rec.probe("green", "ok", 0.3)
    rec.submit()
    wait_for(lambda: rec.written == 1)
    assert calls == [2, 1]
    with anyio.fail_after(30.0):
        await rec.aclose()
    assert [r.doc["color"] for r in read(tmp_path)[0] if r.kind == "probe"] == ["green"]


@pytest.mark.anyio
async def test_a_writer_stuck_on_the_disk_is_left_behind_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    stuck, release = threading.Event(), threading.Event()

    def hanging(_: list[dict[str, Any]]) -> None:
        stuck.set()
        release.wait(60.0)

    before_writes(monkeypatch, rec, hanging)
    rec.start_writer()
    rec.probe("blue", "ok", 0.1)
    rec.submit()
    assert stuck.wait(30.0)
    rec.probe("blue", "ok", 0.2)
    with anyio.move_on_after(0.2):
        await rec.aclose()
    closed = rec.closed
    assert not closed, "the caller's deadline leaves a writer that hangs behind"
    assert rec.pending == 2
    release.set()
    with anyio.fail_after(30.0):
        await rec.aclose()
    assert rec.closed, "and the writer, once free, writes both and ends"
    assert rec.written == 2


PROBES: list[tuple[Any, ...]] = [
    ("blue", "ok", 0.004, None, 200),
    ("green", "http_5xx", 0.0123456789, "HTTP 503", 503),
    ("blue", "timeout", 2.0, 'said "no"\n\tthen \\ left \x01 \u00e9 \U0001f600', None),
    ("green", "probe_error", 0.0, "x" * 300, None),
    ("blue", "connect_error", float("nan"), "refused", None),
    ("blue", "connect_error", float("inf"), None, None),
    ("blue", "ok", -0.0, None, True),
    ("blue", "ok", 1e-7, None, 0),
    ("blue", "ok", 3, None, 200),  # an int latency: round() keeps it an int
    ("purple", "ok", 0.1, None, 200),
    ("green", "a new outcome", 0.1, None, 200),
    ("green", "ok", 123456.654321, "GET https://ops:hunter2-pw@h/x", 599),
]


@pytest.mark.parametrize("probe", PROBES)
def test_a_probe_line_is_the_json_encoders_own(tmp_path: Path, probe: tuple[Any, ...]) -> None:
    """The recorder formats probe lines itself (it is cheaper): each must be the very text
    the JSON encoder writes for the record, so that every reader reads the same thing."""
    for wall, mono in ((EVE + 0.1, 500.25), (EVE, 1e-9), (1.5e9 + 1 / 3, 12345678.9)):
        rec = recorder(tmp_path, Clocks(wall=wall, mono=mono))
        rec.probe(*probe)
        (record,) = rec.take()
        expected = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        assert observations._line(record) == expected
    # The other kinds, and a probe record not in the recorder's own shape, are encoded.
    for other in (
        {"kind": "start", "ts": EVE, "mono": 1.0, "guard": "web", "format": 1},
        {"kind": "probe", "ts": EVE, "mono": 1.0, "color": "blue"},
        {**record, "extra": [1, 2]},
    ):
        assert observations._line(other) == json.dumps(other, separators=(",", ":")) + "\n"


def test_files_written_before_the_fast_lines_read_back_alike(tmp_path: Path) -> None:
    """A file written as earlier versions wrote it (every line by the JSON encoder, deflate
    level 6) reads back record for record as one the recorder writes now."""
    clocks = Clocks(wall=EVE + 100)
    new = tmp_path / "new"
    rec = recorder(new, clocks)
    rec.start(active="blue", probe_interval_s=0.5)
    for i, probe in enumerate(PROBES * 20):
        clocks.tick(0.25 + i / 1000)
        rec.probe(*probe)
    batch = list(rec._pending)
    rec.write()
    rec.close()
    old = tmp_path / "old"
    old.mkdir()
    text = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in batch)
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    name = history_files(new)[0].name
    (old / name).write_bytes(z.compress(text.encode()) + z.flush())
    assert gzip.decompress((new / name).read_bytes()) == text.encode()
    got_new, report_new = read(new)
    got_old, report_old = read(old)
    assert [(r.at, r.ts, r.kind, json.dumps(r.doc)) for r in got_new] == [
        (r.at, r.ts, r.kind, json.dumps(r.doc)) for r in got_old
    ]
    assert len(got_new) == len(batch) and not report_new.skipped and not report_old.skipped


def _parsed_by_json(lines: list[bytes]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """What reading gave when the json module alone parsed a batch: the batch whole, else
    a line at a time."""
    report = ReadReport()
    try:
        docs = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        docs = None
    if isinstance(docs, list) and len(docs) == len(lines):
        out = [d for d in docs if isinstance(d, dict)]
        if len(out) < len(docs):
            report.skipped["not an object"] += len(docs) - len(out)
        return out, dict(report.skipped)
    out = []
    for raw in lines:
        try:
            doc = json.loads(raw)
        except ValueError:
            report.skipped["invalid JSON"] += 1
            continue
        if isinstance(doc, dict):
            out.append(doc)
        else:
            report.skipped["not an object"] += 1
    return out, dict(report.skipped)


#: Lines on which orjson and the json module could part: numbers of every shape, values
#: only the json module reads, escapes, duplicate keys, deep nesting, bad UTF-8.
_AWKWARD = [
    b'{"a":0.1,"b":1e-7,"c":1E+300,"d":-0.0,"e":-0,"f":123456789012345678,"g":2.5e-324}',
    b'{"big":123456789012345678901234567890,"neg":-9223372036854775809}',
    b'{"x":1e400,"y":-1e400}',
    b'{"n":NaN,"i":Infinity,"m":-Infinity}',
    b'{"s":"\\ud800 lone","t":"\\ud83d\\ude00 pair","u":"\\u00e9\\n\\t\\"\\\\"}',
    b'{"k":1,"k":2,"j":3,"k":4}',
    b'{"deep":' + b"[" * 600 + b"]" * 600 + b"}",
    b'{"bad":"\xff\xfe"}',
    b'{"v":0.30000000000000004,"w":4.35,"z":1.7976931348623157e308,"t":true,"f":null}',
    b"[1, 2]",
    b'{"cut": ',
]


@pytest.mark.parametrize("bad", [[], *([line] for line in _AWKWARD[1:])])
def test_a_batch_reads_as_the_json_module_reads_it(bad: list[bytes]) -> None:
    """orjson parses each batch when it takes it; what it gives must be what the json
    module gives (same types, same floats, same key order), and what it refuses must
    be read as the json module reads it (the batch whole, else a line at a time)."""
    rng = random.Random(11)  # noqa: S311 - repeatable, not a secret
    lines = [_AWKWARD[0]]
    for _ in range(2000):
        x = rng.choice([rng.uniform(-1e6, 1e6), rng.expovariate(1e-3), rng.random() * 1e-9])
        text = rng.choice([repr(x), f"{x:.17g}", f"{x:.3e}", f"{x:.1f}"]).encode()
        lines.append(
            b'{"ts":' + text + b',"n":' + str(rng.randrange(-(10**12), 10**12)).encode() + b"}"
        )
    lines += bad
    report = ReadReport()
    got = observations._parse(lines, report)
    want, skipped = _parsed_by_json(lines)
    assert repr(list(got)) == repr(want)  # repr: 1 and 1.0 and True are equal, not alike
    assert dict(report.skipped) == skipped


def _history_docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """`n` records as a day holds them (probe rounds every 200 ms), with now and then what
    a plain batch must not hide: a restart, a monotonic clock gone back, a wall clock
    stepped, stamps that are not finite floats, kinds that are not known strings."""
    wall, mono = EVE, 500.0
    docs: list[dict[str, Any]] = []
    for _ in range(n):
        wall, mono = wall + 0.2, mono + 0.2
        doc: dict[str, Any] = {"kind": "probe", "color": "blue", "ts": wall, "mono": mono}
        odd = rng.random()
        if odd < 0.01:
            doc["kind"] = "start"
        elif odd < 0.02:
            mono -= 50.0  # a reboot without a start record (its wall clock stepped, or not)
            wall += rng.choice([0.0, 50.0, -20.0])
            doc["mono"], doc["ts"] = mono, wall
        elif odd < 0.03:
            wall += rng.choice([-30.0, 5.0, 1.0001])  # NTP, an operator
            doc["ts"] = wall
        elif odd < 0.04:
            doc[rng.choice(["ts", "mono"])] = rng.choice(
                [None, 7, True, "x", math.nan, math.inf, 1e300, -1e300, -1.0]
            )
        elif odd < 0.045:
            doc["mono"] = mono + 5e9  # a salvaged line of a corrupt member
        elif odd < 0.05:
            doc["kind"] = rng.choice([None, "nope", ["probe"], {"k": 1}, 3])
        elif odd < 0.06:
            doc["kind"] = rng.choice(["sample", "switch", "front_door"])
        elif odd < 0.062:
            docs += [dict(d) for d in docs[-rng.randrange(1, 100) :]]  # records read twice
        docs.append(doc)
    return docs


def _refusal(read: Callable[[], object]) -> str | None:
    """What `read()` raised (`HistoryUnreadable`'s message), None if it read."""
    try:
        read()
    except HistoryUnreadable as e:
        return str(e)
    return None


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    ("since", "until"), [(None, None), (EVE - 1000, EVE + 300), (EVE - 400, None)]
)
def test_plain_batches_read_as_records_read_one_at_a_time(
    seed: int, since: float | None, until: float | None
) -> None:
    """`_Clocks.plain` takes a whole batch at once only when it gives what `each` gives a
    record at a time: the same records (the same floats of `at`), skips, runs and clock
    steps, whatever the batch sizes."""
    rng = random.Random(seed)  # noqa: S311 - repeatable, not a secret
    docs = _history_docs(rng, 3000)
    want = ReadReport()
    records: list[Record] = []
    refused = _refusal(lambda: records.extend(observations._Clocks(want).each(docs, since, until)))
    got = ReadReport()
    clocks = observations._Clocks(got)
    read_back: list[Record] = []
    plain = 0

    def batches() -> None:
        nonlocal plain
        i = 0
        while i < len(docs):
            size = rng.choice([1, 2, 7, 50, 400])
            batch = docs[i : i + size]
            i += size
            out = clocks.plain(batch, since, until)
            plain += out is not None
            read_back.extend(out if out is not None else list(clocks.each(batch, since, until)))

    # Refused alike (a wall clock stepped back across `until`), at the same record.
    assert _refusal(batches) == refused
    if refused is not None:
        assert repr(read_back) == repr(records[: len(read_back)])
        return
    assert repr(read_back) == repr(records)
    assert (got.skipped, got.runs, got.clock_steps) == (want.skipped, want.runs, want.clock_steps)
    assert plain > 0, "some batches were plain"


@pytest.mark.parametrize("records", [3, 3000])  # a batch read record by record, a plain one
def test_a_file_copied_under_an_earlier_day_is_not_read_twice(tmp_path: Path, records: int) -> None:
    """The recorder never writes a record into the file of a day before its own: a day's
    file copied (or renamed) under an earlier day's name holds records later than that day,
    skipped and counted, never replayed twice."""
    clocks = Clocks(wall=EVE + 100)  # the day after EVE's
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    _healthy_rounds(rec, clocks, records)
    rec.write()
    rec.close()
    [path] = history_files(tmp_path)
    alone, report = read(tmp_path)
    assert len(alone) == records + 1 and not report.skipped
    earlier = path.with_name(path.name.replace(day_of(EVE + 100), day_of(EVE)))
    assert earlier != path
    earlier.write_bytes(path.read_bytes())
    got, report = read(tmp_path)
    assert [r.doc for r in got] == [r.doc for r in alone]
    assert report.skipped == {"later than the day its file is named after": records + 1}


def _healthy_rounds(rec: Recorder, clocks: Clocks, n: int) -> None:
    """`n` passing probe rounds of blue, a second apart."""
    for _ in range(n):
        clocks.tick(1.0)
        rec.probe("blue", "ok", 0.01, status=200)


def _three_runs(directory: Path, records: int) -> list[Record]:
    """Three runs of `records` probe rounds: a restart in one boot (the monotonic clock
    goes on), then a reboot (a new monotonic clock, near zero), a wall clock stepped
    back an hour in the last. Returns them as read, alone."""
    clocks = Clocks(wall=EVE + 100)
    for reboot in (False, False, True):
        if reboot:
            clocks.wall_s += 600.0
            clocks.mono_s = 30.0
        else:
            clocks.tick(60.0)
        rec = recorder(directory, clocks)
        rec.start(active="blue", probe_interval_s=1.0)
        for i in range(records):
            clocks.tick(1.0)
            if reboot and i == records // 2:
                clocks.wall_s -= 3600.0
            rec.probe("blue", "ok", 0.01, status=200)
        rec.stop()
        rec.write()
        rec.close()
    alone, report = read(directory)
    assert report.runs == 3 and not report.skipped and len(alone) == 3 * (records + 2)
    assert len(report.clock_steps) == 1
    return alone


READ_BEFORE = (
    "record at a time already read "
    "(the same records twice: a file copied or concatenated, or lines moved out of order)"
)


@pytest.mark.parametrize("records", [3, 3000])  # record by record, and plain batches
@pytest.mark.parametrize(
    "how", ["concatenated", "copied under a later day", "overlapping copies", "a line twice"]
)
def test_records_read_twice_are_replayed_once(tmp_path: Path, records: int, how: str) -> None:
    """The same records found twice in the history (a file concatenated to itself, a day's
    file copied under a later day's name, two copies that overlap, one line written
    twice) are read once: the copies are skipped and counted, the runs counted once, and
    a restart, a reboot and a stepped clock are still what they were."""
    alone = _three_runs(tmp_path, records)
    [path] = history_files(tmp_path)
    raw = path.read_bytes()
    lines = gzip.decompress(raw).splitlines(keepends=True)
    if how == "concatenated":  # cat obs obs | gzip
        path.write_bytes(gzip.compress(b"".join(lines + lines)))
        twice = len(lines)
    elif how == "copied under a later day":
        path.with_name(path.name.replace(day_of(EVE + 100), day_of(EVE + 100 + DAY))).write_bytes(
            raw
        )
        twice = len(lines)
    elif how == "overlapping copies":  # the second run and the rest again, then a new run
        second = next(i for i, ln in enumerate(lines) if b'"start"' in ln and i > 0)
        path.write_bytes(raw + gzip.compress(b"".join(lines[second:])))
        twice = len(lines) - second
    else:
        middle = len(lines) // 2
        path.write_bytes(gzip.compress(b"".join([*lines[:middle], lines[middle], *lines[middle:]])))
        twice = 1
    got, report = read(tmp_path)
    assert [r.doc for r in got] == [r.doc for r in alone]
    assert [r.at for r in got] == [r.at for r in alone]
    assert report.skipped == {READ_BEFORE: twice}
    assert report.runs == 3 and len(report.clock_steps) == 1


def test_records_read_twice_then_new_ones_go_on_from_the_first(tmp_path: Path) -> None:
    """A copy whose end is newer than what was read before (a file rotated with what the
    first copy held, then more): what was read before is skipped, what follows it is
    read, on the same run's clock."""
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    _healthy_rounds(rec, clocks, 40)
    rec.write()
    rec.close()
    whole, _ = read(tmp_path)
    [path] = history_files(tmp_path)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    # The first copy holds the run to its 30th round, the second from the 10th on.
    path.write_bytes(gzip.compress(b"".join(lines[:31])) + gzip.compress(b"".join(lines[11:])))
    got, report = read(tmp_path)
    assert [r.doc for r in got] == [r.doc for r in whole]
    assert [r.at for r in got] == [r.at for r in whole]
    assert report.skipped == {READ_BEFORE: 20}
    assert report.runs == 1


def _moved(lines: list[bytes], k: int, how: str) -> tuple[list[bytes], int]:
    """`lines` with line `k + 10` moved ahead of the ten before it, line `k` moved after
    the ten after it, or the two swapped; and how many lines then follow a later one."""
    a, b = lines[k], lines[k + 10]
    between = lines[k + 1 : k + 10]
    if how == "moved ahead":
        return [*lines[:k], b, a, *between, *lines[k + 11 :]], 10
    if how == "moved back":
        return [*lines[:k], *between, b, a, *lines[k + 11 :]], 1
    return [*lines[:k], b, *between, a, *lines[k + 11 :]], 10


@pytest.mark.parametrize("how", ["moved ahead", "moved back", "swapped"])
@pytest.mark.parametrize(
    ("records", "where"), [(40, "mid-run"), (3000, "mid-run"), (3000, "across two chunks")]
)
def test_a_record_moved_or_swapped_in_its_file_is_put_back_in_its_place(
    tmp_path: Path, records: int, where: str, how: str
) -> None:
    """A record moved ahead of ten others of its run, or after them, or two records ten
    apart swapped (an edited file): each is put back where its run stamped it, every record
    is replayed once, and the file is said to hold records out of order. Before, the ten
    were taken for copies (at times already read) and dropped: ten probe rounds lost, a
    color judged stale for them."""
    alone = _three_runs(tmp_path, records)
    [path] = history_files(tmp_path)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    if where == "mid-run":
        k = len(lines) // 2  # (the second run's)
    else:  # the ten lines straddle the end of the first chunk read
        k = next(i for i, n in enumerate(itertools.accumulate(map(len, lines))) if n > 256 * 1024)
        k -= 5
    edited, late = _moved(lines, k, how)
    path.write_bytes(gzip.compress(b"".join(edited)))
    got, report = read(tmp_path)
    assert [r.doc for r in got] == [r.doc for r in alone]
    assert [r.at for r in got] == [r.at for r in alone]
    assert not report.skipped
    said = (
        f"{path}: {late} record(s) found after later-stamped ones of their run (lines moved or "
        "swapped in the file): replayed in the order they were stamped"
    )
    assert report.problems == [said]


@pytest.mark.parametrize("how", ["moved ahead", "moved back"])
def test_a_record_moved_far_is_put_back_or_said_read_before(tmp_path: Path, how: str) -> None:
    """A record moved ahead of ten times `_HELD` others is carried forward to its place
    (it sorts last of every batch, into what is held back for the next). One moved back as
    far is found after its run went well past it, as the first of a copy would be: it is
    skipped and counted under a reason that names both, never replayed back in time, and
    every other record is replayed."""
    from guardd.observations import _HELD  # noqa: PLC0415 - the reach under test

    alone = _three_runs(tmp_path, 12 * _HELD)
    [path] = history_files(tmp_path)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    k, far = 5, 10 * _HELD
    if how == "moved ahead":
        edited = [*lines[:k], lines[k + far], *lines[k : k + far], *lines[k + far + 1 :]]
    else:
        edited = [*lines[:k], *lines[k + 1 : k + far], lines[k], *lines[k + far :]]
    path.write_bytes(gzip.compress(b"".join(edited)))
    got, report = read(tmp_path)
    assert all(b.at >= a.at for a, b in itertools.pairwise(got))
    if how == "moved ahead":
        assert [r.doc for r in got] == [r.doc for r in alone] and not report.skipped
        said = f"{path}: {far} record(s) found after later-stamped ones of their run"
        assert report.problems[0].startswith(said), report.problems
    else:
        assert [r.doc for r in got] == [r.doc for r in alone[:k] + alone[k + 1 :]]
        assert report.skipped == {READ_BEFORE: 1} and report.problems == []


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("records", [3, 3000])  # record by record, and plain batches
def test_a_file_renamed_under_a_later_day_is_read_and_said(
    tmp_path: Path, records: int, copied: bool
) -> None:
    """A day's file renamed under a later day holds no record of that day, which the
    recorder never writes (it opens a day's file for a record of the day): read all the
    same, and said. A file that also holds earlier records (a wall clock stepped back over
    midnight) is no such file."""
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    _healthy_rounds(rec, clocks, records)
    clocks.wall_s -= 3600.0  # back over midnight: the rest stays in this day's file
    _healthy_rounds(rec, clocks, 3)
    rec.write()
    rec.close()
    [path] = history_files(tmp_path)
    alone, report = read(tmp_path)
    assert report.problems == [] and len(alone) == records + 4
    later = path.with_name(path.name.replace(day_of(EVE + 100), day_of(EVE + 100 + 3 * DAY)))
    if copied:  # (its records are then all read before, and the file still said)
        later.write_bytes(path.read_bytes())
    else:
        path.rename(later)
    got, report = read(tmp_path)
    assert [r.doc for r in got] == [r.doc for r in alone]
    said = (
        f"{later}: holds no record of the day it is named after, only of days before (a file "
        "renamed or copied under a later day?); read all the same"
    )
    assert report.problems == [said]


CUT_IN_A_WRITE = (
    "{path}: ends within a write (being written as it was read, a write cut off, or a copy "
    "cut short): what it holds up to there is read"
)


@pytest.mark.parametrize("cut", [0, 1, 3, 200])
def test_the_newest_file_cut_within_a_write_is_said(tmp_path: Path, cut: int) -> None:
    """The newest file of a running daemon ends unfinished, on the sync-flush marker its
    every write ends with: nothing to say. One cut short of that (a copy cut, a write cut
    off) is said, and every whole record before the cut is read."""
    clocks = Clocks(wall=EVE + 100)
    rec = recorder(tmp_path, clocks)
    rec.start(active="blue", probe_interval_s=1.0)
    _healthy_rounds(rec, clocks, 50)
    rec.write()
    [path] = history_files(tmp_path)
    running = path.read_bytes()  # (as the daemon leaves it between writes)
    rec.close()
    path.write_bytes(running[: len(running) - cut])
    got, report = read(tmp_path)
    said = [p for p in report.problems if "ends within a write" in p]
    if cut == 0:
        assert len(got) == 51 and report.problems == []
    else:
        assert said == [CUT_IN_A_WRITE.format(path=path)]
        assert 0 < len(got) <= 51
