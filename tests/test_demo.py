"""`guardd demo` as a newcomer runs it: a real subprocess, real nginx, real rollback, clean exit."""

from __future__ import annotations

import http.client
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from guardd._demo.nginx import LOG_FORMAT
from guardd._demo.servers import Upstream
from guardd._demo.view import Frame, View
from tests.harness.nginx import nginx_binary
from tests.harness.procs import INTERRUPTIBLE, is_gone

DEMO = [sys.executable, "-m", "guardd.cli", "demo"]
REPO = Path(__file__).resolve().parents[1]
# Generous bounds for a slow, shared CI machine; the demo bounds itself by --seconds.
RUN_TIMEOUT = 180


def demo_env(tmp_path: Path, *, with_nginx: bool) -> dict[str, str]:
    """The environment of a demo run: its workspace under tmp_path, nginx on PATH or not."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    if with_nginx:
        dirs.insert(0, str(Path(nginx_binary()).parent))
    else:
        dirs = [d for d in dirs if not (Path(d) / "nginx").exists()]
        dirs.insert(0, str(Path(sys.executable).parent))
    env = {**os.environ, "PATH": os.pathsep.join(dirs), "TMPDIR": str(tmp_path), "NO_COLOR": "1"}
    env.pop("GUARDD_CONFIG", None)
    return env


def run_demo(tmp_path: Path, *, with_nginx: bool) -> str:
    """Run a 30-second demo to its end; return what it printed, having checked it passed."""
    done = subprocess.run(
        [*DEMO, "--seconds", "30"],
        capture_output=True,
        text=True,
        env=demo_env(tmp_path, with_nginx=with_nginx),
        cwd=REPO,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (a workspace path)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and not is_gone(int(cmdline.parent.name)):
            found.append(args)
    return found


def assert_nothing_left(output: str, tmp_path: Path) -> None:
    """guardd and nginx are gone and the workspace is removed."""
    workspace = re.search(r"workspace\s+(\S+?)/? ", output)
    assert workspace, output
    assert not Path(workspace[1]).exists()
    assert not list(tmp_path.glob("guardd-demo-*"))
    guardd_pid = re.search(r"guardd is ready \(pid (\d+)", output)
    assert guardd_pid, output
    assert is_gone(int(guardd_pid[1]))
    if nginx_pid := re.search(r"master pid (\d+)", output):
        assert is_gone(int(nginx_pid[1]))
    assert processes_mentioning(workspace[1]) == []


@pytest.mark.nginx
def test_demo_rolls_green_back_to_blue_behind_a_real_nginx(tmp_path: Path) -> None:
    out = run_demo(tmp_path, with_nginx=True)
    assert "master pid" in out  # a real nginx, not the fallback
    assert "journal: rollback_started green -> blue [P0]" in out
    assert "journal: rollback_completed green -> blue" in out
    assert "nginx now serves blue" in out
    assert "demo_active.conf -> demo_blue.conf" in out
    assert "QoS lock taken" in out and '"by": "guardd"' in out
    assert '"event": "rollback_completed"' in out  # the webhook's body
    # The real guardctl's table: blue marked active, the lock held.
    assert re.search(r"^\*\s+blue\s+yes", out, re.MULTILINE), out
    assert re.search(r"^active\s+blue \(standby green\)", out, re.MULTILINE), out
    assert re.search(r"^qos lock\s+HELD", out, re.MULTILINE), out
    assert "demo passed" in out
    assert "\x1b[" not in out  # NO_COLOR, and no live table on a pipe
    assert_nothing_left(out, tmp_path)


@pytest.mark.nginx
def test_demo_rolls_back_on_real_traffic_while_the_probes_pass(tmp_path: Path) -> None:
    out = run_demo(tmp_path, with_nginx=True)
    assert re.search(r"traffic\s+GET http://127\.0\.0\.1:\d+/api/orders at 50 req/s", out), out
    assert "green's /healthz still answers 200" in out
    # The traffic rule fired, with the access log's figures, not a probe rule.
    started = re.search(
        r"journal: rollback_started green -> blue \[P0\] rule traffic\.error_ratio: "
        r"value ([\d.]+) >= threshold 0\.05 over (\d+) samples",
        out,
    )
    assert started, out
    assert float(started[1]) >= 0.05 and int(started[2]) >= 50
    # The probes of green never failed: only the traffic could have caught this.
    assert "green's probes meanwhile: healthy, 0 failed in a row" in out
    assert re.search(r"^traffic\.error_ratio\s+P0\s+error_ratio >= 0\.05", out, re.MULTILINE), out
    # What the load generator got: green's 500s before the rollback, blue's 200s after it.
    summary = re.search(r"traffic: (\d+) requests through nginx: (.*)$", out, re.MULTILINE)
    assert summary, out
    answers = dict(re.findall(r"(\w+ \w+) x (\d+)", summary[2]))
    assert int(answers.get("green 500", 0)) > 0 and int(answers.get("blue 200", 0)) > 0, out
    assert "blue 500" not in answers, out
    verdict = re.search(
        r"demo passed: green's /api failed while its /healthz stayed UP; rule "
        r"traffic\.error_ratio rolled back to blue on (\d+) real requests",
        out,
    )
    assert verdict and verdict[1] == started[2], out
    assert "traffic stopped" in out
    assert_nothing_left(out, tmp_path)


def test_demo_nginx_logs_in_the_packaged_log_format() -> None:
    packaged = (REPO / "packaging/nginx/guardd-log-format.conf").read_text()
    statement = [line for line in packaged.splitlines() if line and not line.startswith("#")]
    assert LOG_FORMAT.splitlines() == statement


def test_a_broken_api_fails_three_in_ten_while_healthz_stays_up() -> None:
    green = Upstream("green").start()
    try:

        def get(path: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", green.port, timeout=10)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                return response.status
            finally:
                conn.close()

        assert {get("/api/orders") for _ in range(10)} == {200}
        green.api_failing.set()
        api = [get("/api/orders") for _ in range(20)]
        assert api.count(500) == 6 and api.count(200) == 14, api
        assert {get("/healthz") for _ in range(10)} == {200}
    finally:
        green.close()


def test_demo_without_nginx_uses_the_state_file_switcher(tmp_path: Path) -> None:
    out = run_demo(tmp_path, with_nginx=False)
    assert "nginx not found on PATH" in out
    # No nginx, no access log: the probes catch a green that fails every request.
    assert "green now answers 503 to every request (P0 after 3 failed probes in a row)" in out
    assert "/api/orders" not in out and "traffic.error_ratio" not in out
    assert "demo passed: green failed, guardd moved traffic back to blue" in out
    assert "using the state-file switcher (deploy-state.json)" in out
    assert "journal: rollback_completed green -> blue" in out
    assert "deploy-state.json now says activeColor: blue" in out
    assert re.search(r"^active\s+blue", out, re.MULTILINE), out
    assert_nothing_left(out, tmp_path)


@pytest.mark.nginx
def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*INTERRUPTIBLE, *DEMO, "--seconds", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=demo_env(tmp_path, with_nginx=True),
    )
    assert proc.stdout is not None
    seen = []
    try:
        # The demo bounds itself by --seconds, so this loop ends at its EOF at the latest.
        for line in proc.stdout:
            seen.append(line)
            if "guardd is ready" in line:
                break
        assert any("guardd is ready" in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert "demo passed" not in out
    assert "guardd stopped" in out and "nginx stopped" in out
    assert_nothing_left(out, tmp_path)


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, to exercise the live table."""

    def isatty(self) -> bool:
        return True


