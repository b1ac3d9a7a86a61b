"""guardctl against a live daemon guarding real upstreams behind a real nginx."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from guardd.statusview import DRY_RUN_WARNING
from tests.harness.daemon import GUARDCTL, Daemon, Lab, MakeLab, guardctl, log_lines, wait_until
from tests.harness.daemon import lab as lab_in
from tests.harness.jsondoc import json_object
from tests.harness.paths import shared_tmp_dir
from tests.harness.shell import redirected

pytestmark = pytest.mark.nginx


@pytest.fixture
def shared_run_dir() -> Iterator[Path]:
    """A run dir an unprivileged uid can reach (pytest's tmp dirs are 0700)."""
    with shared_tmp_dir("guardd-e2e-") as path:
        yield path


def ctl(lab: Lab, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """guardctl pointed at the lab's config (which names its socket and lock file)."""
    return guardctl("--config", str(lab.config_path), *argv, **kw)


def status(lab: Lab) -> dict[str, Any]:
    result = ctl(lab, "status", "--json")
    return json_object(result.stdout)


def test_status_exit_codes_and_shape(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK")
    doc = status(lab)
    assert doc["guard"] == "lab" and doc["active"] == "green" and doc["state"] == "steady"
    assert doc["upstreams"]["green"]["healthy"] is True
    assert set(doc) >= {
        "guard",
        "state",
        "active",
        "rollback_to",
        "paused",
        "qos",
        "upstreams",
        "last_event",
        "uptime_s",
        "version",
    }
    assert set(doc["upstreams"]["blue"]) >= {
        "healthy",
        "consecutive_failures",
        "error_ratio",
        "samples",
        "p50_ms",
        "p95_ms",
        "last_error",
        "last_probe_age_s",
    }
    human = ctl(lab, "status")
    assert "green" in human.stdout and "steady" in human.stdout
    # 1 WARNING: paused.
    assert ctl(lab, "pause", "--reason", "maintenance").returncode == 0
    assert ctl(lab, "status").returncode == 1
    assert ctl(lab, "resume").returncode == 0
    # 2 CRITICAL: hold (active failing, no safe target).
    lab.blue.set_mode("http_503")
    lab.green.set_mode("http_503")
    d.wait_event("hold")
    wait_until(lambda: ctl(lab, "status").returncode == 2, 20, "status CRITICAL")
    # 3 UNKNOWN: daemon down.
    assert d.stop() == 0
    down = ctl(lab, "status")
    assert down.returncode == 3 and "UNKNOWN" in down.stdout


def test_a_dry_run_guard_never_reads_as_protecting(make_lab: MakeLab, tmp_path: Path) -> None:
    """policy.dry_run: guardd acts on nothing, and every place an operator looks says so."""
    lab: Lab = make_lab(policy__dry_run=True)
    d = lab.daemon()
    assert lab.notify is not None
    lab.notify.wait_for(lambda m: m.startswith("STATUS=") and " dry-run" in m)
    doc = wait_until(lambda: (s := status(lab))["state"] == "steady" and s, 20, "steady")
    assert doc["dry_run"] is True
    assert DRY_RUN_WARNING in doc["warnings"]
    human = ctl(lab, "status")
    assert human.returncode == 1, "healthy but unprotected is a WARNING, not OK"
    assert "policy.dry_run is on" in human.stdout
    out = tmp_path / "watch.out"
    with out.open("w") as sink:
        watch = subprocess.Popen(
            [str(GUARDCTL), "--config", str(lab.config_path), "status", "--watch"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: "state=steady" in out.read_text(), 30, "a watch line")
        finally:
            watch.kill()
            watch.wait()
    assert " dry-run" in out.read_text().splitlines()[0]
    # What it says is what it does: a failing green is only told about.
    lab.green.set_mode("http_503")
    would = d.wait_event("alert", where=lambda e: str(e["reason"]).startswith("dry run:"))
    assert "would roll back green -> blue" in would["reason"]
    assert lab.nginx.served_color() is None  # still on the failing green, nothing moved
    assert not [e for e in d.events() if e["event"].startswith("rollback")]
    # Deploys wait while users meet a failing color guardd will not act on, as in a pause.
    locked = d.wait_event("qos_locked")
    assert locked["reason"].startswith("guardd is in dry run (policy.dry_run) while green fails")
    gate = ctl(lab, "qos", "status")
    assert gate.returncode == 1, gate
    refused = ctl(lab, "qos", "unlock")
    assert refused.returncode == 1 and "standstill" in refused.stderr, refused
    # Turned off by a reload, the warning goes, and guardd acts.
    lab.write_config(policy__dry_run=False)
    d.signal(signal.SIGHUP)
    d.wait_event("rollback_completed")
    assert status(lab)["dry_run"] is False
    assert DRY_RUN_WARNING not in status(lab)["warnings"]


def test_status_during_a_rollback_says_what_it_comes_of(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(qos__window="1h")
    (lab.fault_dir / "after_rollback_started").touch()  # the switch waits here
    d = lab.daemon()
    lab.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_rollback_started.reached").exists, 30, "the rollback")
    doc = status(lab)
    assert doc["state"] == "rolling_back"
    decided = doc["last_decision"]
    assert decided is not None and decided["action"] == "rollback", doc
    assert decided["severity"] == "P0" and decided["evidence"]["rule"] == "consecutive_failures"
    (lab.fault_dir / "after_rollback_started").unlink()
    d.wait_event("rollback_completed")
    # Then the guard window: how long it is still watched, in both forms.
    locked = d.wait_event("qos_locked")
    window = status(lab)["qos"]["window"]
    assert window["until"] == locked["until"] and window["left_s"] > 0, window
    assert re.search(r"guard window: \S+ left to watch, \d+ probes", ctl(lab, "status").stdout)


def test_stale_probes_are_never_shown_healthy(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    lab.daemon()
    assert status(lab)["upstreams"]["green"]["stale"] is False
    # Freeze green's probe loop (a test-only fault point): its data ages past 3 intervals.
    (lab.fault_dir / "probe_green").touch()
    wait_until((lab.fault_dir / "probe_green.reached").exists, 10, "green's probes to stop")
    doc = wait_until(
        lambda: (s := status(lab))["upstreams"]["green"]["stale"] and s, 10, "green to go stale"
    )
    assert doc["upstreams"]["green"]["healthy"] is None
    assert doc["upstreams"]["blue"]["healthy"] is True
    human = ctl(lab, "status")
    assert human.returncode == 1, "an active color guardd cannot vouch for is a WARNING"
    assert "stale" in human.stdout
    # Nor is it `steady`: a pipeline waiting for steady must not go on.
    assert wait_until(lambda: status(lab)["state"] == "degraded", 10, "degraded")
    waited = ctl(lab, "wait", "steady", "--timeout", "1s")
    assert waited.returncode == 1, waited
    (lab.fault_dir / "probe_green").unlink()
    wait_until(lambda: status(lab)["upstreams"]["green"]["healthy"] is True, 20, "fresh again")


def test_pause_stops_switching_and_resume_lets_the_rollback_happen(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    assert ctl(lab, "pause", "--reason", "db migration").returncode == 0
    paused = d.wait_event("paused")
    assert paused["by"] == "uid:0(root)" and paused["reason"] == "db migration"
    count = lab.green.requests
    lab.green.set_mode("http_503")
    assert lab.green.wait_for_requests(count + 10, timeout=20), "probing goes on while paused"
    doc = status(lab)
    assert doc["state"] == "paused" and doc["paused"] is True
    assert doc["last_decision"]["action"] == "blocked:paused"
    assert not [e for e in d.events() if e["event"] == "rollback_started"]
    assert lab.nginx.served_color() is None  # still on the failing green
    assert ctl(lab, "resume").returncode == 0
    done = d.wait_event("rollback_completed")
    assert done["to"] == "blue"
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)


def test_switch_promote_rollback_move_traffic_and_respect_the_lock(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(policy__promote_successes=3, qos__window="1h")
    d = lab.daemon()
    # A gate opens only on a window that holds policy.min_samples probes.
    wait_until(lambda: status(lab)["upstreams"]["blue"]["samples"] >= 5, 20, "blue's window")
    # switch: moves real traffic and is journaled with the caller.
    res = ctl(lab, "switch", "blue", "--reason", "canary done")
    assert res.returncode == 0, res.stderr
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    ev = d.wait_event("switch")
    assert (ev["from"], ev["to"], ev["by"]) == ("green", "blue", "uid:0(root)")
    # rollback: to the rollback target (blue is active, so there is nowhere to go) -> refused.
    res = ctl(lab, "rollback")
    assert res.returncode == 1 and "already active" in (res.stderr + res.stdout)
    # promote: green has passed enough probes and no lock is held.
    res = ctl(lab, "promote", "--reason", "release 42")
    assert res.returncode == 0, res.stderr
    assert lab.nginx.wait_serving_only("green", hold=0.5, timeout=20)
    assert d.wait_event("promote")["by"] == "uid:0(root)"
    # rollback: moves traffic to blue and takes the QoS lock.
    res = ctl(lab, "rollback", "--reason", "bad release")
    assert res.returncode == 0, res.stderr
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    done = d.wait_event("rollback_completed")
    assert done["by"] == "uid:0(root)" and done["severity"] is None
    assert lab.lock_file.exists()
    # Under the lock: promote and switch are refused, switch --force goes through.
    res = ctl(lab, "promote")
    assert res.returncode == 1 and "QoS lock" in (res.stderr + res.stdout)
    res = ctl(lab, "switch", "green")
    assert res.returncode == 1 and "--force" in (res.stderr + res.stdout)
    assert lab.nginx.served_color() == "blue"
    res = ctl(lab, "switch", "green", "--force")
    assert res.returncode == 0, res.stderr
    assert lab.nginx.wait_serving_only("green", hold=0.5, timeout=20)
    # A lock made by another tool with `touch` blocks promote just the same.
    assert ctl(lab, "qos", "unlock").returncode == 0
    assert ctl(lab, "qos", "status").returncode == 0
    lab.lock_file.touch()
    assert ctl(lab, "qos", "status").returncode == 1
    res = ctl(lab, "promote")
    assert res.returncode == 1 and "QoS lock" in (res.stderr + res.stdout)
    assert lab.lock_file.exists(), "guardd never deletes a lock it did not take"
    assert d.stop() == 0


def test_qos_commands_and_status_with_the_daemon_down(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    assert ctl(lab, "qos", "status").returncode == 0
    res = ctl(lab, "qos", "lock", "--for", "10m", "--reason", "freeze for the holidays")
    assert res.returncode == 0, res.stderr
    ev = d.wait_event("qos_locked")
    assert ev["by"] == "uid:0(root)" and ev["reason"] == "freeze for the holidays"
    lock = json.loads(lab.lock_file.read_text())
    assert (
        lock["reason"] == "freeze for the holidays"
        and lock["until"]
        and lock["by"] == "uid:0(root)"
    )
    assert d.stop() == 0
    # Daemon down: qos status still answers from the file.
    res = guardctl("--config", str(lab.config_path), "qos", "status", "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["reason"] == "freeze for the holidays"
    assert ctl(lab, "qos", "unlock").returncode == 3  # mutating, daemon unreachable
    d2 = lab.daemon()
    assert ctl(lab, "qos", "unlock").returncode == 0
    assert d2.wait_event("qos_released")["by"] == "uid:0(root)"
    assert ctl(lab, "qos", "status").returncode == 0
    assert d2.stop() == 0


def test_a_lock_file_in_a_folder_not_made_yet_is_a_real_lock(make_lab: MakeLab) -> None:
    """guardd makes the lock file's folder at start (as it does state.dir's): a lock taken
    is a file the gate reads, never one held in guardd's memory alone and then journaled
    as removed by someone else."""
    lab: Lab = make_lab()
    lock_file = lab.tmp / "not" / "yet" / "lab.qos.lock"
    lab.write_config(qos__lock_file=str(lock_file))
    d = lab.daemon()
    assert lock_file.parent.is_dir()
    taken = ctl(lab, "qos", "lock", "--for", "1m", "--reason", "freeze")
    assert taken.returncode == 0, taken
    assert json.loads(lock_file.read_text())["reason"] == "freeze"
    assert ctl(lab, "qos", "status").returncode == 1
    assert ctl(lab, "wait", "unlocked", "--timeout", "1s").returncode == 1
    assert not [e for e in d.events() if e["event"] == "qos_released"]


def test_with_guardd_down_the_gate_reads_the_lock_it_will_take_back(make_lab: MakeLab) -> None:
    """Killed during its guard window, and the lock file removed meanwhile (a /run emptied,
    a hand's rm): state.json keeps the window and guardd takes it back at start, so the
    gate never says "allowed" in between."""
    lab: Lab = make_lab(qos__window="10m")
    d = lab.daemon()
    lab.green.set_mode("http_503")
    locked = d.wait_event("qos_locked")
    d.kill9()
    lab.lock_file.unlink()
    res = guardctl("--config", str(lab.config_path), "qos", "status", "--json")
    assert res.returncode == 1, res
    doc = json.loads(res.stdout)
    assert doc["locked"] is True and doc["reason"] == locked["reason"], doc
    assert "takes back when it starts" in res.stderr
    d2 = lab.daemon()
    assert wait_until(lab.lock_file.exists, 10, "the lock taken back")
    assert not [e for e in d2.events() if e["event"] == "qos_released"]


def test_with_guardd_down_and_its_state_unreadable_the_gate_is_unknown(
    make_lab: MakeLab, shared_run_dir: Path
) -> None:
    """A user who can neither ask guardd nor read its state.dir cannot tell whether a
    switch was cut short: UNKNOWN, never "allowed" from an empty lock path alone."""
    lab: Lab = make_lab(run_dir=shared_run_dir)
    d = lab.daemon()
    assert d.stop() == 0
    lab.state_dir.chmod(0o700)
    config = shared_run_dir / "lab.toml"
    config.write_text(lab.config_path.read_text())
    config.chmod(0o644)
    res = guardctl("--config", str(config), "qos", "status", as_nobody=True)
    assert res.returncode == 3, res
    assert "cannot be read" in res.stdout + res.stderr
    # root reads it: nothing cut short, nothing kept, the lock path empty.
    assert guardctl("--config", str(config), "qos", "status").returncode == 0


def test_a_lock_guardd_holds_in_a_file_of_its_own_environment_is_never_allowed(
    make_lab: MakeLab,
) -> None:
    # A unit's drop-in may move the lock file (GUARDD_QOS__LOCK_FILE) where the config, and
    # so a deploy script's guardctl, does not: the file it reads then holds nothing.
    lab: Lab = make_lab()
    elsewhere = lab.tmp / "dropin.qos.lock"
    d = lab.daemon(env={"GUARDD_QOS__LOCK_FILE": str(elsewhere)})
    assert ctl(lab, "qos", "lock", "--for", "10m", "--reason", "freeze").returncode == 0
    assert elsewhere.exists() and not lab.lock_file.exists()
    res = guardctl("--config", str(lab.config_path), "qos", "status", "--json")
    assert res.returncode == 1, res
    assert json.loads(res.stdout)["reason"] == "freeze"
    assert f"guardd at {lab.socket_path} holds a QoS lock that {lab.lock_file} does not show" in (
        res.stderr
    )
    assert ctl(lab, "qos", "unlock").returncode == 0
    free = guardctl("--config", str(lab.config_path), "qos", "status")
    assert (free.returncode, free.stderr) == (0, ""), free
    assert d.stop() == 0


@contextlib.contextmanager
def _frozen(d: Daemon) -> Iterator[None]:
    """guardd stopped in its tracks (SIGSTOP), as a wedged one is: it takes connections and
    answers nothing; resumed on the way out."""
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        d.proc.send_signal(signal.SIGCONT)


def test_a_guardd_that_takes_the_question_but_never_answers_is_unknown(
    make_lab: MakeLab,
) -> None:
    # Frozen (or wedged) is not down: it may be in the middle of a rollback, its lock not
    # written yet. The lock file's silence then proves nothing.
    lab: Lab = make_lab()
    d = lab.daemon()
    assert ctl(lab, "qos", "status").returncode == 0
    with _frozen(d):
        frozen = ctl(lab, "qos", "status")
    assert frozen.returncode == 3, frozen
    assert "takes connections but does not answer" in frozen.stderr, frozen.stderr
    assert d.stop() == 0
    # Down is down: the lock file answers alone.
    assert ctl(lab, "qos", "status").returncode == 0


def test_a_wait_on_a_frozen_guardd_ends_at_its_deadline_as_unknown(make_lab: MakeLab) -> None:
    # A CI step's `promote --wait 2s` or `wait unlocked --timeout 2s` against a guardd that
    # takes connections and never answers: each request is bounded by what is left of the
    # wait (a change gets a status read's 5 s at least), never the 120 s a change may take
    # alone; the step ends UNKNOWN (3), and the promote it gave up on is never made.
    lab: Lab = make_lab()
    d = lab.daemon()
    with _frozen(d):
        runs = [
            subprocess.run(
                [str(GUARDCTL), "--config", str(lab.config_path), *argv],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for argv in (["promote", "--wait", "2s"], ["wait", "unlocked", "--timeout", "2s"])
        ]
    for run in runs:
        assert run.returncode == 3, run
        assert "UNKNOWN: guardd is not answering" in run.stderr, run.stderr
    assert ctl(lab, "status").returncode == 0
    assert "promote" not in [e["event"] for e in d.events()]
    assert d.stop() == 0


def test_a_change_the_client_gave_up_on_is_not_made_later(make_lab: MakeLab) -> None:
    # guardd busy (here: frozen) past guardctl's patience: the operator is told it did not
    # answer, and may act by hand; the change must not land behind their back later.
    lab: Lab = make_lab()
    d = lab.daemon()
    with _frozen(d):
        # Interrupted as an operator's Ctrl-C (SIGINT) would: it gives up and leaves.
        gave_up = subprocess.run(
            ["timeout", "-s", "INT", "2", str(GUARDCTL), "--config", str(lab.config_path),
             "pause", "--reason", "abandoned"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert gave_up.returncode != 0, gave_up
    assert wait_until(
        lambda: any(e.get("event") == "control_request_abandoned" for e in log_lines(d)),
        30,
        "the abandoned request logged",
    )
    assert status(lab)["paused"] is False
    assert "paused" not in [e["event"] for e in d.events()]
    assert d.stop() == 0


def test_unprivileged_uid_reads_but_may_not_mutate(make_lab: MakeLab, shared_run_dir: Path) -> None:
    lab: Lab = make_lab(run_dir=shared_run_dir)
    lab.daemon()
    # The config is root's (0600 under pytest's tmp); nobody is told the socket instead.
    read = guardctl("status", "--json", socket=lab.socket_path, as_nobody=True)
    assert read.returncode == 0, read.stderr
    for argv in (
        ("pause",),
        ("switch", "blue", "--force"),
        ("rollback",),
        ("promote",),
        ("resume",),
        ("qos", "lock"),
        ("qos", "unlock"),
    ):
        res = guardctl(*argv, socket=lab.socket_path, as_nobody=True)
        assert res.returncode == 4, (argv, res.stdout, res.stderr)
    assert lab.nginx.served_color() == "green"


def test_an_answer_that_cannot_be_written_is_never_exit_0(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    base = [str(GUARDCTL), "--config", str(lab.config_path)]
    # Daemon down: `qos status` answers from the lock file, exit 0 when none is held (and
    # guardd's state.dir keeps no lock: it ran, and stopped steady).
    assert lab.daemon().stop() == 0
    assert redirected(">/dev/null", *base, "qos", "status").returncode == 0
    # (Its warning that nothing guards a deploy meanwhile goes first, on stderr.)
    unguarded = (
        f"guardctl: no socket at {lab.socket_path} (guardd lab is not running, or cannot be "
        "asked): no QoS lock, but nothing guards a deploy until guardd runs again\n"
    )
    for argv in (["qos", "status"], ["qos", "status", "--json"]):
        full = redirected(">/dev/full", *base, *argv)
        assert (full.returncode, full.stderr) == (
            1,
            unguarded + "guardctl: cannot write the output: No space left on device\n",
        )
        closed = redirected(">&-", *base, *argv)
        assert (closed.returncode, closed.stderr) == (
            1,
            # (A closed stdout is found before the command runs: no warning then.)
            "guardctl: cannot write the output: stdout is closed\n",
        )
    d = lab.daemon()
    wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK")
    for argv in (["status"], ["status", "--json"], ["history"]):
        full = redirected(">/dev/full", *base, *argv)
        assert full.returncode == 1 and "No space left on device" in full.stderr, full
        assert "Traceback" not in full.stderr
    assert d.stop() == 0


def test_a_watch_ends_when_its_reader_leaves_though_nothing_changes(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK")
    base = [str(GUARDCTL), "--config", str(lab.config_path), "status", "--watch"]
    # A steady guard: after the first line nothing changes, so a watch that only noticed
    # its reader at its next write would run on forever (the timeout would fail this).
    for extra in (["--json"], []):
        done = redirected("| head -1", *base, "--interval", "0.2s", *extra, timeout=60)
        assert done.returncode == 1 and done.stderr == "", done
        assert len(done.stdout.splitlines()) == 1
    assert d.stop() == 0


def test_history_lists_the_journal(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    res = ctl(lab, "history", "--json")
    events = [e["event"] for e in json.loads(res.stdout)]
    assert events[0] == "started" and "rollback_completed" in events
    res = ctl(lab, "history", "--limit", "2")
    assert res.returncode == 0 and len(res.stdout.strip().splitlines()) == 2


def test_control_socket_survives_garbage(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    path = str(lab.socket_path)
    junk = [
        os.urandom(4096),
        b'{"v": 1, "cmd": "sta',
        b"\xff\xfe\n",
        b"[1,2,3]\n",
        b'{"v": 99, "cmd": "status"}\n',
    ]
    for payload in junk:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(65536)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (10 * 1024 * 1024))
    idle = []
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        idle.append(s)
    for s in idle:
        s.close()
    assert wait_until(lambda: ctl(lab, "status").returncode == 0, 30, "status after garbage")
    assert d.proc is not None and d.proc.poll() is None


def test_switch_force_declares_the_color_a_command_switcher_cannot_read(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    marker = lab.tmp / "switched-{color}"
    lab.write_config(
        switch__kind="command", switch__command=["touch", str(marker)], switch__verify_url=None
    )
    d = lab.daemon()
    doc = status(lab)
    assert doc["active"] is None and doc["state"] == "hold"
    # Held, and the page says why: no switch was ever recorded, and how to record one.
    assert "no switch recorded yet (`guardctl switch COLOR --force`" in doc["hold_reason"], doc
    res = ctl(lab, "switch", "green")
    assert res.returncode == 1 and "--force" in (res.stdout + res.stderr)
    res = ctl(lab, "switch", "green", "--force", "--reason", "green is live")
    assert res.returncode == 0, res.stderr
    assert (lab.tmp / "switched-green").exists(), "the command ran with {color} substituted"
    ev = d.wait_event("switch")
    assert (ev["from"], ev["to"], ev["by"]) == (None, "green", "uid:0(root)")
    wait_until(lambda: status(lab)["state"] == "steady", 20, "steady on green")


# --- Which guard: UNKNOWN (exit 3) whenever guardctl cannot tell, against a real guardd.


@pytest.fixture
def throwaway_group() -> Iterator[tuple[str, int]]:
    """A system group standing in for the package's `guardd` group: (name, gid)."""
    name = f"gde{os.getpid() % 100000}"
    subprocess.run(["groupadd", "--system", name], check=True, timeout=60)
    try:
        entry = subprocess.run(
            ["getent", "group", name], capture_output=True, text=True, check=True, timeout=60
        )
        yield name, int(entry.stdout.split(":")[2])
    finally:
        subprocess.run(["groupdel", name], check=True, timeout=60)


def _as_member(gid: int, *argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """guardctl as nobody with one supplementary group, as after `usermod -aG`."""
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", f"--groups={gid}", str(GUARDCTL), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1", **env},
    )


def test_a_ci_user_who_cannot_read_the_config_gets_unknown_never_allowed(
    shared_run_dir: Path, throwaway_group: tuple[str, int]
) -> None:
    """The README's setup: config 0640 root:guardd, a lock held, a CI user outside the group.

    Exit 3 naming the fix, with guardd up and with guardd down; the same user in the
    group reads the config and is told the lock is held.
    """
    group, gid = throwaway_group
    (shared_run_dir / "lab").mkdir()
    with lab_in(shared_run_dir / "lab", run_dir=shared_run_dir / "run") as the_lab:
        os.chown(the_lab.config_path, 0, gid)
        the_lab.config_path.chmod(0o640)
        empty = shared_run_dir / "lib"
        empty.mkdir()
        where = {
            "CONFIGURATION_DIRECTORY": str(the_lab.tmp),
            "RUNTIME_DIRECTORY": str(the_lab.run_dir),
            "GUARDD_STATE_ROOT": str(empty),
        }
        for path in (shared_run_dir, the_lab.tmp, the_lab.run_dir):
            path.chmod(0o755)
        d = the_lab.daemon()
        res = ctl(the_lab, "qos", "lock", "--reason", "release freeze")
        assert res.returncode == 0, res.stderr

        def check(phase: str) -> None:
            for select in (["--config", str(the_lab.config_path)], ["--instance", "lab"], []):
                for argv in (["qos", "status"], ["status"], ["history"]):
                    run = guardctl(*select, *argv, as_nobody=True, env=where)
                    said = run.stdout if argv == ["status"] else run.stderr
                    assert run.returncode == 3, (phase, select, argv, run)
                    assert "deploys allowed" not in run.stdout
                    assert f"{the_lab.config_path}: permission denied" in said
                    assert f"usermod -aG {group} nobody" in said
                member = _as_member(gid, *select, "qos", "status", env=where)
                assert member.returncode == 1, (phase, select, member)
                assert "release freeze" in member.stdout
            misspelled = guardctl("--instance", "lba", "qos", "status", env=where)
            assert misspelled.returncode == 3
            assert "no guardd instance 'lba'" in misspelled.stderr
            assert "instances here: lab; name one with --instance NAME" in misspelled.stderr

        check("guardd up")
        assert d.stop() == 0
        check("guardd down")


def test_history_with_the_daemon_down_reads_the_journal(make_lab: MakeLab) -> None:
    lab_: Lab = make_lab()
    d = lab_.daemon()
    lab_.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    up = ctl(lab_, "history", "--json")
    assert up.returncode == 0 and up.stderr == ""
    assert d.stop() == 0
    # Lines another tool wrote, that are no events: skipped here as guardd skips them.
    with (lab_.state_dir / "events.jsonl").open("a") as journal:
        journal.write('{"ts": "bad", "event": 5}\n{"event": "stopped"}\n[1]\n')

    down = ctl(lab_, "history", "--json")
    text = ctl(lab_, "history", "--limit", "1")

    assert down.returncode == 0, down.stderr
    events = json.loads(down.stdout)
    assert events[: len(json.loads(up.stdout))] == json.loads(up.stdout)
    assert events[-1]["event"] == "stopped"
    assert "is not answering" in down.stderr
    assert str(lab_.state_dir / "events.jsonl") in down.stderr
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 1
    assert "stopped" in text.stdout


def test_an_expired_lock_with_the_daemon_down_blocks_and_says_so(make_lab: MakeLab) -> None:
    lab_: Lab = make_lab()
    d = lab_.daemon()
    res = ctl(lab_, "qos", "lock", "--for", "5s", "--reason", "short freeze")
    assert res.returncode == 0, res.stderr
    assert d.stop() == 0
    until = datetime.fromisoformat(json.loads(lab_.lock_file.read_text())["until"])
    wait_until(lambda: datetime.now(UTC) > until, 30, "the lock's until to pass")

    text = ctl(lab_, "qos", "status")
    as_json = ctl(lab_, "qos", "status", "--json")

    assert text.returncode == 1
    assert (
        "(expired; guardd judges it when it runs: released, or its guard window goes on)"
        in text.stdout
    )
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["expired"] is True
    # And guardd, when it runs, does release it.
    d2 = lab_.daemon()
    assert d2.wait_event("qos_released")["reason"] == "operator lock expired"
    assert ctl(lab_, "qos", "status").returncode == 0
    assert d2.stop() == 0


def test_the_only_instance_is_used_and_several_are_listed(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    first: Lab = make_lab()
    first.daemon()
    where = {
        "CONFIGURATION_DIRECTORY": str(first.tmp),
        "RUNTIME_DIRECTORY": str(first.run_dir),
        "GUARDD_STATE_ROOT": str(tmp_path / "nothing"),
    }
    alone = guardctl("status", "--json", env=where)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert json.loads(alone.stdout)["guard"] == "lab"
    assert guardctl("qos", "status", env=where).returncode == 0

    second: Lab = make_lab(instance="web")
    second.config_path.rename(first.tmp / "web.toml")
    several = guardctl("qos", "status", env=where)
    assert several.returncode == 3
    assert "several guardd instances here (lab, web): name one with --instance NAME" in (
        several.stderr
    )
    assert guardctl("--instance", "lab", "qos", "status", env=where).returncode == 0


def test_a_misspelled_instance_beside_its_config_is_unknown_never_another_guard(
    make_lab: MakeLab,
) -> None:
    """`--config F --instance typo` must not report on F's guard as if it were the one asked."""
    lab: Lab = make_lab()
    d = lab.daemon()
    assert ctl(lab, "qos", "lock", "--reason", "release freeze").returncode == 0
    for argv in (["status"], ["qos", "status"], ["history"], ["pause"]):
        typo = ctl(lab, "--instance", "lba", *argv)
        said = typo.stdout if argv == ["status"] else typo.stderr
        assert typo.returncode == 3, (argv, typo)
        assert "deploys allowed" not in typo.stdout
        assert "no guardd instance 'lba'" in said and "is 'lab'" in said, said
    assert status(lab)["paused"] is False  # the typo'd pause reached nobody
    right = ctl(lab, "--instance", "lab", "qos", "status")
    assert right.returncode == 1 and "release freeze" in right.stdout
    assert d.stop() == 0
    # guardd down: nothing can say which is meant, so nothing is said but UNKNOWN.
    typo = ctl(lab, "--instance", "lba", "qos", "status")
    assert typo.returncode == 3
    assert "no guardd answers" in typo.stderr and "'lab', not 'lba'" in typo.stderr


def test_unlock_with_guardd_down_tells_the_truth_about_a_guard_window(make_lab: MakeLab) -> None:
    """A guard window comes back at start (state.json): `rm` is no way to end it."""
    lab: Lab = make_lab()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    assert d.stop() == 0
    res = ctl(lab, "qos", "unlock")
    assert res.returncode == 3
    assert "a lock guardd took comes back when it starts" in res.stderr
    assert "start guardd, then `guardctl qos unlock`" in res.stderr
    # And so it does: removed by hand, it is back once guardd runs again.
    lab.lock_file.unlink()
    d = lab.daemon()
    assert ctl(lab, "qos", "status").returncode == 1
    assert d.stop() == 0
