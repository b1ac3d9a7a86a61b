"""The log_match signal: real files followed through rotation and junk, and a real daemon
that rolls green back when its log says `java.lang.OutOfMemoryError`."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd.clock import Clock, SystemClock
from guardd.core.counts import CountWindow
from guardd.render import _signal_lines
from guardd.secrets import redact_credentials
from guardd.signals import build
from guardd.signals._tail import MISSING_GRACE_S, READ_CHUNK
from guardd.signals.log_match import DETAIL_CHARS, LogMatchSignal, LogMatchSpec, evidence_line
from tests.harness.daemon import guardctl, lab, wait_until
from tests.signals.access_log_lib import FixedClock, until
from tests.signals.test_access_log_tail import _unprivileged_python

OOM = r"java\.lang\.OutOfMemoryError"
SECRET = "S3cretHunter2xyz"  # noqa: S105 - a planted credential that must not leak
# A long line with a credential in it: evidence must show it cut and redacted.
OOM_LINE = (
    f"2026-11-30 21:00:00 ERROR [pool-3] jdbc login password={SECRET} failed, then "
    "java.lang.OutOfMemoryError: Java heap space at com.example.Cache.fill(Cache.java:42) "
    + "x"
    * 300
)


def spec(paths: dict[str, Path], **overrides: Any) -> LogMatchSpec:
    kwargs: dict[str, Any] = {
        "paths": {c: str(p) for c, p in paths.items()},
        "patterns": (OOM, r"FATAL"),
        "window_s": 60.0,
        "poll_interval_s": 0.05,
        **overrides,
    }
    return LogMatchSpec(**kwargs)


def append(path: Path, data: str | bytes) -> None:
    with path.open("ab") as f:
        f.write(data.encode() if isinstance(data, str) else data)


@asynccontextmanager
async def running(
    the_spec: LogMatchSpec, clock: Clock | None = None
) -> AsyncIterator[LogMatchSignal]:
    signal = LogMatchSignal("errors_log", the_spec, clock or SystemClock())
    async with anyio.create_task_group() as tg:
        await tg.start(signal.run)
        yield signal
        tg.cancel_scope.cancel()


def count(signal: LogMatchSignal, color: str) -> float | None:
    reading = signal.reading(color, signal.clock.monotonic())
    assert reading is not None
    return reading.stats["count"]


# ---- the pure parts (no I/O) ---------------------------------------------------------------


def test_count_window_counts_expires_and_keeps_the_oldest_first_hit() -> None:
    w = CountWindow(10.0, created_at=100.0)
    assert w.counts(100.0) == (0, 0)
    assert w.add(100.5, 5, 0)
    assert w.add(101.5, 3, 2, "first")
    assert w.add(103.5, 1, 1, "second")
    assert w.counts(104.0) == (9, 3)
    assert w.first_hit(104.0) == "first"
    # The slot of 101.x leaves the window after 10 s: the next hit is the first one left.
    assert w.counts(111.9) == (1, 1)
    assert w.first_hit(111.9) == "second"
    assert w.counts(200.0) == (0, 0)
    assert w.first_hit(200.0) is None
    assert not w.add(150.0, 1, 1, "too old")  # behind the newest slot by more than the span
    with pytest.raises(ValueError, match="hits <= events"):
        w.add(200.0, 1, 2)
    with pytest.raises(ValueError, match="span_s"):
        CountWindow(0, 0.0)


def test_count_window_memory_does_not_grow_with_the_rate() -> None:
    w = CountWindow(3600.0, created_at=0.0)
    before = w.footprint()
    for i in range(200_000):
        w.add(i * 0.05 + 0.01, 1, i % 2, f"line {i}")
    assert w.footprint() == before
    # 6 s slots; at 10,000 s the window holds the slots from 6,402 s: lines 128,040 on.
    assert w.counts(10_000.0) == (71_960, 35_980)
    assert w.first_hit(10_000.0) == "line 128041"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("login failed password=hunter2hunter user=bob", "hunter2hunter"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "eyJhbGci"),
        ('{"api_key": "k-0123456789abcdef", "msg": "OutOfMemoryError"}', "k-0123456789abcdef"),
        ("connect jdbc:postgresql://app:Pa55word99@db:5432/app refused", "Pa55word99"),
        ("X-Auth-Token: 0123456789abcdef0123", "0123456789abcdef0123"),
        ("pushing with ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghij"),
        ("session_id=abcdef123456; secret: top-secret-value", "top-secret-value"),
        ("token 4f9a1c2e8b7d6a5f4e3d2c1b0a9f8e7d expired", "4f9a1c2e8b7d6a5f"),
    ],
)
def test_credentials_in_a_line_are_redacted(line: str, secret: str) -> None:
    shown = evidence_line(line)
    assert secret not in shown
    assert "***" in shown
    assert secret not in redact_credentials(line)


def test_ordinary_text_is_not_redacted() -> None:
    for text in (
        "java.lang.OutOfMemoryError: Java heap space",
        "token expired for user bob",
        "author=jim status=500 path=/api/orders",
    ):
        assert redact_credentials(text) == text


def test_evidence_line_is_cut_escaped_and_redacted() -> None:
    shown = evidence_line(OOM_LINE)
    assert len(shown) == DETAIL_CHARS
    assert shown.endswith("...")
    assert SECRET not in shown
    assert "password=***" in shown
    assert "java.lang.OutOfMemoryError" in shown
    # Terminal escapes in a log line reach evidence as text, not as escapes.
    assert evidence_line("FATAL \x1b[2J\x07 boom") == "FATAL \\x1b[2J\\x07 boom"
    assert evidence_line("short") == "short"


def test_each_line_has_one_outcome_and_the_window_counts_them() -> None:
    clock = FixedClock(mono=1000.0)
    signal = LogMatchSignal("errors_log", spec({"green": Path("/nonexistent")}), clock)
    signal.ingest(
        "green",
        [
            "INFO all fine",
            "ERROR java.lang.OutOfMemoryError: Java heap space",
            "FATAL disk gone",
            "x" * 20_000,  # over max_line_bytes (16 KiB): oversize, never matched
            "FATAL \udcff\udcfe junk",  # bytes that were not UTF-8: binary, never matched
            "FATAL \x00\x00",
            "é FATAL in UTF-8 is text",
            "",
        ],
    )
    assert signal.color_lines["green"] == {"matched": 3, "unmatched": 2, "oversize": 1, "binary": 2}
    # The totals the runtime sums to wake the decision loop: a flat mapping of counts.
    assert signal.lines == {"matched": 3, "unmatched": 2, "oversize": 1, "binary": 2}
    signal.followers["green"].read_at = 1000.0  # as after a successful read of the file
    reading = signal.reading("green", 1001.0)
    assert reading is not None
    assert reading.samples == 8
    assert reading.stats == {"count": 3, "rate": 3 / 60.0}
    assert reading.detail["first_match"] == "ERROR java.lang.OutOfMemoryError: Java heap space"
    assert signal.reading("blue", 1001.0) is None  # no log named for blue
    # Past the window: nothing counted, but the file is still read (not stale).
    later = signal.reading("green", 1100.0)
    assert later is not None
    assert later.stats == {"count": 0, "rate": 0.0}
    assert "first_match" not in later.detail
    assert later.last_at == 1000.0


def test_an_unread_file_is_unknown_and_goes_stale() -> None:
    clock = FixedClock(mono=500.0)
    signal = LogMatchSignal("errors_log", spec({"green": Path("/nonexistent")}), clock)
    reading = signal.reading("green", 900.0)
    assert reading is not None
    assert reading.stats == {"count": None, "rate": None}
    assert reading.last_at == 500.0  # the start: stale once past stale_after


def test_status_says_what_each_file_is_doing_and_guardctl_shows_it() -> None:
    clock = FixedClock(mono=1000.0)
    paths = {"blue": Path("/var/log/b.log"), "green": Path("/var/log/g.log")}
    signal = LogMatchSignal("errors_log", spec(paths), clock)
    signal.followers["green"].state = "waiting for /var/log/g.log (missing)"
    signal.followers["blue"].state = "reading /var/log/b.log"
    signal.followers["blue"].read_at = 1000.0
    signal.ingest("blue", ["FATAL a", "INFO b"])
    status = signal.status()
    assert status["state"] == "green: waiting for /var/log/g.log (missing)"
    assert status["problem"] is None
    assert status["colors"]["blue"]["lines"]["matched"] == 1
    doc: dict[str, Any] = {**status, "stale": False}
    for color in ("blue", "green"):
        reading = signal.reading(color, 1000.5)
        assert reading is not None
        doc[color] = {"samples": reading.samples, **reading.stats}
    shown = "\n".join(_signal_lines({"errors_log": doc}))
    assert "signal errors_log (log_match): green: waiting for" in shown
    assert "blue  1 matches (0.01667/s) in 2 lines; reading /var/log/b.log" in shown
    assert "green - matches (-/s) in 0 lines; waiting for /var/log/g.log (missing)" in shown
    assert "req/s" not in shown


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"paths": {}}, "paths: name at least one"),
        ({"paths": {"green": "relative.log"}}, "paths: green: 'relative.log' is not an absolute"),
        ({"patterns": ()}, "patterns: give at least one"),
        ({"patterns": ("(unclosed",)}, "patterns: '(unclosed' is not a regular expression"),
        ({"window_s": 0}, "window_s: must be a positive"),
        ({"max_line_bytes": 10}, "max_line_bytes: must lie within"),
    ],
)
def test_a_bad_spec_says_which_key_and_why(overrides: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"paths": {"green": "/var/log/app.log"}, "patterns": (OOM,)}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LogMatchSpec(**{**kwargs, **overrides})


# ---- real files ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_history_is_skipped_and_a_new_match_is_counted(tmp_path: Path) -> None:
    green, blue = tmp_path / "green.log", tmp_path / "blue.log"
    green.write_text("old java.lang.OutOfMemoryError from yesterday\n" * 3)
    blue.write_text("")
    async with running(spec({"green": green, "blue": blue})) as signal:
        await until(lambda: count(signal, "green") == 0, "green read", show=signal.status)
        append(green, "INFO started\n" + OOM_LINE + "\n")
        await until(lambda: count(signal, "green") == 1, "the OOM line", show=signal.status)
        reading = signal.reading("green", signal.clock.monotonic())
        assert reading is not None
        assert reading.samples == 2
        assert reading.detail["first_match"] == evidence_line(OOM_LINE)
        assert SECRET not in json.dumps(reading.detail)
        assert count(signal, "blue") == 0
        assert signal.problem is None
        status = signal.status()
        assert status["colors"]["green"]["state"] == f"reading {green}"
        assert status["colors"]["green"]["lines"]["matched"] == 1
        assert SECRET not in json.dumps(status)


@pytest.mark.anyio
async def test_a_quiet_log_stays_fresh(tmp_path: Path) -> None:
    green = tmp_path / "green.log"
    green.write_text("")
    async with running(spec({"green": green})) as signal:
        await until(lambda: count(signal, "green") == 0, "green read")
        follower = signal.followers["green"]
        first = follower.read_at
        assert first is not None
        await until(lambda: (follower.read_at or 0) > first, "a later successful read")
        reading = signal.reading("green", signal.clock.monotonic())
        assert reading is not None and reading.last_at is not None and reading.last_at > first


@pytest.mark.anyio
async def test_rename_and_a_new_file_count_each_line_once(tmp_path: Path) -> None:
    green = tmp_path / "app.log"
    green.write_text("")
    async with running(spec({"green": green})) as signal:
        await until(lambda: count(signal, "green") == 0, "green read")
        append(green, "FATAL one\n")
        await until(lambda: count(signal, "green") == 1, "the first match", show=signal.status)
        # logrotate's default: rename, create anew; the writer reopens a little later.
        green.rename(tmp_path / "app.log.1")
        append(tmp_path / "app.log.1", "FATAL two (written before the reopen)\n")
        green.write_text("FATAL three\nINFO fine\n")
        await until(lambda: count(signal, "green") == 3, "every match once", show=signal.status)
        lines = signal.color_lines["green"]
        assert lines == {"matched": 3, "unmatched": 1, "oversize": 0, "binary": 0}
        assert signal.status()["colors"]["green"]["rotations"] == 1
        reading = signal.reading("green", signal.clock.monotonic())
        assert reading is not None and reading.detail["first_match"] == "FATAL one"


@pytest.mark.anyio
@pytest.mark.parametrize("pieces", [1, 7])
async def test_a_megabyte_line_is_skipped_with_a_bounded_buffer(
    tmp_path: Path, pieces: int
) -> None:
    green = tmp_path / "green.log"
    green.write_text("")
    async with running(spec({"green": green})) as signal:
        await until(lambda: count(signal, "green") == 0, "green read")
        # One 1 MiB line that would match, written in pieces, then a normal matching line.
        huge = ("FATAL " + "y" * (1024 * 1024)).encode()
        step = len(huge) // pieces + 1
        for start in range(0, len(huge), step):
            append(green, huge[start : start + step])
        append(green, b"\nFATAL after the flood\n")
        await until(lambda: count(signal, "green") == 1, "the line after", show=signal.status)
        assert signal.color_lines["green"]["oversize"] == 1
        assert signal.color_lines["green"]["matched"] == 1
        follower = signal.followers["green"]
        assert follower.max_buffered <= signal.spec.max_line_bytes + READ_CHUNK
        reading = signal.reading("green", signal.clock.monotonic())
        assert reading is not None and reading.detail["first_match"] == "FATAL after the flood"


@pytest.mark.anyio
async def test_copytruncate_and_binary_junk(tmp_path: Path) -> None:
    green = tmp_path / "green.log"
    green.write_text("")
    async with running(spec({"green": green})) as signal:
        await until(lambda: count(signal, "green") == 0, "green read")
        junk = bytes(range(256)).replace(b"\n", b"") * 16  # NULs and bytes that are not UTF-8
        append(green, b"\xff\xfe\x00FATAL\x00 junk\n" + junk + b"\n")
        append(green, "FATAL real\n")
        await until(lambda: count(signal, "green") == 1, "the real line", show=signal.status)
        assert signal.color_lines["green"]["binary"] == 2
        # copytruncate: copy, truncate, go on writing.
        (tmp_path / "green.log.1").write_bytes(green.read_bytes())
        with green.open("r+b") as f:
            f.truncate(0)
        append(green, "FATAL after truncation\n")
        await until(lambda: count(signal, "green") == 2, "the line after", show=signal.status)
        assert signal.status()["colors"]["green"]["truncations"] == 1
        assert signal.color_lines["green"]["matched"] == 2


@pytest.mark.anyio
async def test_a_log_missing_past_the_grace_is_a_problem_of_its_color(tmp_path: Path) -> None:
    """A mistyped path is no quiet log: after `MISSING_GRACE_S` its color's problem says
    it does not exist (one alert, a status warning), until a file appears there."""
    green = tmp_path / "green.log"
    clock = FixedClock()
    async with running(spec({"green": green}), clock) as signal:
        follower = signal.followers["green"]
        await until(lambda: "missing" in follower.state, "the wait")
        clock.mono += MISSING_GRACE_S - 1
        polls = follower.polls
        await until(lambda: follower.polls >= polls + 2, "two polls")
        assert signal.status()["problem"] is None
        clock.mono += 1
        await until(lambda: signal.problem is not None, "a problem", show=signal.status)
        assert signal.problem == "green: does not exist"
        green.write_text("FATAL\n")
        await until(lambda: count(signal, "green") == 1, "the file", show=signal.status)
        assert signal.problem is None


@pytest.mark.anyio
async def test_missing_then_a_directory_then_a_file(tmp_path: Path) -> None:
    green = tmp_path / "green.log"
    async with running(spec({"green": green})) as signal:
        await until(lambda: "missing" in signal.followers["green"].state, "the wait")
        assert count(signal, "green") is None  # not read: unknown, never zero
        green.mkdir()
        await until(lambda: signal.problem is not None, "a problem", show=signal.status)
        assert signal.problem == "green: not a regular file"
        assert count(signal, "green") is None
        green.rmdir()
        green.write_text("FATAL written before guardd could read it\n")
        # A file that appears after the path was missing is read from its start.
        await until(lambda: count(signal, "green") == 1, "the file", show=signal.status)
        assert signal.problem is None


# ---- the real daemon -------------------------------------------------------------------------


@pytest.mark.nginx
def test_an_oom_line_in_greens_log_rolls_green_back(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = {"blue": logs / "blue.log", "green": logs / "green.log"}
    for path in paths.values():
        # History, even an old OOM, is not read: only what is written while guarded.
        path.write_text("2026-11-29 INFO java.lang.OutOfMemoryError yesterday, fixed\n")
    with lab(
        tmp_path / "lab",
        signals__errors_log={
            "kind": "log_match",
            "paths": {c: str(p) for c, p in paths.items()},
            "patterns": [OOM],
        },
        rules=[
            {
                "signal": "errors_log",
                "stat": "count",
                "above": 1,
                "severity": "P0",
                "min_samples": 0,
            }
        ],
    ) as the_lab:
        d = the_lab.daemon()

        def green_read() -> bool:
            res = guardctl("status", "--json", socket=the_lab.socket_path)
            doc = json.loads(res.stdout) if res.returncode == 0 else {}
            green = doc.get("signals", {}).get("errors_log", {}).get("green") or {}
            return green.get("count") == 0

        wait_until(green_read, 60, "errors_log reading green's log with no match")
        assert not [e for e in d.events() if e["event"].startswith("rollback")]
        append(paths["green"], "2026-11-30 INFO request served\n" + OOM_LINE + "\n")
        done = d.wait_event("rollback_completed", timeout=60)
        assert done["from"] == "green" and done["to"] == "blue"
        assert done["severity"] == "P0"
        ev = done["evidence"]
        assert ev["rule"] == "errors_log.count"
        assert ev["signal"] == "errors_log" and ev["stat"] == "count"
        assert ev["color"] == "green"
        assert ev["value"] >= 1
        assert ev["path"] == str(paths["green"])
        assert ev["first_match"] == evidence_line(OOM_LINE)
        assert len(ev["first_match"]) <= DETAIL_CHARS
        assert "java.lang.OutOfMemoryError" in ev["first_match"]
        assert the_lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
        assert d.stop() == 0, d.log()[-3000:]
        # The credential in the line reached neither the journal nor the daemon's log.
        assert SECRET not in d.raw_journal()
        assert SECRET not in d.log()


def test_build_makes_a_log_match_adapter(tmp_path: Path) -> None:
    from guardd.config import LogMatchSignalConfig  # noqa: PLC0415 - only this test needs it

    table = LogMatchSignalConfig.model_validate(
        {"kind": "log_match", "paths": {"green": str(tmp_path / "g.log")}, "patterns": [OOM]}
    )
    adapter, problems = build(
        "errors_log", table, window_s=45.0, targets=None, probe_urls={}, clock=SystemClock()
    )
    assert isinstance(adapter, LogMatchSignal)
    assert problems == []
    assert adapter.spec.window_s == 45.0
    assert adapter.spec.stale_after_s == 45.0
    assert adapter.spec.paths == {"green": str(tmp_path / "g.log")}


_CHILD = """
import json, sys, anyio
from guardd.clock import Clock, SystemClock
from guardd.signals.log_match import LogMatchSignal, LogMatchSpec