def _screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`, for a writer of whole lines and the view's escapes."""
    lines: list[str] = [""]
    row, fresh = 0, True
    for piece in re.split(r"(\x1b\[\d*[A-Za-z]|\n)", raw):
        if piece == "\n":
            row, fresh = row + 1, True
            lines.extend([""] * (row + 1 - len(lines)))
        elif piece.startswith("\x1b["):
            code, count = piece[-1], int(piece[2:-1] or 1)
            if code == "F":  # to the start of the line `count` lines up
                row, fresh = max(0, row - count), True
            elif code == "J":  # erase from the cursor to the end of the screen
                del lines[row + 1 :]
                if fresh:
                    lines[row] = ""
            elif code not in "Km":
                raise AssertionError(f"unexpected escape {piece!r}")
        elif piece:
            # Text at a line's start overwrites it; \x1b[K then clears the rest.
            lines[row] = piece if fresh else lines[row] + piece
            fresh = False
    return lines


def _status(active: str, green_fails: int) -> dict[str, object]:
    up = {"healthy": True, "consecutive_failures": 0, "error_ratio": 0.0, "p95_ms": 1.5}
    return {
        "state": "steady",
        "active": active,
        "upstreams": {
            "blue": up,
            "green": {**up, "healthy": green_fails == 0, "consecutive_failures": green_fails},
        },
    }


def test_live_table_is_redrawn_in_place_under_the_narration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    stream = _Terminal()
    view = View(stream)
    assert view.live and not view.color
    view.update(Frame(_status("green", 0), "nginx -> green (200)", 3))
    view.say("injecting a failure")
    view.update(Frame(_status("green", 2), "nginx -> green (503)", 3))
    view.update(Frame(_status("blue", 3), "nginx -> blue (200)", 3))
    screen = [line for line in _screen(stream.getvalue()) if line.strip()]
    assert screen[0] == "injecting a failure"
    # One table, the latest: blue active, green down with 3 failures.
    assert sum("guardd" in line for line in screen) == 1
    assert "active blue" in screen[2] and "nginx -> blue (200)" in screen[2]
    assert re.search(r"green\s+NO\s+3", "\n".join(screen))
    assert "\x1b[3" not in stream.getvalue()  # NO_COLOR: cursor moves only, no colors
    view.close()
    assert [line for line in _screen(stream.getvalue()) if line.strip()] == ["injecting a failure"]


def test_plain_view_shows_the_load_without_a_line_for_every_new_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    stream = io.StringIO()
    view = View(stream)
    assert not view.live
    view.update(Frame(_status("green", 0), "nginx -> green (200)", 3, "/api 10 sent, 0 failed"))
    view.update(Frame(_status("green", 0), "nginx -> green (200)", 3, "/api 15 sent, 0 failed"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("load /api 10 sent, 0 failed"), lines
    # A change of state is news at once, with the latest counts.
    view.update(Frame(_status("green", 2), "nginx -> green (200)", 3, "/api 20 sent, 3 failed"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith("load /api 20 sent, 3 failed"), lines


def test_giving_up_in_the_traffic_scene_says_what_the_traffic_rule_saw() -> None:
    from guardd.demo import TRAFFIC_RULE, _rule_text  # noqa: PLC0415 - the one helper

    row = {"rule": TRAFFIC_RULE, "green": {"state": "inconclusive", "why": "12 of 50 samples"}}
    said = _rule_text({"rules": [{"rule": "p0_error_ratio"}, row]}, TRAFFIC_RULE)
    assert said.startswith(f"rule {TRAFFIC_RULE} on green: inconclusive (12 of 50 samples)")
    for status in ({}, {"rules": "junk"}, {"rules": [{"rule": TRAFFIC_RULE, "green": None}]}):
        assert _rule_text(status, TRAFFIC_RULE) == f"rule {TRAFFIC_RULE} not judged on green yet"
