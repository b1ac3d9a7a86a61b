"""guardctl's watch, waits and incidents as real processes against a scripted control socket
(tests/control/test_guardctl.py's FakeGuard), and `incident` against a journal file alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.control import test_guardctl as base
from tests.control.test_guardctl import GUARDCTL, WAIT_S, FakeGuard, _dirs, fixture, guardctl
from tests.harness.procs import INTERRUPTIBLE

# The control-socket fixtures of test_guardctl: one fake guard on a background loop.
run_dir = base.run_dir
running_guard = base.running_guard
guard = base.guard


def test_watch_json_in_a_pipe_prints_the_status_and_exits_130_on_ctrl_c(
    guard: FakeGuard, run_dir: Path
) -> None:
    with subprocess.Popen(
        [*INTERRUPTIBLE, str(GUARDCTL), "--instance", "threader", "status", "--watch", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], **_dirs(run_dir)},
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert json.loads(first)["state"] == "steady"
            guard.status["state"] = "degraded"
            second = proc.stdout.readline()
            assert json.loads(second)["state"] == "degraded"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(WAIT_S) == 130
            rest, err = proc.communicate(timeout=WAIT_S)
            assert "Traceback" not in err
        finally:
            if proc.poll() is None:
                proc.kill()
    # No change, no line: the status did not change again after the second.
    assert rest == ""
    assert json.loads(first) == fixture("steady")


def test_watch_json_ends_with_an_unknown_line_when_guardd_stops_answering(
    guard: FakeGuard, run_dir: Path
) -> None:
    """A reader of `status --watch --json` parses every line: the last one, when guardd
    answers no more, is the UNKNOWN object (exit 3), the why on stderr too."""
    proc = subprocess.Popen(
        [str(GUARDCTL), "--instance", "threader", "status", "--watch", "--json",
         "--interval", "0.2s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], **_dirs(run_dir)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert json.loads(first)["state"] == "steady"
        guard.failing.add("status")
        assert proc.wait(WAIT_S) == 3
        rest, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (line,) = rest.splitlines()
    doc = json.loads(line)
    assert (doc["unknown"], doc["guard"], doc["state"]) == (True, "threader", None), doc
    assert doc["qos"]["locked"] is None and doc["qos"]["unknown"] is True, doc
    assert doc["warning"].startswith("guardd threader: internal: internal error"), doc
    assert err == f"guardctl: UNKNOWN: {doc['warning']}\n"


def test_watch_without_a_daemon_is_unknown(run_dir: Path) -> None:
    run = guardctl("--socket", str(run_dir / "nobody.sock"), "status", "--watch", run_dir=run_dir)
    assert run.code == 3
    assert run.out.startswith("UNKNOWN: guardd ")


def test_promote_wait_gives_up_with_the_last_reason(guard: FakeGuard, run_dir: Path) -> None:
    guard.status["upstreams"]["blue"]["healthy"] = False
    run = guardctl("--instance", "threader", "promote", "--wait", "1500ms", run_dir=run_dir)
    assert run.code == 1
    assert "more for the promote gate: blue is unhealthy" in run.err
    assert run.err.rstrip().endswith(
        "gave up after 2s: refused: blue is unhealthy; use --force to switch anyway"
    )
    assert {cmd for cmd, _, _ in guard.calls} == {"promote"} and len(guard.calls) >= 2


def test_switch_wait_done_at_once_prints_the_change(guard: FakeGuard, run_dir: Path) -> None:
    run = guardctl("--instance", "threader", "switch", "blue", "--wait", "1m", run_dir=run_dir)
    assert run.code == 0, run.err
    assert "active    blue" in run.out
    assert guard.calls[0][1]["color"] == "blue"


def test_wait_conditions(guard: FakeGuard, run_dir: Path) -> None:
    def wait(condition: str) -> Any:
        return guardctl(
            "--instance", "threader", "wait", condition, "--timeout", "1s", run_dir=run_dir
        )

    for condition in ("steady", "healthy", "unlocked"):
        done = wait(condition)
        assert (done.code, done.out) == (0, f"threader: {condition}\n")
    guard.reset("guard_window")
    assert "state is guard_window" in wait("steady").err
    assert "the QoS lock is held" in wait("unlocked").err
    guard.reset("hold")
    held = wait("healthy")
    assert held.code == 1 and "(active) is unhealthy" in held.err


def _traffic_rule(green: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    return {
        "rule": "5xx-p0",
        "signal": "traffic",
        "stat": "error_ratio",
        "condition": "error_ratio >= 0.5",
        "severity": "P0",
        "for_s": None,
        "dry_run": dry_run,
        "blue": {"state": "inconclusive", "since": None, "value": None, "samples": 0,
                 "min_samples": 50, "why": "0 of 50 samples"},
        "green": {"since": None, "value": 0.95, "samples": 120, "min_samples": 50, "why": None,
                  **green},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("rules", "said"),
    [
        # The probes pass while real requests fail: a hold on a P0 traffic rule.
        (
            [_traffic_rule({"state": "firing", "since": "2026-11-22T05:02:16.107Z"})],
            (
                "green (active) firing rule 5xx-p0 (P0: error_ratio >= 0.5) "
                "since 2026-11-22T05:02:16.107Z"
            ),
        ),
        (
            [_traffic_rule({"state": "pending", "since": "2026-11-22T05:02:16.107Z"})],
            "green (active) pending rule 5xx-p0",
        ),
        # No rules reported is no "no rule fails": guardctl cannot tell.
        (None, "the rules' states are not reported"),
    ],
    ids=["firing", "pending", "not-reported"],
)
def test_wait_healthy_is_not_met_while_a_rule_fails_the_active_color(
    guard: FakeGuard, run_dir: Path, rules: list[dict[str, Any]] | None, said: str
) -> None:
    guard.status["rules"] = rules
    assert guard.status["upstreams"]["green"]["healthy"] is True  # its probes pass
    run = guardctl("--instance", "threader", "wait", "healthy", "--timeout", "1s", run_dir=run_dir)
    assert run.code == 1 and said in run.err, run.err


@pytest.mark.parametrize(
    "green",
    [
        {"state": "ok"},
        {"state": "inconclusive", "why": "12 of 50 samples"},
    ],
    ids=["ok", "inconclusive"],
)
def test_wait_healthy_is_met_when_no_rule_fails_the_active_color(
    guard: FakeGuard, run_dir: Path, green: dict[str, Any]
) -> None:
    # A dry-run rule firing only says what it would do; the standby's rules are not read.
    guard.status["rules"] = [
        _traffic_rule(green),
        _traffic_rule({"state": "firing"}, dry_run=True),
        {**_traffic_rule({"state": "ok"}), "blue": {"state": "firing", "since": None}},
    ]
    run = guardctl("--instance", "threader", "wait", "healthy", "--timeout", "1s", run_dir=run_dir)
    assert (run.code, run.out) == (0, "threader: healthy\n"), run.err


@pytest.mark.parametrize(
    ("signals", "said"),
    [
        (
            {"traffic": {"kind": "access_log", "problem": "does not exist", "stale": False}},
            "signal traffic gives nothing (does not exist): its rules are inconclusive",
        ),
        (
            {"traffic": {"kind": "access_log", "problem": None, "stale": True}},
            "signal traffic is stale: its rules are inconclusive",
        ),
        ({"traffic": "?"}, "signal traffic's state is not reported"),
        (None, "the signals' states are not reported"),
    ],
    ids=["gives-nothing", "stale", "garbled", "not-reported"],
)
def test_wait_healthy_is_not_met_while_a_signal_cannot_tell(
    guard: FakeGuard, run_dir: Path, signals: dict[str, Any] | None, said: str
) -> None:
    """Probes passing and no rule firing is no "healthy" while a signal cannot tell: its
    rules could not fire on what users see (a mistyped access log, lines of no use)."""
    guard.status["signals"] = signals
    guard.status["rules"] = [_traffic_rule({"state": "inconclusive", "why": "0 of 50 samples"})]
    run = guardctl("--instance", "threader", "wait", "healthy", "--timeout", "1s", run_dir=run_dir)
    assert run.code == 1 and f"not healthy after 1s: {said}" in run.err, run.err
    guard.status["signals"] = {"traffic": {"kind": "access_log", "problem": None, "stale": False}}
    run = guardctl("--instance", "threader", "wait", "healthy", "--timeout", "1s", run_dir=run_dir)
    assert (run.code, run.out) == (0, "threader: healthy\n"), run.err


def test_incident_reads_the_journal_file_without_a_daemon(tmp_path: Path, run_dir: Path) -> None:
    state = tmp_path / "lib" / "quiet"
    state.mkdir(parents=True)
    base = {"guard": "quiet", "from": "green", "to": "blue", "severity": "P0", "by": "guardd"}
    lines = [
        {
            **base,
            "ts": "2026-11-30T01:00:00.000Z",
            "id": "a" * 32,
            "event": "rollback_started",
            "reason": "green down",
            "evidence": {"rule": "consecutive_failures"},
        },
        {
            **base,
            "ts": "2026-11-30T01:00:01.000Z",
            "id": "b" * 32,
            "event": "rollback_completed",
            "reason": "green down",
            "rollback_id": "a" * 32,
            "duration_ms": 1000.0,
        },
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"torn'
    (state / "events.jsonl").write_text(text)
    env = {"GUARDD_STATE_ROOT": str(tmp_path / "lib")}
    run = guardctl("--instance", "quiet", "incident", "--json", run_dir=run_dir, env=env)
    assert run.code == 0, run.err
    found = json.loads(run.out)
    assert found["id"] == "INC-20261130-1" and found["durations_s"]["time_to_recover"] == 1.0
    markdown = guardctl(
        "--instance", "quiet", "incident", "aaaa", "--markdown", run_dir=run_dir, env=env
    )
    assert markdown.code == 0 and markdown.out.startswith("**INC-20261130-1: quiet rolled back")
    missing = guardctl(
        "--instance", "quiet", "incident", "INC-20261130-2", run_dir=run_dir, env=env
    )
    assert missing.code == 1 and "no incident INC-20261130-2" in missing.err
    (state / "events.jsonl").write_text("")
    empty = guardctl("--instance", "quiet", "incident", run_dir=run_dir, env=env)
    assert empty.code == 1 and "no rollback in the journal" in empty.err
    (state / "events.jsonl").unlink()
    (state / "state.json").write_text("{}")
    gone = guardctl("--instance", "quiet", "incident", run_dir=run_dir, env=env)
    assert gone.code == 3 and "UNKNOWN" in gone.err