async def main(path):
    spec = LogMatchSpec(paths={"green": path}, patterns=("FATAL",), poll_interval_s=0.05)
    signal = LogMatchSignal("errors_log", spec, SystemClock())
    def show():
        reading = signal.reading("green", signal.clock.monotonic())
        print(json.dumps({**signal.status(), "stats": dict(reading.stats),
                          "last_at": reading.last_at, "started_at": signal.started_at}),
              flush=True)
    async with anyio.create_task_group() as tg:
        await tg.start(signal.run)
        with anyio.fail_after(30):
            while signal.problem is None:
                await anyio.sleep(0.02)
            show()
            while signal.problem is not None:
                await anyio.sleep(0.02)
            while signal.reading("green", signal.clock.monotonic()).stats["count"] != 0:
                await anyio.sleep(0.02)
            show()
            sys.stdin.readline()
            while signal.reading("green", signal.clock.monotonic()).stats["count"] != 1:
                await anyio.sleep(0.02)
            show()
        tg.cancel_scope.cancel()

anyio.run(main, sys.argv[1])
"""


def test_an_unreadable_log_is_a_problem_unknown_and_stale() -> None:
    """As a user who may not read the file (root may read anything, so: nobody)."""
    shared = Path(tempfile.mkdtemp(prefix="guardd-perm-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        log = shared / "app.log"
        log.write_text("FATAL history\n")
        log.chmod(0o000)
        python, env, who = _unprivileged_python()
        with subprocess.Popen(  # type: ignore[call-overload]
            [python, "-c", _CHILD, str(log)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **who,
        ) as child:
            assert child.stdout is not None and child.stdin is not None
            seen = json.loads(child.stdout.readline())
            assert seen["problem"] == "green: permission denied"
            assert seen["colors"]["green"]["state"] == f"permission denied: {log}"
            assert seen["stats"] == {"count": None, "rate": None}
            assert seen["last_at"] == seen["started_at"]  # never read: stale after stale_after
            log.chmod(0o644)  # fixed by the operator: read on from the end (history stays out)
            seen = json.loads(child.stdout.readline())
            assert seen["problem"] is None
            assert seen["stats"]["count"] == 0
            assert seen["last_at"] > seen["started_at"]
            append(log, "FATAL now\n")
            child.stdin.write("\n")
            child.stdin.flush()
            seen = json.loads(child.stdout.readline())
            assert seen["stats"]["count"] == 1
            assert child.wait(timeout=30) == 0
    finally:
        shutil.rmtree(shared)
