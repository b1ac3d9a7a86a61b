"""guardctl's watching and waiting, and the incident timeline, against a live daemon guarding
real upstreams behind a real nginx: `status --watch` in a real terminal (tmux) and in a
pipe, `promote --wait` and `wait` as a CI step runs them, `incident` with guardd down."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from guardd.render import _duration
from tests.harness.daemon import GUARDCTL, Lab, MakeLab, guardctl, wait_until

pytestmark = pytest.mark.nginx

TMUX = shutil.which("tmux")


def ctl(lab: Lab, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """guardctl pointed at the lab's config (which names its socket and lock file)."""
    return guardctl("--config", str(lab.config_path), *argv, **kw)


def ctl_argv(lab: Lab, *argv: str) -> list[str]:
    return [str(GUARDCTL), "--config", str(lab.config_path), *argv]


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# ---- status --watch ----------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket), so tests never touch anyone's sessions."""

    def __init__(self) -> None:
        assert TMUX, "tmux is not installed: packaging/bootstrap.sh system installs it"
        self.tmux = TMUX
        self.name = f"guardd-{uuid.uuid4().hex[:8]}"

    def run(self, *argv: str) -> str:
        done = subprocess.run(
            [self.tmux, "-L", self.name, *argv],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return done.stdout

    def start(self, window: str, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        # The shell stays after guardctl so that its exit code can be read off the pane.
        shell = f"env {exports} {command}; echo GUARDCTL-EXIT=$?; sleep 600"
        if window == "main":
            self.run("new-session", "-d", "-s", "main", "-x", "120", "-y", "45", shell)
        else:
            self.run("new-window", "-t", "main", "-n", window, shell)

    def screen(self, target: str, *, escapes: bool = False) -> str:
        return self.run("capture-pane", "-p", *(["-e"] if escapes else []), "-t", target)

    def close(self) -> None:
        subprocess.run(
            [self.tmux, "-L", self.name, "kill-server"], capture_output=True, check=False
        )


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    yield t
    t.close()


def test_watch_in_a_terminal_shows_a_rollback_as_it_happens(make_lab: MakeLab, tmux: Tmux) -> None:
    lab: Lab = make_lab(qos__window="60s")
    d = lab.daemon()
    env = {"TERM": "xterm-256color", "PATH": os.environ["PATH"]}
    command = " ".join(ctl_argv(lab, "status", "--watch", "--interval", "200ms"))
    tmux.start("main", command, env)
    wait_until(lambda: "steady" in tmux.screen("main"), 30, "the watch to show steady")
    assert "\x1b[" in tmux.screen("main", escapes=True), "colors on a terminal"
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")

    def shows_the_rollback() -> bool:
        screen = tmux.screen("main")
        return "guard_window" in screen and "active         blue" in screen and "HELD" in screen

    wait_until(shows_the_rollback, 30, "the watch to show the rollback and the lock")
    screen = tmux.screen("main")
    # Redrawn in place: one table on the screen, not a scroll of them.
    assert screen.count("COLOR") == 1, screen
    assert "rollback_completed" in screen or "qos_locked" in screen
    tmux.run("send-keys", "-t", "main", "C-c")
    wait_until(lambda: "GUARDCTL-EXIT=130" in tmux.screen("main"), 30, "exit 130 on Ctrl-C")
    # NO_COLOR: the same live view without a single color.
    tmux.start("plain", command, {**env, "NO_COLOR": "1"})
    wait_until(lambda: "guard_window" in tmux.screen("plain"), 30, "the NO_COLOR view")
    assert "\x1b[3" not in tmux.screen("plain", escapes=True)
    # guardd goes away: the watch says so and exits 3.
    d.stop()
    wait_until(lambda: "GUARDCTL-EXIT=3" in tmux.screen("plain"), 30, "exit 3 with guardd gone")
    assert "UNKNOWN" in tmux.screen("plain")


def test_watch_off_a_terminal_prints_each_change_as_a_line(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    out = tmp_path / "watch.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            ctl_argv(lab, "status", "--watch", "--interval", "100ms"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "NO_COLOR"},
        )
        try:
            wait_until(lambda: "state=steady active=green" in out.read_text(), 30, "first line")
            lab.green.set_mode("http_503")
            d.wait_event("qos_released", timeout=60)
            wait_until(
                lambda: "journal: " in out.read_text() and "qos_released" in out.read_text(),
                30,
                "the release as a line",
            )
            d.stop()
            assert proc.wait(30) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out.read_text()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("UNKNOWN: guardd lab")
    pictures = [line.split(" ", 1)[1] for line in lines[:-1] if " journal: " not in line]
    # A picture line only when the picture changed.
    assert all(a != b for a, b in itertools.pairwise(pictures)), pictures
    assert pictures[0].startswith("state=steady active=green blue=yes")
    assert any("green=NO" in p for p in pictures)
    assert any(
        p.startswith("state=guard_window active=blue") and "qos=locked" in p for p in pictures
    )
    assert pictures[-1].startswith("state=steady active=blue") and "qos=free" in pictures[-1]
    # Every journal event since the watch began is a line, in the journal's order, even
    # those that came and went between two rounds.
    journaled = [
        line.split(" journal: ", 1)[1].split()[1] for line in lines if " journal: " in line
    ]
    expected = [e["event"] for e in d.events() if e["event"] != "started"]
    assert journaled == expected[: len(journaled)]
    for name in ("rollback_started", "rollback_completed", "qos_locked", "qos_released"):
        assert name in journaled, (name, text)
    # The states come in the order they happened.
    order = [text.index(s) for s in ("state=steady", "green=NO", "state=guard_window")]
    assert order == sorted(order) and text.rindex("state=steady") > order[-1]


# ---- waiting in CI -----------------------------------------------------------------------


def test_promote_wait_as_a_ci_step(make_lab: MakeLab, tmp_path: Path) -> None:
    lab: Lab = make_lab(active="blue", policy__rollback_to="previous")
    d = lab.daemon()
    assert ctl(lab, "wait", "healthy", "--timeout", "1m").returncode == 0
    # Green redeployed: its probes fail for a while, then pass.
    lab.green.set_mode("http_503")
    wait_until(
        lambda: (
            json.loads(ctl(lab, "status", "--json").stdout)["upstreams"]["green"]["healthy"]
            is False
        ),
        30,
        "green seen failing",
    )
    err = tmp_path / "promote.err"
    with err.open("w") as sink:
        proc = subprocess.Popen(
            ctl_argv(lab, "promote", "--wait", "2m", "--reason", "release 4"),
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        try:
            wait_until(lambda: "waiting" in err.read_text(), 30, "the reason it waits")
            assert proc.poll() is None
            lab.green.set_mode("ok")
            stdout, _ = proc.communicate(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err.read_text()
    said = err.read_text()
    assert "green is not ready for promotion: it needs " in said, said
    assert "5 passing probes in a row" in said, said
    assert "green" in stdout
    promoted = d.wait_event("promote")
    assert promoted["to"] == "green" and promoted["reason"] == "release 4"
    # The standby (now blue) never recovers: a short wait gives up with the reason.
    lab.blue.set_mode("http_503")
    wait_until(
        lambda: (
            json.loads(ctl(lab, "status", "--json").stdout)["upstreams"]["blue"]["healthy"] is False
        ),
        30,
        "blue seen failing",
    )
    gave_up = ctl(lab, "promote", "--wait", "3s")
    assert gave_up.returncode == 1
    assert (
        "gave up after 3s: refused: blue is not ready for promotion: it needs 5 passing probes"
        " in a row (now 0)" in gave_up.stderr
    )
    assert [e["event"] for e in d.events()].count("promote") == 1
    # switch --wait too: blue is unhealthy until the deadline.
    refused = ctl(lab, "switch", "blue", "--wait", "2s")
    assert refused.returncode == 1 and "blue is unhealthy" in refused.stderr


def test_wait_for_steady_and_unlocked(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(qos__window="3s")
    d = lab.daemon()
    assert ctl(lab, "wait", "steady", "--timeout", "30s").returncode == 0
    assert ctl(lab, "pause", "--reason", "maintenance").returncode == 0
    paused = ctl(lab, "wait", "steady", "--timeout", "1500ms")
    assert paused.returncode == 1 and "state is paused" in paused.stderr
    assert ctl(lab, "resume").returncode == 0
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    unlocked = ctl(lab, "wait", "unlocked", "--timeout", "1m")
    assert unlocked.returncode == 0, unlocked.stderr
    assert "waiting" in unlocked.stderr and "QoS lock is held" in unlocked.stderr
    assert any(e["event"] == "qos_released" for e in d.events())
    assert ctl(lab, "wait", "healthy", "--timeout", "30s").returncode == 0
    d.stop()
    gone = ctl(lab, "wait", "steady", "--timeout", "1s")
    assert gone.returncode == 3 and "not answering" in gone.stderr


# ---- incident ----------------------------------------------------------------------------


def test_incident_after_a_real_rollback_with_guardd_down(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(active="blue", policy__rollback_to="previous", qos__window="4s")
    d = lab.daemon()
    assert ctl(lab, "promote", "--wait", "1m", "--reason", "release 4").returncode == 0
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    assert ctl(lab, "pause", "--reason", "looking at green").returncode == 0
    assert ctl(lab, "resume").returncode == 0
    d.wait_event("qos_released", timeout=60)
    assert d.stop() == 0
    assert ctl(lab, "status").returncode == 3  # guardd is down

    journal = d.events()
    by_name = {e["event"]: e for e in journal}
    started, completed = by_name["rollback_started"], by_name["rollback_completed"]
    locked, released = by_name["qos_locked"], by_name["qos_released"]
    inc_id = f"INC-{started['ts'][:10].replace('-', '')}-1"

    as_json = ctl(lab, "incident", "--last", "--json")
    assert as_json.returncode == 0, as_json.stderr
    found = json.loads(as_json.stdout)
    assert found["id"] == inc_id and found["rollback_id"] == started["id"]
    assert (found["from"], found["to"], found["outcome"]) == ("green", "blue", "recovered")
    assert found["rule"] == started["evidence"]["rule"] and found["severity"] == "P0"
    assert found["times"] == {
        "change": by_name["promote"]["ts"],
        "start": found["times"]["start"],
        "detected": started["ts"],
        "rolled_back": completed["ts"],
        "failed": None,
        "locked": locked["ts"],
        "recovered": released["ts"],
    }
    spans = found["durations_s"]
    start = found["times"]["start"]
    assert spans["time_to_detect"] == round(ts(started["ts"]) - ts(start), 3)
    assert spans["time_to_recover"] == round(ts(completed["ts"]) - ts(started["ts"]), 3)
    assert spans["time_under_lock"] == round(ts(released["ts"]) - ts(locked["ts"]), 3)
    assert spans["switch"] == round(completed["duration_ms"] / 1000, 3)
    events = [s["event"] for s in found["steps"]]
    for name in (
        "promote",
        "rollback_started",
        "rollback_completed",
        "qos_locked",
        "paused",
        "resumed",
        "qos_released",
    ):
        assert name in events, (name, events)
    operators = [s for s in found["steps"] if s["kind"] == "operator"]
    assert {s["event"] for s in operators} == {"paused", "resumed"}
    assert all(s["by"].startswith("uid:") for s in operators)

    markdown = ctl(lab, "incident", "--last", "--markdown")
    assert markdown.returncode == 0, markdown.stderr
    text = markdown.stdout
    assert text.startswith(f"**{inc_id}: lab rolled back green -> blue (P0, ")
    for label in ("Incident", "Start", "Detection", "Rollback", "Recovery", "Duration", "Cause"):
        assert f"- **{label}:**" in text
    for when in (started, completed, locked, released, by_name["promote"]):
        assert f"`{when['ts'][11:23]}`" in text
    assert f"time to detect {_duration(spans['time_to_detect'])}" in text
    assert f"time to roll back {_duration(spans['time_to_recover'])}" in text
    assert f"time under lock {_duration(spans['time_under_lock'])}" in text
    assert f"decision - rollback_started green->blue P0 rule {found['rule']}" in text
    assert "operator - paused by uid:" in text
    # The same incident by its rollback id, a prefix of it, and its INC id.
    for key in (started["id"], started["id"][:8], inc_id):
        again = ctl(lab, "incident", key, "--json")
        assert json.loads(again.stdout)["id"] == inc_id
    missing = ctl(lab, "incident", "INC-19990101-1")
    assert missing.returncode == 1 and "no incident INC-19990101-1" in missing.stderr
