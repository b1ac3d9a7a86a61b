"""The access-log signal on hostile files and sockets: rotation, damage, junk, forgeries."""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.traffic import CLASSES
from guardd.signals._tail import MISSING_GRACE_S
from guardd.signals.access_log import READ_CHUNK, AccessLogSignal, AccessLogSpec, _Tail
from tests.signals.access_log_lib import ADDRESSES, BLUE, GREEN, FixedClock, line, running, until

pytestmark = pytest.mark.anyio
PROJECT = Path(__file__).resolve().parents[2]


def spec(path: Path, **overrides: object) -> AccessLogSpec:
    kwargs: dict[str, object] = {
        "source": f"file:{path}",
        "addresses": ADDRESSES,
        "poll_interval_s": 0.05,
        **overrides,
    }
    return AccessLogSpec(**kwargs)  # type: ignore[arg-type]


def append(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with path.open("ab") as f:
        f.write(data)


def attributed(signal: AccessLogSignal, color: str) -> int:
    return sum(signal.requests[color, cls] for cls in CLASSES)


async def _next_poll(signal: AccessLogSignal) -> None:
    polls = signal.polls
    await until(lambda: signal.polls > polls, "a poll", show=signal.status)


# ---- files ---------------------------------------------------------------------------------


async def test_history_is_skipped_and_new_lines_are_counted(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(line() * 50)
    async with running(spec(log)) as signal:
        polls = signal.polls
        await until(lambda: signal.polls >= polls + 2, "two polls", show=signal.status)
        assert signal.lines["ok"] == 0
        append(log, line(BLUE) * 3 + line(GREEN, "503") * 2)
        await until(lambda: signal.lines["ok"] == 5, "5 lines", show=signal.status)
        assert attributed(signal, "blue") == 3
        assert signal.requests["green", "5xx"] == 2
        reading = signal.reading("green", time.monotonic())
        assert reading is not None
        assert reading.samples == 2
        assert reading.stats["error_ratio"] == 1.0
        assert signal.reading("purple", time.monotonic()) is None
        assert signal.status()["state"] == f"reading {log}"


async def test_missing_at_start_is_waited_for_then_read_from_its_beginning(
    tmp_path: Path,
) -> None:
    log = tmp_path / "access.log"
    async with running(spec(log)) as signal:
        await until(lambda: "(missing)" in signal.state, "the missing state", show=signal.status)
        assert signal.status()["state"] == f"waiting for {log} (missing)"
        assert signal.problem is None
        log.write_text(line() * 4)
        await until(
            lambda: signal.lines["ok"] == 4, "the 4 lines of the new file", show=signal.status
        )
        assert signal.state == f"reading {log}"


async def test_a_path_missing_past_the_grace_is_a_problem_until_a_file_appears(
    tmp_path: Path,
) -> None:
    """A path with no file (a typo, a log no longer written) is a quiet log for
    `MISSING_GRACE_S`, as a rotation's is for a moment; then "does not exist", the
    signal's problem (its rules inconclusive, one alert, a status warning). A file that
    appears clears it; a followed file gone from its path is no problem (a rotation)."""
    log = tmp_path / "access.log"
    clock = FixedClock()
    async with running(spec(log), clock) as signal:
        await until(lambda: "(missing)" in signal.state, "the missing state", show=signal.status)
        clock.mono += MISSING_GRACE_S - 1
        await _next_poll(signal)
        await _next_poll(signal)
        assert signal.status()["problem"] is None
        clock.mono += 1
        await until(lambda: signal.problem is not None, "the problem", show=signal.status)
        assert (signal.problem, signal.status()["problem"]) == ("does not exist",) * 2
        assert signal.state == f"waiting for {log} (missing)"
        log.write_text(line() * 3)
        await until(lambda: signal.lines["ok"] == 3, "the 3 lines", show=signal.status)
        assert signal.problem is None
        log.unlink()
        clock.mono += 10 * MISSING_GRACE_S
        await _next_poll(signal)
        await _next_poll(signal)
        assert "gone from its path" in signal.state and signal.problem is None


async def test_rename_then_reopen_counts_each_line_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    async with running(spec(log)) as signal:
        with log.open("a") as nginx:  # nginx's open file, as a worker holds it
            nginx.write(line() * 10)
            nginx.flush()
            await until(lambda: signal.lines["ok"] == 10, "10 lines", show=signal.status)
            log.rename(tmp_path / "access.log.1")  # logrotate
            nginx.write(line() * 5)  # before the reopen: still to the renamed file
            nginx.flush()
            # The lines and the missing path are noticed in the same poll or in two.
            await until(
                lambda: signal.lines["ok"] == 15 and "gone from its path" in signal.state,
                "lines after the rename, and the path gone",
                show=signal.status,
            )
            with log.open("a") as reopened:  # nginx -s reopen
                reopened.write(line(GREEN) * 7)
                reopened.flush()
                nginx.write(line() * 2)  # a worker that reopens late
                nginx.flush()
                await until(lambda: signal.lines["ok"] == 24, "all 24 lines", show=signal.status)
        assert signal.rotations == 1
        assert attributed(signal, "blue") == 17
        assert attributed(signal, "green") == 7
        polls = signal.polls
        await until(lambda: signal.polls >= polls + 3, "more polls", show=signal.status)
        assert signal.lines["ok"] == 24


@pytest.mark.parametrize("copy_kept", [True, False])
async def test_copytruncate_counts_each_line_once(tmp_path: Path, copy_kept: bool) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    # A slow poll, so that lines land between our last read and the copy.
    async with running(spec(log, poll_interval_s=1.0)) as signal:
        append(log, line() * 20)
        await until(lambda: signal.lines["ok"] == 20, "20 lines", show=signal.status)
        append(log, line() * 5)  # not read yet
        shutil.copyfile(log, tmp_path / "access.log.1")
        (tmp_path / "access.log-20261129.gz").write_bytes(os.urandom(100))  # an older one
        with log.open("r+") as f:
            f.truncate(0)
        if not copy_kept:
            (tmp_path / "access.log.1").rename(tmp_path / "access.log.1.gz")
        append(log, line(GREEN) * 3)
        # With the copy, its 5 unread lines are read there; without it they are lost.
        want = 28 if copy_kept else 23
        await until(lambda: signal.lines["ok"] == want, f"{want} lines", show=signal.status)
        await _next_poll(signal)
        await _next_poll(signal)
        assert signal.lines["ok"] == want
        assert signal.truncations == 1
        assert signal.lines["unparsed"] == 0
        assert attributed(signal, "green") == 3


async def test_truncation_before_the_first_new_line_is_noticed(tmp_path: Path) -> None:
    """Started at the end of a file that is truncated and rewritten past that end."""
    log = tmp_path / "access.log"
    log.write_text(line() * 2)
    async with running(spec(log, poll_interval_s=1.0)) as signal:
        await _next_poll(signal)
        with log.open("r+") as f:
            f.truncate(0)
        append(log, line(GREEN) * 10)
        await until(
            lambda: signal.lines["ok"] == 10, "the 10 lines written since", show=signal.status
        )
        assert signal.truncations == 1
        assert attributed(signal, "green") == 10


async def test_truncated_and_rewritten_past_the_position_between_polls(tmp_path: Path) -> None:
    """copytruncate under heavy traffic: the file is longer than where we were, yet new."""
    log = tmp_path / "access.log"
    log.write_text("")
    async with running(spec(log, poll_interval_s=1.0)) as signal:
        append(log, line() * 2)
        await until(lambda: signal.lines["ok"] == 2, "2 lines", show=signal.status)
        # Counted lines may still be inside that poll's read loop: let the poll end, so that
        # the next one, a second away, is the first to see the file rewritten.
        await _next_poll(signal)
        with log.open("r+") as f:
            f.truncate(0)
        append(log, line(GREEN) * 10)
        await until(
            lambda: signal.lines["ok"] == 12, "the 10 lines written since", show=signal.status
        )
        assert signal.truncations == 1
        assert signal.lines["unparsed"] == 0
        assert attributed(signal, "green") == 10


async def test_deleted_file_is_followed_until_a_new_one_appears(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    async with running(spec(log)) as signal:
        with log.open("a") as nginx:
            log.unlink()
            nginx.write(line() * 3)
            nginx.flush()
            await until(
                lambda: signal.lines["ok"] == 3, "lines to the deleted file", show=signal.status
            )
            assert "gone from its path" in signal.state
        log.write_text(line(GREEN) * 2)
        await until(lambda: signal.lines["ok"] == 5, "the new file's lines", show=signal.status)
        assert attributed(signal, "green") == 2


async def test_partial_last_line_is_kept_until_completed(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    async with running(spec(log)) as signal:
        whole = line(GREEN, "502")
        append(log, whole[:40])
        polls = signal.polls
        await until(lambda: signal.polls >= polls + 3, "three polls", show=signal.status)
        assert sum(signal.lines.values()) == 0
        append(log, whole[40:])
        await until(lambda: signal.lines["ok"] == 1, "the completed line", show=signal.status)
        assert signal.requests["green", "5xx"] == 1
        assert sum(signal.lines.values()) == 1


@pytest.mark.parametrize("pieces", [1, 40])
async def test_megabyte_line_is_skipped_with_a_bounded_buffer(tmp_path: Path, pieces: int) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    async with running(spec(log)) as signal:
        huge = '{"upstream_addr":"' + BLUE + '","status":"200","pad":"' + "x" * 1_000_000 + '"}\n'
        step = len(huge) // pieces + 1
        for start in range(0, len(huge), step):
            append(log, huge[start : start + step])
            if pieces > 1:
                await _next_poll(signal)
        append(log, line(GREEN))
        await until(
            lambda: signal.lines["ok"] == 1, "the line after the huge one", show=signal.status
        )
        assert signal.lines["oversize"] == 1
        assert signal.lines["unparsed"] == 0
        assert attributed(signal, "blue") == 0
        assert signal.max_buffered <= signal.spec.max_line_bytes + READ_CHUNK


async def test_binary_junk_is_unparsed_and_attributed_to_nobody(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    junk = [
        os.urandom(300).replace(b"\n", b"!") + b"\n",
        b"\x00\x00\x00\n",
        b"\xff\xfe{\n",
        b"\n",
        # Valid JSON whose address holds bytes that are not UTF-8: no color has it.
        line(BLUE).encode().replace(BLUE.encode(), b"127.0.0.1:80\xff01"),
    ]
    async with running(spec(log)) as signal:
        append(log, b"".join(junk) + line(BLUE).encode())
        await until(lambda: sum(signal.lines.values()) == 6, "all 6 lines", show=signal.status)
        assert signal.lines["unparsed"] == 4
        assert signal.lines["unattributed"] == 1
        assert signal.lines["ok"] == 1
        assert attributed(signal, "blue") == 1
        assert attributed(signal, "green") == 0


FORGED = [
    '{"upstream_addr":"' + BLUE + '","status":["200"]}',
    '{"upstream_addr":"' + BLUE + '","status":"abc"}',
    '{"upstream_addr":"' + BLUE + '","status":"999"}',
    '{"upstream_addr":"' + BLUE + '","status":"20"}',
    '{"upstream_addr":"' + BLUE + '","status":"٢٠٠"}',  # Arabic-Indic digits
    '{"upstream_addr":"' + BLUE + '","status":true}',
    '{"upstream_addr":"' + BLUE + '","status":null}',
    '{"upstream_addr":"' + BLUE + '","upstream_status":"-","status":"-"}',
    '{"upstream_addr":8001,"status":"200"}',
    '{"upstream_addr":["' + BLUE + '"],"status":"200"}',
    '{"status":"200"}',
    '{"upstream_addr":"' + BLUE + '","status":"200","msec":"nan"}',
    '{"upstream_addr":"' + BLUE + '","status":"200","msec":"inf"}',
    '{"upstream_addr":"' + BLUE + '","status":"200","msec":{}}',
    '{"upstream_addr":"' + BLUE + '","status":"200","request_time":"-1",'
    '"upstream_response_time":"-"}',
    '{"upstream_addr":"' + BLUE + '","status":"200","upstream_response_time":"fast"}',
    # Finite, and no time a request took (past a day; 1e308 s overflowed the bucketing).
    '{"upstream_addr":"' + BLUE + '","status":"200","request_time":"1e308",'
    '"upstream_response_time":"1e308"}',
    '{"upstream_addr":"' + BLUE + '","status":"200","request_time":"1e20",'
    '"upstream_response_time":"-"}',
    '{"upstream_addr":"' + BLUE + '","status":"200"} trailing',
    '["' + BLUE + '", "200"]',
    '"' + BLUE + '"',
    "[" * 16_000,
    "{" * 16_000,
]


async def test_forged_fields_are_unparsed_and_never_attributed(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    async with running(spec(log)) as signal:
        append(log, "\n".join(FORGED) + "\n")
        await until(
            lambda: signal.lines["unparsed"] == len(FORGED), "every forged line", show=signal.status
        )
        assert signal.lines["ok"] == 0
        assert not any(signal.requests.values())
        reading = signal.reading("blue", time.monotonic())
        assert reading is not None
        assert reading.samples == 0


@pytest.mark.parametrize("denied", ["file", "directory"])
def test_permission_denied_is_a_state_not_a_crash(denied: str) -> None:
    """As a user who may not read the file (root may read anything, so: nobody)."""
    shared = Path(tempfile.mkdtemp(prefix="guardd-perm-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        log = shared / "access.log"
        log.write_text(line() * 3)
        # A file nobody may open, or a directory nobody may enter (the file cannot be seen).
        (log if denied == "file" else shared).chmod(0o000 if denied == "file" else 0o700)
        with _as_unprivileged(log) as child:
            assert child.stdout is not None
            seen = json.loads(child.stdout.readline())
            assert seen["problem"] == "permission denied"
            assert seen["state"] == f"permission denied: {log}"
            assert seen["lines"]["ok"] == 0
            # Fixed by the operator: the signal reads on, from the end (the 3 lines are history).
            (log if denied == "file" else shared).chmod(0o644 if denied == "file" else 0o755)
            seen = json.loads(child.stdout.readline())
            assert seen["problem"] is None
            assert seen["state"] == f"reading {log}"
            assert seen["lines"]["ok"] == 0
            append(log, line(GREEN) * 2)
            seen = json.loads(child.stdout.readline())
            assert seen["lines"]["ok"] == 2
            assert child.wait(timeout=30) == 0
    finally:
        shutil.rmtree(shared)


_CHILD = """
import json, sys, time, anyio
from guardd.clock import SystemClock
from guardd.signals.access_log import AccessLogSignal, AccessLogSpec

async def main(path):
    spec = AccessLogSpec(source="file:" + path, addresses={"blue": ("127.0.0.1:8001",),
                         "green": ("127.0.0.1:8002",)}, poll_interval_s=0.05)
    signal = AccessLogSignal("web", spec, SystemClock())
    async with anyio.create_task_group() as tg:
        await tg.start(signal.run)
        with anyio.fail_after(30):
            while signal.problem != "permission denied":
                await anyio.sleep(0.02)
            print(json.dumps(signal.status()), flush=True)
            while signal.problem is not None:
                await anyio.sleep(0.02)
            print(json.dumps(signal.status()), flush=True)
            while signal.lines["ok"] < 2:
                await anyio.sleep(0.02)
            print(json.dumps(signal.status()), flush=True)
        tg.cancel_scope.cancel()

anyio.run(main, sys.argv[1])
"""


def _unprivileged_python() -> tuple[str, dict[str, str], dict[str, object]]:
    """An interpreter, environment and Popen user that cannot bypass file modes."""
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{PROJECT}:{site}"}
    if os.geteuid() != 0:
        return sys.executable, env, {}
    # root reads a mode-000 file anyway: run the signal as nobody, with an interpreter nobody
    # may execute (the dev venv's may live under root's home).
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import anyio, guardd.signals"],
                env=env,
                user="nobody",
                capture_output=True,
                check=False,
                timeout=60,
            )
        except PermissionError:
            continue  # nobody may not execute it
        if probe.returncode == 0:
            return candidate, env, {"user": "nobody", "group": "nogroup"}
    raise AssertionError("no interpreter that nobody can run guardd with")


def _as_unprivileged(log: Path) -> subprocess.Popen[str]:
    python, env, who = _unprivileged_python()
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [python, "-c", _CHILD, str(log)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        **who,
    )


# ---- parsing and attribution (no I/O) ------------------------------------------------------


@pytest.mark.parametrize(
    ("age_s", "late"), [(0.0, False), (59.0, False), (61.0, True), (86400.0, True)]
)
def test_a_request_that_ended_before_the_window_began_is_late_in_no_window(
    age_s: float, late: bool
) -> None:
    """A line read now whose request ended `age_s` ago, with a 60 s window: within it, it
    counts at its own time; older (a buffered log, lines appended out of order), it is no
    evidence of now: counted `late`, in no window, never placed at the window's edge."""
    clock = FixedClock()
    signal = AccessLogSignal("web", spec(Path("/nonexistent"), window_s=60.0), clock)
    signal.ingest([line(GREEN, "502", msec=clock.wall_s - age_s).rstrip("\n")])
    assert signal.lines["late"] == int(late)
    assert signal.lines["ok"] == int(not late)
    assert signal.requests["green", "5xx"] == int(not late)


def test_attribution_follows_the_last_upstream_that_answered() -> None:
    clock = FixedClock()
    signal = AccessLogSignal("web", spec(Path("/nonexistent")), clock)
    raw = [
        line(f"{GREEN}, {BLUE}", "200", upstream_status="502, 200"),  # retried on blue
        line(f"{BLUE} : {GREEN}", "503", upstream_status="200 : 503"),  # internal redirect
        line(f"{GREEN}, {BLUE} : {GREEN}", "404", upstream_status="504, 502 : 404"),
        line("10.9.9.9:80", "200"),  # neither color: never guessed
        line("-", "301", upstream_status="-"),  # nginx answered itself
        line(f"{BLUE}, 10.9.9.9:80", "200", upstream_status="502, 200"),  # answered elsewhere
        line(BLUE, "499", upstream_status="-"),  # client gone: $status stands
        line(BLUE, "200", urt="-", rt="0.250"),  # no upstream time: $request_time
    ]
    signal.ingest([r.rstrip("\n") for r in raw])
    assert signal.lines == {
        "ok": 5,
        "unparsed": 0,
        "unattributed": 3,
        "oversize": 0,
        "shed": 0,
        "late": 0,
    }
    assert signal.requests["blue", "2xx"] == 2
    assert signal.requests["green", "5xx"] == 1
    assert signal.requests["green", "4xx"] == 1
    assert signal.requests["blue", "4xx"] == 1
    assert attributed(signal, "green") == 2


def test_a_team_json_shape_is_read_through_the_field_map() -> None:
    clock = FixedClock()
    mapped = spec(
        Path("/nonexistent"),
        fields={"upstream_addr": "upstream", "status": "code", "request_time": "took"},
    )
    signal = AccessLogSignal("web", mapped, clock)
    signal.ingest(
        [
            json.dumps({"upstream": GREEN, "code": 503, "took": 0.25}),
            json.dumps({"upstream": BLUE, "code": "200", "took": "0.010"}),
            json.dumps({"upstream_addr": BLUE, "status": "200"}),  # the default names: not ours
        ]
    )
    assert signal.lines["ok"] == 2
    assert signal.lines["unparsed"] == 1
    reading = signal.reading("green", clock.mono)
    assert reading is not None
    assert reading.stats["mean_ms"] == 250.0


def test_msec_places_the_request_in_monotonic_time_within_the_window() -> None:
    clock = FixedClock(mono=5000.0, wall=1_800_000_000.0)
    signal = AccessLogSignal("web", spec(Path("/nonexistent"), window_s=60.0), clock)
    signal.ingest(
        [
            line(BLUE, msec=clock.wall_s - 30.0).rstrip(),  # logged 30 s ago
            line(GREEN, msec=clock.wall_s + 3600.0).rstrip(),  # from the future: now
            line(GREEN, msec=clock.wall_s - 86400.0).rstrip(),  # a day old: the window's edge
        ]
    )
    blue = signal.reading("blue", 5000.0)
    assert blue is not None
    assert blue.last_at == pytest.approx(4970.0, abs=0.01)
    assert blue.samples == 1
    later = signal.reading("blue", 5031.0)
    assert later is not None
    assert later.samples == 0  # 61 s old by then
    green = signal.reading("green", 5000.0)
    assert green is not None
    assert green.last_at == 5000.0


def test_beyond_the_budget_lines_are_shed_and_counted() -> None:
    clock = FixedClock()
    signal = AccessLogSignal("web", spec(Path("/nonexistent"), max_lines_per_s=100), clock)
    batch = [line(BLUE).rstrip()] * 70
    signal.ingest(batch)
    signal.ingest(batch)
    assert signal.lines["ok"] == 100
    assert signal.lines["shed"] == 40
    clock.mono += 1.0  # the next second: a fresh budget
    signal.ingest(batch)
    assert signal.lines["ok"] == 170
    assert signal.lines["shed"] == 40


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source": "tcp:/x"}, "source: 'tcp:/x' is neither"),
        ({"source": "file:relative.log"}, "source: 'relative.log' is not an absolute path"),
        ({"addresses": {}}, "addresses: name at least one"),
        ({"addresses": {"blue": BLUE}}, "addresses: blue: a non-empty list"),
        ({"addresses": {"blue": (BLUE,), "green": (BLUE,)}}, "is in both blue and green"),
        ({"addresses": {"blue": (f"{BLUE}, {GREEN}",)}}, "is not one host:port"),
        ({"fields": {"color": "c"}}, "fields: 'color' is not one of"),
        ({"fields": {"status": ""}}, "fields: status: the JSON key"),
        ({"window_s": 0}, "window_s: must be a positive"),
        ({"stale_after_s": float("nan")}, "stale_after_s: must be a positive"),
        ({"max_line_bytes": 10}, "max_line_bytes: must lie within"),
        ({"max_lines_per_s": 0}, "max_lines_per_s: must be at least 1"),
    ],
)
def test_a_bad_spec_says_which_key_and_why(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        spec(Path("/var/log/x.log"), **overrides)


# ---- the syslog socket -------------------------------------------------------------------


def syslog(text: str, host: bool = False) -> bytes:
    return f"<190>Nov 30 16:23:31 {'web1 ' if host else ''}nginx: {text.rstrip()}".encode()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A unix socket path must stay under 108 bytes: pytest's tmp_path can be longer.
    where = Path(tempfile.mkdtemp(prefix="guardd-sock-", dir="/tmp"))
    yield where
    shutil.rmtree(where)


async def test_syslog_datagrams_are_counted_and_junk_is_not(sock_dir: Path) -> None:
    path = sock_dir / "web.access.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))  # a stale socket file left by a previous run
    stale.close()
    source = AccessLogSpec(source=f"syslog:{path}", addresses=ADDRESSES, max_line_bytes=1024)
    async with running(source) as signal:
        assert signal.state == f"listening on {path}"
        assert path.stat().st_mode & 0o777 == 0o666
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as nginx:
            nginx.connect(str(path))
            for datagram in (
                syslog(line(BLUE)),
                syslog(line(GREEN, "502"), host=True),
                syslog("not json"),
                b"no header at all " + line(BLUE).encode(),
                syslog(line(BLUE)) + b"x" * 5000,
                os.urandom(200),
            ):
                nginx.send(datagram)
            await until(
                lambda: sum(signal.lines.values()) == 6, "all 6 datagrams", show=signal.status
            )
        assert signal.lines["ok"] == 2
        assert signal.lines["oversize"] == 1
        assert signal.lines["unparsed"] == 3
        assert signal.requests["green", "5xx"] == 1
    assert not path.exists()


async def test_syslog_refuses_to_replace_a_file_that_is_not_a_socket(sock_dir: Path) -> None:
    path = sock_dir / "web.access.sock"
    path.write_text("precious")
    source = AccessLogSpec(source=f"syslog:{path}", addresses=ADDRESSES)
    async with running(source) as signal:
        assert signal.problem == "exists and is not a socket"
        assert signal.state == f"cannot bind {path}: exists and is not a socket"
        path.unlink()
        await until(
            lambda: signal.problem is None,
            "the socket bound once the path is free",
            show=signal.status,
        )
        assert path.is_socket()
    assert not path.exists()


async def test_nothing_blocks_the_loop_for_long_under_a_flood(tmp_path: Path) -> None:
    """200k lines at once are parsed in batches: another task keeps getting turns."""
    log = tmp_path / "access.log"
    log.write_text("")
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            await anyio.lowlevel.checkpoint()
            turns += 1

    async with (
        running(spec(log, max_lines_per_s=1_000_000)) as signal,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(ticker)
        append(log, line() * 200_000)
        await until(
            lambda: signal.lines["ok"] == 200_000, "the flood", within=120, show=signal.status
        )
        tg.cancel_scope.cancel()
    # One turn per batch at the least.
    assert turns >= 200_000 // 1024


# ---- chunking (hypothesis) ------------------------------------------------------------------

_KINDS = st.sampled_from(["blue", "green", "retry", "unknown", "junk", "forged", "empty", "huge"])


def _raw(kind: str) -> bytes:
    return {
        "blue": line(BLUE).encode(),
        "green": line(GREEN, "503").encode(),
        "retry": line(f"{GREEN}, {BLUE}", "200", upstream_status="502, 200").encode(),
        "unknown": line("10.0.0.1:80").encode(),
        "junk": b"\xff\xfe\x00 not json \xc3\n",
        "forged": b'{"upstream_addr":"' + BLUE.encode() + b'","status":[200]}\n',
        "empty": b"\n",
        "huge": b'{"pad":"' + b"y" * 3000 + b'"}\n',
    }[kind]


@settings(max_examples=150)
@given(st.lists(_KINDS, max_size=60), st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_where_reads_end_changes_nothing(kinds: list[str], cuts: list[int]) -> None:
    """Lines fed in arbitrary pieces count exactly as the same lines fed whole."""
    data = b"".join(_raw(k) for k in kinds)
    whole = AccessLogSignal("web", spec(Path("/nonexistent"), max_line_bytes=1024), FixedClock())
    whole.ingest(data.decode("utf-8", "surrogateescape").split("\n")[:-1] if data else [])
    pieces = AccessLogSignal("web", spec(Path("/nonexistent"), max_line_bytes=1024), FixedClock())
    tail = _Tail(-1, (0, 0), 0, 0.0)
    start, i = 0, 0
    while start < len(data):
        size = cuts[i % len(cuts)]
        pieces.ingest(pieces._split(tail, data[start : start + size]))
        start, i = start + size, i + 1
        assert len(tail.pending) <= 1024
    assert pieces.lines == whole.lines
    assert pieces.requests == whole.requests
    assert pieces.lines["oversize"] == kinds.count("huge")
    assert pieces.lines["ok"] == sum(k in ("blue", "green", "retry") for k in kinds)
    assert pieces.requests["blue", "2xx"] == sum(k in ("blue", "retry") for k in kinds)
    assert pieces.max_buffered <= 1024 + max(cuts)


async def test_syslog_socket_group_gets_mode_0660(sock_dir: Path) -> None:
    path = sock_dir / "web.access.sock"
    source = AccessLogSpec(source=f"syslog:{path}", addresses=ADDRESSES, socket_group="nogroup")
    async with running(source) as signal:
        assert signal.problem is None
        st = path.lstat()
        assert st.st_mode & 0o777 == 0o660
        assert st.st_gid == grp.getgrnam("nogroup").gr_gid


async def test_syslog_unknown_group_is_a_problem_not_a_crash(sock_dir: Path) -> None:
    path = sock_dir / "web.access.sock"
    source = AccessLogSpec(
        source=f"syslog:{path}", addresses=ADDRESSES, socket_group="no-such-group-here"
    )
    async with running(source) as signal:
        assert signal.problem == "no group 'no-such-group-here'"
        assert not path.exists()  # nothing half-made left behind
