"""guardctl as operators run it: a real process against a real control socket.

The daemon is a `ControlServer` with a scripted handler that keeps to guardd's shapes
(the status object, `{"events": [...]}` for history, `{"message": ...}` for changes),
running on its own event loop in a background thread.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from guardd import ctl, render
from guardd.control.server import Caller, ControlServer
from guardd.exceptions import Refused
from guardd.qoslock import read_lock
from guardd.render import render_history, render_status
from tests.harness.daemon import nobody_prefix

HERE = Path(__file__).parent
FIXTURES = ("steady", "guard_window", "hold", "paused")
WAIT_S = 60.0


def fixture(name: str) -> dict[str, Any]:
    """A status object as guardd sends it."""
    status: dict[str, Any] = json.loads((HERE / "fixtures" / f"{name}.json").read_text())
    return status


def golden(name: str) -> str:
    """The exact human text expected for a fixture."""
    return (HERE / "golden" / f"{name}.txt").read_text()


EVENTS: list[dict[str, Any]] = [
    {
        "ts": "2026-11-22T03:58:12.004Z",
        "event": "promote",
        "guard": "threader",
        "from": "blue",
        "to": "green",
        "reason": "release 2026.11.3",
        "severity": None,
        "by": "uid:1001(deploy)",
    },
    {
        "ts": "2026-11-22T04:39:58.950Z",
        "event": "rollback_started",
        "guard": "threader",
        "from": "green",
        "to": "blue",
        "reason": "green failed 3 probes in a row",
        "severity": "P0",
        "by": "guardd",
    },
    {
        "ts": "2026-11-22T04:40:00.123Z",
        "event": "rollback_completed",
        "guard": "threader",
        "from": "green",
        "to": "blue",
        "reason": "green failed 3 probes in a row",
        "severity": "P0",
        "by": "guardd",
        "evidence": {"rule": "consecutive_failures", "threshold": 3, "value": 3, "samples": 9},
    },
    {
        "ts": "2026-11-22T04:40:00.125Z",
        "event": "qos_locked",
        "guard": "threader",
        "from": None,
        "to": None,
        "reason": "guard window after rollback",
        "severity": None,
        "by": "guardd",
    },
]


@dataclass
class FakeGuard:
    """Answers the control commands with guardd's shapes (see guardd/operator.py)."""

    lock_file: Path
    status: dict[str, Any] = field(default_factory=lambda: fixture("steady"))
    own_lock: dict[str, Any] | None = None
    calls: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    #: What `qos_status` answers instead of the lock file (a fleet node's UNKNOWN lock).
    qos_answer: dict[str, Any] | None = None
    #: Commands whose handler fails: guardd answers them with an `internal` error.
    failing: set[str] = field(default_factory=set)

    def reset(self, status: str = "steady") -> None:
        """Back to a fixture, no lock, no calls, every command answered."""
        self.status = fixture(status)
        self.own_lock = None
        self.calls.clear()
        self.qos_answer = None
        self.failing.clear()
        self.lock_file.unlink(missing_ok=True)
        qos = self.status["qos"]
        if qos["locked"]:
            # guardd's status reports the lock file, so the fixture's lock is put on disk.
            self.own_lock = {k: qos[k] for k in ("reason", "locked_at", "until", "by")}
            self.lock_file.write_text(json.dumps(self.own_lock))

    def _lock_json(self) -> dict[str, Any]:
        return read_lock(self.lock_file).to_json()

    def _take_lock(self, reason: str, for_s: float | None, by: str) -> dict[str, Any]:
        lock = {
            "reason": reason,
            "locked_at": "2026-11-22T04:40:00.123Z",
            "until": None if for_s is None else "2026-11-22T04:45:00.123Z",
            "by": by,
        }
        self.lock_file.write_text(json.dumps(lock))
        self.own_lock = lock
        return self._lock_json()

    def _event(self, kind: str, source: str, target: str, reason: str, by: str) -> dict[str, Any]:
        return {
            "ts": "2026-11-22T05:00:00.000Z",
            "event": kind,
            "guard": "threader",
            "from": source,
            "to": target,
            "reason": reason,
            "severity": None,
            "by": by,
        }

    async def __call__(self, cmd: str, args: dict[str, Any], caller: Caller) -> dict[str, Any]:
        self.calls.append((cmd, args, caller.by()))
        if cmd in self.failing:
            raise RuntimeError(f"{cmd} fails here on purpose")
        status, by = self.status, caller.by()
        status["qos"] = self._lock_json()
        if cmd == "status":
            return copy.deepcopy(status)
        if cmd == "history":
            limit = args["limit"]
            return {"events": EVENTS[-limit:] if limit else EVENTS}
        if cmd == "qos_status":
            return copy.deepcopy(self.qos_answer) if self.qos_answer else self._lock_json()
        reason = args.get("reason")
        if cmd == "pause":
            status["paused"], status["paused_reason"] = True, reason
            return {"paused": True}
        if cmd == "resume":
            was = status["paused"]
            status["paused"] = False
            return {"paused": False, "changed": was}
        if cmd == "qos_lock":
            if status["qos"]["locked"] and status["qos"]["reason"] != (self.own_lock or {}).get(
                "reason"
            ):
                raise Refused(
                    f"a QoS lock is already held ({status['qos']['reason']}); "
                    "release it with `guardctl qos unlock` first"
                )
            return self._take_lock(reason or "locked by an operator", args["for_s"], by)
        if cmd == "qos_unlock":
            if not status["qos"]["locked"]:
                raise Refused("no QoS lock is held")
            self.lock_file.unlink()
            return self._lock_json()
        source = status["active"]
        target = {
            "switch": args.get("color"),
            "promote": status["standby"],
            "rollback": status["rollback_to"],
        }[cmd]
        if target == source:
            raise Refused(f"{target} is already active")
        if cmd != "rollback" and not args.get("force"):
            if status["qos"]["locked"]:
                raise Refused(f"the QoS lock is held ({status['qos']['reason']})")
            if status["upstreams"][target]["healthy"] is not True:
                raise Refused(f"{target} is unhealthy; use --force to switch anyway")
        status["active"], status["standby"] = target, source
        kind = "rollback_completed" if cmd == "rollback" else cmd
        event = self._event(kind, source, target, reason or f"{cmd} by an operator", by)
        if cmd == "rollback":
            self._take_lock(f"rolled back {source} -> {target}", 300.0, "guardd")
        return {"active": target, "event": event}


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    """The daemon's runtime directory: short enough for a socket path, open to nobody."""
    path = Path(tempfile.mkdtemp(prefix="gdctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def running_guard(run_dir: Path) -> Iterator[FakeGuard]:
    """A control server for instance "threader" in `run_dir`, on a background event loop."""
    guard = FakeGuard(lock_file=run_dir / "threader.qos.lock")
    server = ControlServer(run_dir / "threader.sock", guard, mode=0o666)
    with start_blocking_portal(backend="asyncio") as portal:
        serving, _ = portal.start_task(server.serve)
        yield guard
        serving.cancel()


@pytest.fixture(scope="module")
def stopped(run_dir: Path) -> str:
    """Instance "stopped": its state and journal are there, its daemon is not running."""
    state = run_dir / "lib" / "stopped"
    state.mkdir(parents=True)
    (state / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return "stopped"


@pytest.fixture
def guard(running_guard: FakeGuard) -> FakeGuard:
    """The fake guard, reset to steady with no lock."""
    running_guard.reset()
    return running_guard


GUARDCTL = Path(sys.executable).with_name("guardctl")


@dataclass
class Run:
    """What a guardctl process did."""

    code: int
    out: str
    err: str


def _dirs(run_dir: Path) -> dict[str, str]:
    """Where guardctl looks for instances: all under `run_dir`, none of the host's."""
    return {
        "RUNTIME_DIRECTORY": str(run_dir),
        "CONFIGURATION_DIRECTORY": str(run_dir / "etc"),
        "GUARDD_STATE_ROOT": str(run_dir / "lib"),
    }


def guardctl(
    *argv: str, run_dir: Path, env: Mapping[str, str] | None = None, as_nobody: bool = False
) -> Run:
    """Run guardctl as its own process, with paths defaulting into `run_dir`."""
    assert GUARDCTL.exists(), "the guardctl script is missing: run `uv sync --frozen`"
    full_env = {
        "PATH": os.environ["PATH"],
        **_dirs(run_dir),
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    prefix = nobody_prefix(as_nobody)
    done = subprocess.run(
        [*prefix, str(GUARDCTL), *argv],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_status_text(name: str) -> None:
    """The human status text of each fixture is exactly the golden file (color off)."""
    assert render_status(fixture(name), color=False) == golden(name)


def test_a_rollback_not_taken_here_says_why_on_its_decision_line() -> None:
    """A fleet node's rollback decision that it did not take itself (`not_taken`) is shown
    as such, never as a bare "rollback"."""
    status = fixture("guard_window")
    assert status["last_decision"]["action"] == "rollback"
    plain = render_status(status, color=False)
    status["last_decision"]["not_taken"] = "the fleet's leader (lb-b) decides"
    shown = render_status(status, color=False)
    (line,) = [ln for ln in shown.splitlines() if ln.lstrip().startswith("last decision")]
    assert "rollback P0 (not taken here: the fleet's leader (lb-b) decides)" in line, line
    assert "not taken" not in plain


@pytest.mark.parametrize(
    ("fired", "blind", "why"),
    [
        ([], [], None),
        (["p2_error_ratio"], [], "p2_error_ratio fired"),
        ([], ["traffic"], "traffic could not tell"),
        (["p2_error_ratio"], ["traffic"], "p2_error_ratio fired, traffic could not tell"),
    ],
)
def test_a_guard_window_already_lost_says_its_until_will_move(
    fired: list[str], blind: list[str], why: str | None
) -> None:
    """A rule that fired in the guard window, or a signal that could not tell, fails it
    whatever comes next: the lock line says so, so that nobody plans a deploy by its until."""
    status = fixture("guard_window")
    status["qos"]["window"] = {
        "until": status["qos"]["until"],
        "left_s": 21.0,
        "samples": 18,
        "failures": 2,
        "errors_5xx": 2,
        "fired": fired,
        "blind": blind,
    }
    (line,) = [ln for ln in render_status(status).splitlines() if ln.startswith("qos lock")]
    said = "guard window: 21s left to watch, 18 probes, 2 failed"
    assert said + ("; not met" if why else ")") in line, line
    if why:
        assert line.endswith(f"; not met ({why}): it is extended at its end)"), line


@pytest.mark.parametrize(
    ("door", "line"),
    [
        (None, None),
        (
            {
                "healthy": True,
                "stale": False,
                "streak": 12,
                "last_error": None,
                "last_probe_age_s": 0.1,
            },
            "passing (12 in a row)",
        ),
        (
            {
                "healthy": False,
                "stale": False,
                "streak": 3,
                "last_error": "HTTP 502 Bad Gateway",
                "last_probe_age_s": 0.2,
            },
            "FAILING (3 in a row): HTTP 502 Bad Gateway",
        ),
        (
            {
                "healthy": None,
                "stale": True,
                "streak": 3,
                "last_error": None,
                "last_probe_age_s": 42.0,
            },
            "stale: no answer for 42s",
        ),
    ],
)
def test_the_front_door_is_a_line_of_its_own(door: dict[str, Any] | None, line: str | None) -> None:
    """What users reach through nginx is shown beside the colors' probes: a guard holding
    on a link that names no color while users get 502s says so without --json."""
    status = fixture("hold")
    status["front_door"] = door
    shown = [ln for ln in render_status(status).splitlines() if ln.startswith("front door")]
    assert shown == ([] if line is None else [f"{'front door':<15}{line}"])


@pytest.mark.parametrize(
    ("name", "code"), [("steady", 0), ("guard_window", 1), ("hold", 2), ("paused", 1)]
)
def test_status(guard: FakeGuard, run_dir: Path, name: str, code: int) -> None:
    """`status` prints the table and exits 0 OK, 1 WARNING or 2 CRITICAL."""
    guard.reset(name)

    run = guardctl("--instance", "threader", "status", run_dir=run_dir)

    assert (run.code, run.out, run.err) == (code, golden(name), "")
    assert "\x1b" not in run.out


@pytest.mark.parametrize("name", FIXTURES)
def test_status_json(guard: FakeGuard, run_dir: Path, name: str) -> None:
    """`status --json` prints the daemon's object unchanged, with the same exit code."""
    guard.reset(name)

    run = guardctl("status", "--json", "--instance", "threader", run_dir=run_dir)

    assert json.loads(run.out) == fixture(name)
    assert run.code == ctl.status_exit_code(fixture(name))


def test_status_unreachable(run_dir: Path, stopped: str, guard: FakeGuard) -> None:
    """No daemon, or a dead socket, is UNKNOWN: exit 3 (and the instances here are named:
    `guard` runs "threader" beside the stopped one, whichever test ran first)."""
    missing = guardctl("--instance", stopped, "status", run_dir=run_dir)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(run_dir / "dead.sock"))
        stale = guardctl(
            "--socket", str(run_dir / "dead.sock"), "status", "--json", run_dir=run_dir
        )
    (run_dir / "dead.sock").unlink()

    assert missing.code == 3
    assert missing.out.startswith(f"UNKNOWN: guardd stopped: no control socket at {run_dir}")
    assert missing.out.endswith(
        "(instance stopped; name another with --instance NAME or --config PATH; "
        "instances here: stopped, threader)\n"
    )
    assert "nothing listens" in unknown_answer(stale, status=True)["warning"]


_UNTAKEN = {
    "action": "rollback",
    "severity": "P0",
    "not_taken": "etcd is unreachable and fleet.local_fallback is false",
}


def _status(**changes: Any) -> dict[str, Any]:
    status = fixture("steady")
    for key, value in changes.items():
        if key.startswith("green_"):
            status["upstreams"]["green"][key.removeprefix("green_")] = value
        else:
            status[key] = value
    return status


@pytest.mark.parametrize(
    ("status", "code"),
    [
        pytest.param(_status(), 0, id="steady"),
        pytest.param(_status(state="degraded"), 1, id="degraded"),
        pytest.param(_status(state="rolling_back"), 1, id="rolling-back"),
        pytest.param(_status(state="starting"), 1, id="starting"),
        pytest.param(_status(state="guard_window"), 1, id="guard-window"),
        pytest.param(_status(paused=True), 1, id="paused-flag"),
        pytest.param(_status(qos={"locked": True, "reason": "touch"}), 1, id="locked"),
        pytest.param(_status(green_healthy=False), 1, id="active-unhealthy"),
        pytest.param(_status(green_healthy=None, green_stale=True), 1, id="active-stale"),
        pytest.param(_status(green_healthy=True, green_stale=True), 1, id="stale-wins"),
        pytest.param(_status(green_healthy=None), 1, id="active-unknown"),
        pytest.param(_status(active="purple"), 1, id="active-missing"),
        pytest.param(_status(state="hold", paused=True), 2, id="hold"),
        pytest.param(
            _status(green_healthy=False, state="degraded", last_decision=_UNTAKEN),
            2,
            id="rollback-etcd-cannot-take",
        ),
        pytest.param(
            _status(green_healthy=True, last_decision=_UNTAKEN), 0, id="untaken-but-healthy-now"
        ),
        pytest.param(
            _status(
                green_healthy=False,
                state="degraded",
                last_decision={**_UNTAKEN, "not_taken": "the fleet's leader (n1) decides"},
            ),
            1,
            id="leader-decides",
        ),
        pytest.param(_status(no_rollback_target="blue is down"), 1, id="no-rollback-target"),
        pytest.param(_status(state="hold", no_rollback_target="blue"), 2, id="hold-wins"),
        pytest.param(
            _status(storage={"ok": False, "errors": 66, "last_error": "Read-only file system"}),
            1,
            id="storage-failing",
        ),
        pytest.param(_status(state="hold", storage={"ok": False}), 2, id="hold-wins-storage"),
    ],
)
def test_status_exit_rule(status: dict[str, Any], code: int) -> None:
    """3 unreachable, 2 hold, 1 anything an operator should look at, else 0."""
    assert ctl.status_exit_code(status) == code


def test_history(guard: FakeGuard, run_dir: Path) -> None:
    """`history` prints one line per event, newest last; --json the list; --limit is passed."""
    text = guardctl("--instance", "threader", "history", run_dir=run_dir)
    as_json = guardctl(
        "--instance", "threader", "history", "--limit", "2", "--json", run_dir=run_dir
    )

    assert text.code == 0
    assert text.out == render_history(EVENTS)
    lines = text.out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("2026-11-22T03:58:12.004Z  promote ")
    assert "green->blue  P0  guardd" in lines[2]
    assert lines[3].endswith("guard window after rollback")
    assert as_json.code == 0
    assert json.loads(as_json.out) == EVENTS[-2:]
    assert [args for cmd, args, _ in guard.calls] == [{"limit": None}, {"limit": 2}]


def test_history_text() -> None:
    """History lines are aligned; an unknown end of a move is left out; control bytes escaped."""
    events: list[dict[str, Any]] = [
        {
            "ts": "2026-11-22T05:01:17.598Z",
            "event": "started",
            "from": None,
            "to": "green",
            "reason": "guardd 0.1.0 guarding threader",
            "severity": None,
            "by": "guardd",
        },
        {
            "ts": "2026-11-22T05:01:24.771Z",
            "event": "rollback_started",
            "from": "green",
            "to": "blue",
            "reason": "HTTP 503\x1b[2J",
            "severity": "P0",
            "by": "guardd",
        },
        {
            "ts": "2026-11-22T05:01:24.773Z",
            "event": "qos_locked",
            "from": None,
            "to": None,
            "reason": None,
            "severity": None,
            "by": "uid:0(root)",
        },
    ]

    assert render_history(events) == (
        "2026-11-22T05:01:17.598Z  started           green        -   guardd       "
        "guardd 0.1.0 guarding threader\n"
        "2026-11-22T05:01:24.771Z  rollback_started  green->blue  P0  guardd       "
        "HTTP 503\\x1b[2J\n"
        "2026-11-22T05:01:24.773Z  qos_locked        -            -   uid:0(root)\n"
    )
    # One color, and no arrow, for an event that moves nothing; a move to no color keeps it.
    said = [
        {"ts": "t", "event": "qos_extended", "from": "blue", "to": None, "by": "guardd"},
        {"ts": "t", "event": "alert", "from": "green", "to": None, "severity": "P2"},
        {"ts": "t", "event": "external_switch", "from": "green", "to": None, "by": "external"},
    ]
    moves = [line.split()[2] for line in render_history(said).splitlines()]
    assert moves == ["blue", "green", "green->"]
    assert render_history([]) == "no events\n"


def test_an_access_log_that_gives_nothing_shows_no_figures() -> None:
    """Nothing counted is no "0 req/s, 0 5xx": while the signal reads nothing of use, what
    users got is unknown, said as such on each color's line; one that reads shows them."""
    counted = {"rps": 0.0, "error_ratio": None, "p95_ms": None, "samples": 0, "window_s": 10}
    signal = {
        "kind": "access_log",
        "state": "waiting for /var/log/nginx/acess.log (missing)",
        "problem": "does not exist",
        "stale": False,
        "blue": counted,
        "green": counted,
    }
    shown = render_status({**fixture("steady"), "signals": {"traffic": signal}})
    lines = shown.splitlines()
    at = lines.index(
        "signal traffic (access_log): waiting for /var/log/nginx/acess.log (missing); "
        "PROBLEM: does not exist"
    )
    assert lines[at + 1 : at + 3] == [
        "  blue  unknown: the signal gives nothing",
        "  green unknown: the signal gives nothing",
    ]
    reading = render_status(
        {**fixture("steady"), "signals": {"traffic": {**signal, "problem": None}}}
    )
    assert "  blue  0 req/s" in reading


def test_what_the_failing_color_answered_is_shown_with_the_decision() -> None:
    """The rule's figures alone do not say what the upstream said: history, the status's
    last decision and the incident's cause end with its last answer (bounded, control
    bytes escaped, markdown escaped in `--markdown`)."""
    said = 'body does not match expect_json: status is "DEGRADED", expected "UP"'
    evidence = {"rule": "consecutive_failures", "threshold": 3, "value": 3, "samples": 15,
                "last_error": said}  # fmt: skip
    event = {"ts": "t", "event": "rollback_started", "from": "green", "to": "blue",
             "severity": "P0", "by": "guardd", "reason": "green failed 3 probes in a row",
             "evidence": evidence}  # fmt: skip
    assert (
        render_history([event])
        .rstrip()
        .endswith(f"green failed 3 probes in a row; last answer: {said}")
    )
    status = {**fixture("steady"), "last_decision": {**event, "action": "rollback"}}
    line = next(x for x in render_status(status).splitlines() if x.startswith("last decision"))
    assert line.endswith(
        "[rule=consecutive_failures threshold=3 value=3 samples=15]; last answer: " + said
    )
    hostile = {**event, "evidence": {**evidence, "last_error": "\x1b[2J" + "x" * 1000}}
    (shown,) = render_history([hostile]).splitlines()
    assert "; last answer: \\x1b[2J" in shown and shown.endswith("...")
    assert len(shown) < 400
    assert render_history([{**event, "evidence": {"rule": "r"}}]).rstrip().endswith("in a row")
    # A rule on the window's ratio fires after the color's answers passed again: its last
    # failed answer is not its last answer.
    recovered = {**event, "evidence": {**evidence, "consecutive_failures": 0}}
    assert (
        render_history([recovered])
        .rstrip()
        .endswith(f"; last failed answer: {said} (its answers since passed)")
    )
    failing = {**event, "evidence": {**evidence, "consecutive_failures": 3}}
    assert render_history([failing]).rstrip().endswith(f"; last answer: {said}")


def test_history_reads_the_journal_with_the_daemon_down(run_dir: Path, stopped: str) -> None:
    """`history` without a daemon reads events.jsonl, says so, and exits 0."""
    run = guardctl("--instance", stopped, "history", run_dir=run_dir)
    limited = guardctl("--instance", stopped, "history", "--limit", "1", "--json", run_dir=run_dir)

    journal = run_dir / "lib" / "stopped" / "events.jsonl"
    assert (run.code, run.out) == (0, render_history(EVENTS))
    assert run.err.startswith("guardctl: guardd stopped is not answering (no control socket")
    assert run.err.endswith(f"; read {journal}\n")
    assert (limited.code, json.loads(limited.out)) == (0, EVENTS[-1:])


def test_history_without_daemon_or_journal_is_unknown(run_dir: Path, tmp_path: Path) -> None:
    """With neither a daemon nor a journal to read, `history` exits 3 and names both."""
    config = _write_config(tmp_path / "bare.toml", tmp_path / "none.sock", tmp_path / "l")

    run = guardctl("--config", str(config), "history", run_dir=run_dir)

    assert (run.code, run.out) == (3, "")
    assert run.err.startswith(
        "guardctl: UNKNOWN: guardd threader is not answering (no control socket at"
    )
    assert ") and there is no journal at" in run.err


_UNKNOWN_LOCK_KEYS = {"locked", "unknown", "reason", "until", "locked_at", "by", "warning"}


def unknown_answer(run: Run, *, status: bool = False) -> dict[str, Any]:
    """The UNKNOWN object a `--json` run printed, checked (docs/contract.md §1): exit 3,
    stdout one JSON object (a `--watch` line, or indented) in which nothing reads as
    "allowed" or OK, and stderr the one line `guardctl: UNKNOWN: <its warning>`.

    `status`: the `status --json` object, else `qos status --json`'s.
    """
    assert run.code == 3, run
    doc = json.loads(run.out)
    assert isinstance(doc, dict), run
    assert doc["unknown"] is True and isinstance(doc["warning"], str), doc
    assert run.err == f"guardctl: UNKNOWN: {doc['warning']}\n", run
    lock = doc["qos"] if status else doc
    assert lock["locked"] is None and lock["unknown"] is True, doc
    assert all(lock[k] is None for k in ("reason", "until", "locked_at", "by")), doc
    assert lock["warning"] == doc["warning"], doc
    if status:
        assert set(doc) == {"guard", "unknown", "warning", "state", "active", "qos", "warnings"}
        assert set(lock) == _UNKNOWN_LOCK_KEYS, doc
        assert (doc["state"], doc["active"], doc["warnings"]) == (None, None, [doc["warning"]])
    else:
        assert set(doc) - {"source"} == _UNKNOWN_LOCK_KEYS | {"expired"}, doc
        assert doc["expired"] is False
    return doc


def _stopped_state(folder: Path, guard: str = "threader") -> Path:
    """`folder` as a guardd that ran and stopped steady leaves it: its state.json."""
    folder.mkdir(exist_ok=True)
    (folder / "state.json").write_text(
        json.dumps({"version": 1, "guard": guard, "state": "steady", "active": "green"})
    )
    return folder


def _write_config(path: Path, socket_path: Path, lock_file: Path) -> Path:
    """A config for guardd threader, as one that ran and stopped leaves it: its state.dir
    (beside `path`) holds its state.json, which keeps no lock."""
    state = _stopped_state(path.parent / "threader.state")
    path.write_text(
        f'instance = "threader"\n[control]\nsocket = "{socket_path}"\n'
        f'[qos]\nlock_file = "{lock_file}"\n[state]\ndir = "{state}"\n'
    )
    return path


def test_qos_status_reads_the_lock_file_with_the_daemon_down(tmp_path: Path, run_dir: Path) -> None:
    """`qos status` answers from the lock file alone: absent 0, `touch`ed 1, guardd's JSON 1."""
    lock = tmp_path / "threader.qos.lock"
    config = _write_config(tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", lock)

    def qos_status(*extra: str) -> Run:
        return guardctl("--config", str(config), "qos", "status", *extra, run_dir=run_dir)

    absent, absent_json = qos_status(), qos_status("--json")
    lock.touch()
    touched, touched_json = qos_status(), qos_status("--json")
    lock.write_text(
        json.dumps(
            {
                "reason": "rolled back green -> blue",
                "by": "guardd",
                "locked_at": "2026-11-22T04:40:00.123Z",
                "until": "2999-11-22T04:45:00.123Z",
            }
        )
    )
    held, held_json = qos_status(), qos_status("--json")

    assert (absent.code, absent_json.code) == (0, 0)
    assert absent.out == f"no QoS lock: deploys allowed ({lock})\n"
    # Allowed, as the contract answers with guardd down; and said on stderr and in the
    # JSON that nothing guards the deploy meanwhile.
    unguarded = (
        f"no socket at {tmp_path / 'nobody-listens.sock'} (guardd threader is not running, or "
        "cannot be asked): no QoS lock, but nothing guards a deploy until guardd runs again"
    )
    assert absent.err == f"guardctl: {unguarded}\n"
    assert json.loads(absent_json.out) == {
        "locked": False,
        "reason": None,
        "until": None,
        "locked_at": None,
        "by": None,
        "expired": False,
        "warning": unguarded,
    }
    assert (touched.code, touched_json.code) == (1, 1)
    assert touched.out.startswith("QoS lock HELD: deploys blocked\n")
    assert "lock file present (no details)" in touched.out
    assert json.loads(touched_json.out)["locked"] is True
    assert (held.code, held_json.code) == (1, 1)
    assert held.out == (
        "QoS lock HELD: deploys blocked\n"
        "  reason     rolled back green -> blue\n"
        "  until      2999-11-22T04:45:00.123Z\n"
        "  locked at  2026-11-22T04:40:00.123Z\n"
        "  by         guardd\n"
        f"  file       {lock}\n"
    )
    assert json.loads(held_json.out) == {
        "locked": True,
        "reason": "rolled back green -> blue",
        "until": "2999-11-22T04:45:00.123Z",
        "locked_at": "2026-11-22T04:40:00.123Z",
        "by": "guardd",
        "expired": False,
    }


def test_settings_in_the_environment_override_the_config_as_for_guardd(
    tmp_path: Path, run_dir: Path
) -> None:
    """`GUARDD_<SECTION>__<KEY>` variables move the lock file and the fleet's etcd for
    guardctl as they do for guardd; without them the config's own paths count."""
    config = _write_config(
        tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", tmp_path / "lock"
    )
    elsewhere = tmp_path / "elsewhere.lock"
    elsewhere.write_text(json.dumps({"reason": "held elsewhere", "by": "guardd"}))

    def qos_status(**env: str) -> Run:
        return guardctl("--config", str(config), "qos", "status", run_dir=run_dir, env=env)

    assert qos_status().code == 0
    for name in ("GUARDD_QOS__LOCK_FILE", "guardd_qos__lock_file"):
        moved = qos_status(**{name: str(elsewhere)})
        assert moved.code == 1 and "held elsewhere" in moved.out, moved
    # A fleet named only in the environment: the lock is then the fleet's, and an etcd
    # that does not answer is UNKNOWN, never "no lock".
    dead = f"http://127.0.0.1:{_closed_port()}"
    fleet = qos_status(GUARDD_FLEET__ETCD=json.dumps([dead]), GUARDD_FLEET__NODE="lb-a")
    assert fleet.code == 3 and "UNKNOWN" in fleet.err and dead in fleet.err, fleet
    # Unrelated names (other sections, GUARDD_CONFIG) change nothing.
    quiet = qos_status(GUARDD_PROBE__INTERVAL="5s", GUARDD_QOSX="y")
    assert quiet.code == 0, quiet


@pytest.mark.parametrize(
    ("edit", "env", "said"),
    [
        (("lock_file =", "lockfile ="), {}, "qos.lockfile: unknown key"),
        (("[qos]", "[qoss]"), {}, "qoss: unknown key"),
        (("[state]", "[State]"), {}, "State: unknown key"),
        (("lock_file = ", "lock_file = 5 #"), {}, "qos.lock_file: must be a string"),
        (('dir = "', 'dir = " " #'), {}, "state.dir: must not be empty"),
        (('instance = "threader"', "instance = 7"), {}, "instance: must be a string"),
        (None, {"GUARDD_QOS__LOCK_FILE": ""}, "qos.lock_file: must not be empty"),
        (None, {"GUARDD_STATE__DIR": " "}, "state.dir: must not be empty"),
        (None, {"GUARDD_CONTROL__SOCKET": ""}, "control.socket: must not be empty"),
        (None, {"guardd_qos__lockfile": "/x"}, "qos.lockfile: unknown key"),
        (None, {"GUARDD_QOS__A__B": "x"}, "qos.a.b: unknown key"),
        (None, {"GUARDD_QOS__LOCK_FILE": "r7.qos.lock"}, "qos.lock_file: must be an absolute path"),
        (('dir = "', 'dir = "state/'), {}, "state.dir: must be an absolute path"),
    ],
    ids=lambda v: None if v is None or isinstance(v, str) else str(v),
)  # fmt: skip
def test_a_setting_guardd_refuses_where_guardctl_looks_is_unknown_never_allowed(
    tmp_path: Path, run_dir: Path, edit: tuple[str, str] | None, env: dict[str, str], said: str
) -> None:
    """A typo in a key guardctl reads (or its section), an empty path, a variable guardd
    refuses: guardd will not start with it, and guardctl would read a default path guardd
    never writes ("no lock: allowed" beside the real lock). UNKNOWN (3), naming the file or
    variable, the key and the fix; the lock held at the config's path is never overlooked."""
    lock = tmp_path / "threader.qos.lock"
    config = _write_config(tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", lock)
    lock.write_text("locked by qos_guard.sh\n")
    assert guardctl("--config", str(config), "qos", "status", run_dir=run_dir).code == 1
    if edit is not None:
        text = config.read_text()
        assert edit[0] in text
        config.write_text(text.replace(edit[0], edit[1], 1))
    lock.unlink()  # the default path is empty too: only the refusal can keep the gate shut

    for argv in (("qos", "status"), ("status",), ("history",)):
        run = guardctl("--config", str(config), *argv, run_dir=run_dir, env=env)
        # (`status` prints its UNKNOWN line on stdout, the others on stderr.)
        line = run.out + run.err
        assert run.code == 3 and line.count("\n") == 1, (argv, run)
        origin = f"env {next(iter(env))}" if env else str(config)
        assert f"UNKNOWN: {origin}: {said}: guardd refuses" in line, run
        assert f"`guardd check-config {config}` says how to fix it" in line, run
    doc = unknown_answer(
        guardctl("--config", str(config), "qos", "status", "--json", run_dir=run_dir, env=env)
    )
    assert said in doc["warning"], doc


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ({"qos": 1}, "qos: must be a table"),
        ({"fleet": ["http://e:2379"]}, "fleet: must be a table"),
        ({"control": {"socket": ["/run/a.sock"]}}, "control.socket: must be a string"),
        ({"instance": ""}, "instance: must not be empty"),
        ({"Qos": {}}, "Qos: unknown key"),
        ({"fleet": {"etcd": [], "nodes": 3}}, "fleet.nodes: unknown key"),
        ({"probe": {"anything": 1}, "qos": {"window": "5m"}}, None),
        ({}, None),
    ],
)  # fmt: skip
def test_refused_keys_names_what_guardd_refuses_where_guardctl_looks(
    table: dict[str, Any], said: str | None
) -> None:
    """Sections guardctl does not read are guardd's to judge; those it reads are checked."""
    assert ctl._refused_keys(table) == said


def test_the_keys_guardctl_knows_are_guardds() -> None:
    """guardctl's mirror of the config's keys (it does not import pydantic) is the models'."""
    from guardd import config as config_models  # noqa: PLC0415 - the models, for this test

    models = {
        "": frozenset(config_models.GuardConfig.model_fields),
        "control": frozenset(config_models.ControlConfig.model_fields),
        "qos": frozenset(config_models.QosConfig.model_fields),
        "state": frozenset(config_models.StateConfig.model_fields),
        "fleet": frozenset(config_models.FleetConfig.model_fields),
    }
    assert models == ctl._KNOWN_KEYS


def test_with_guardd_down_a_state_dir_that_is_not_there_is_unknown_never_allowed(
    tmp_path: Path, run_dir: Path
) -> None:
    """An empty lock path is no "allowed" when the state.dir guardctl reads is missing or
    no folder (the config's or a GUARDD_STATE__DIR's, a typo, a guardd that never ran):
    a rollback cut short, or a lock state.json keeps, would be there. UNKNOWN (3) then,
    naming the folder; the same config with its state.dir in place answers 0."""
    lock = tmp_path / "threader.qos.lock"
    config = _write_config(tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", lock)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    other = _stopped_state(tmp_path / "other", guard="checkout")
    cases = {
        "missing": ({"GUARDD_STATE__DIR": str(tmp_path / "typo")}, "does not exist"),
        "a file": ({"GUARDD_STATE__DIR": str(a_file)}, "is not a directory"),
        # The folder above the instance's (/var/lib/guardd for /var/lib/guardd/threader).
        "no state": ({"GUARDD_STATE__DIR": str(tmp_path)}, "holds no state.json or events.jsonl"),
        "another's": ({"GUARDD_STATE__DIR": str(other)}, "holds guard checkout's state, not"),
        "default, never ran": ({"GUARDD_STATE_ROOT": str(tmp_path / "lib")}, "does not exist"),
    }

    def qos_status(*extra: str, **env: str) -> Run:
        return guardctl("--config", str(config), "qos", "status", *extra, run_dir=run_dir, env=env)

    assert qos_status().code == 0
    for name, (env, what) in cases.items():
        if name.startswith("default"):
            # The same config without [state]: the state.dir is $GUARDD_STATE_ROOT/threader.
            config.write_text(config.read_text().split("[state]")[0])
        text, as_json = qos_status(**env), qos_status("--json", **env)
        where = env.get("GUARDD_STATE__DIR") or str(tmp_path / "lib" / "threader")
        assert (text.code, text.out) == (3, ""), (name, text)
        assert f"state.dir {where} {what}" in text.err, (name, text)
        assert "allowed" not in text.out + text.err, (name, text)
        doc = unknown_answer(as_json)
        assert f"state.dir {where} {what}" in doc["warning"], (name, doc)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _not_http() -> Iterator[str]:
    """A loopback URL whose server answers any request with a line that is not HTTP."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(WAIT_S)

        def answer() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = server.accept()
                    with conn:
                        conn.recv(65536)
                        conn.sendall(b"garbage\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_fleet_lock_that_cannot_be_asked_for_is_unknown_never_a_traceback(
    tmp_path: Path, run_dir: Path
) -> None:
    """TLS files that cannot be loaded, and a server at the etcd URL that does not speak
    HTTP, leave the fleet's lock unknown: exit 3 and why, never a traceback (exit 1)."""
    config = _write_config(
        tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", tmp_path / "lock"
    )
    missing_ca = tmp_path / "no-such-ca.pem"

    def qos_status(etcd: str, **env: str) -> Run:
        return guardctl(
            "--config", str(config), "qos", "status", run_dir=run_dir,
            env={"GUARDD_FLEET__ETCD": json.dumps([etcd]), "GUARDD_FLEET__NODE": "lb-a", **env},
        )  # fmt: skip

    tls = qos_status("https://127.0.0.1:1", GUARDD_FLEET__CA_FILE=str(missing_ca))
    with _not_http() as url:
        garbled = qos_status(url)

    assert tls.code == 3, tls
    assert f"TLS files cannot be used (ca_file {missing_ca})" in tls.err, tls
    assert garbled.code == 3, garbled
    assert f"no etcd member answered: {url}: BadStatusLine" in garbled.err, garbled
    for run in (tls, garbled):
        assert "Traceback" not in run.err and run.err.startswith("guardctl: UNKNOWN: "), run


@pytest.mark.parametrize(
    "until", ["2026-11-22T04:45:00.123Z", "2020-01-01T00:00:00+00:00", "2020-01-01T00:00:00"]
)
def test_qos_status_says_when_a_lock_has_expired_with_the_daemon_down(
    tmp_path: Path, run_dir: Path, until: str
) -> None:
    """A lock past its `until` still blocks (exit 1), and says guardd releases it when it runs."""
    lock = tmp_path / "threader.qos.lock"
    config = _write_config(tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", lock)
    lock.write_text(json.dumps({"reason": "guard window", "by": "guardd", "until": until}))

    text = guardctl("--config", str(config), "qos", "status", run_dir=run_dir)
    as_json = guardctl("--config", str(config), "qos", "status", "--json", run_dir=run_dir)

    assert text.code == 1
    assert (
        f"  until      {until} (expired; guardd judges it when it runs: released, or its "
        "guard window goes on)\n" in text.out
    )
    assert as_json.code == 1
    assert json.loads(as_json.out)["expired"] is True


def test_an_expired_lock_another_tool_wrote_is_never_said_to_end(
    tmp_path: Path, run_dir: Path
) -> None:
    """guardd never removes a lock it did not take (a deploy tool's): past its `until`,
    `qos status` says it holds until removed, not that guardd releases it."""
    lock = tmp_path / "threader.qos.lock"
    config = _write_config(tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", lock)
    lock.write_text(
        json.dumps({"reason": "deploy running", "by": "ci-tool", "until": "2020-01-01T00:00:00Z"})
    )
    text = guardctl("--config", str(config), "qos", "status", run_dir=run_dir)
    assert text.code == 1
    assert (
        "(expired, but not taken through guardd, which never removes it: it holds until "
        in text.out
    )


def test_default_lock_path_follows_the_instance(run_dir: Path, stopped: str) -> None:
    """Without a config, the lock is `$RUNTIME_DIRECTORY/<instance>.qos.lock`."""
    lock = run_dir / "stopped.qos.lock"
    lock.touch()
    try:
        held = guardctl("--instance", stopped, "qos", "status", run_dir=run_dir)
    finally:
        lock.unlink()
    allowed = guardctl("--instance", stopped, "qos", "status", run_dir=run_dir)

    assert held.code == 1
    assert str(lock) in held.out
    assert (allowed.code, allowed.out) == (0, f"no QoS lock: deploys allowed ({lock})\n")


def test_config_names_socket_and_instance(guard: FakeGuard, run_dir: Path, tmp_path: Path) -> None:
    """`--config` leads to the socket in `control.socket`; global options work after the command."""
    config = _write_config(tmp_path / "anything.toml", run_dir / "threader.sock", guard.lock_file)

    before = guardctl("--config", str(config), "status", "--json", run_dir=run_dir)
    after = guardctl("status", "--config", str(config), run_dir=run_dir)
    env = guardctl("status", run_dir=run_dir, env={"GUARDD_CONFIG": str(config)})

    assert (before.code, after.code, env.code) == (0, 0, 0)
    assert json.loads(before.out)["guard"] == "threader"


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["switch", "blue"], ("switch", {"color": "blue", "force": False, "reason": None})),
        (
            ["switch", "blue", "--force", "--reason", "drain green host"],
            ("switch", {"color": "blue", "force": True, "reason": "drain green host"}),
        ),
        (["rollback", "--reason", "checkout 500s"], ("rollback", {"reason": "checkout 500s"})),
        (["promote"], ("promote", {"reason": None})),
        (["pause", "--reason", "CHG-4711"], ("pause", {"reason": "CHG-4711"})),
        (
            ["qos", "lock", "--for", "5m", "--reason", "freeze"],
            ("qos_lock", {"for_s": 300.0, "reason": "freeze"}),
        ),
        (["qos", "lock", "--for", "250ms"], ("qos_lock", {"for_s": 0.25, "reason": None})),
        (["qos", "lock", "--for", "90"], ("qos_lock", {"for_s": 90.0, "reason": None})),
        (["qos", "lock", "--for", "1h"], ("qos_lock", {"for_s": 3600.0, "reason": None})),
        # The config's grammar: a compound duration, as `qos.window = "1m30s"` takes it.
        (["qos", "lock", "--for", "1m30s"], ("qos_lock", {"for_s": 90.0, "reason": None})),
        (["qos", "lock", "--for", "1h 30m"], ("qos_lock", {"for_s": 5400.0, "reason": None})),
        (["qos", "lock"], ("qos_lock", {"for_s": None, "reason": None})),
    ],
)
def test_changes_are_done(
    guard: FakeGuard, run_dir: Path, argv: list[str], call: tuple[str, dict[str, Any]]
) -> None:
    """Each mutating command sends its arguments, prints guardd's message and exits 0."""
    if argv[0] == "promote":
        guard.status["active"], guard.status["standby"] = "blue", "green"

    run = guardctl("--instance", "threader", *argv, run_dir=run_dir)

    assert (run.code, run.err) == (0, "")
    assert run.out.startswith(f"{' '.join(argv[:2] if argv[0] == 'qos' else argv[:1])}: done\n")
    assert guard.calls == [(*call, "uid:0(root)")]


def test_pause_resume_and_unlock(guard: FakeGuard, run_dir: Path) -> None:
    """`pause`, `resume`, `qos lock` and `qos unlock` change what `status` and `qos status` say."""
    base = ("--instance", "threader")

    paused = guardctl(*base, "pause", "--reason", "maintenance", run_dir=run_dir)
    warning = guardctl(*base, "status", run_dir=run_dir)
    resumed = guardctl(*base, "resume", "--reason", "failover done", run_dir=run_dir)
    locked = guardctl(*base, "qos", "lock", "--for", "5m", run_dir=run_dir)
    blocked = guardctl(*base, "qos", "status", run_dir=run_dir)
    unlocked = guardctl(*base, "qos", "unlock", run_dir=run_dir)
    allowed = guardctl(*base, "qos", "status", run_dir=run_dir)

    assert (paused.code, paused.out) == (0, "pause: done\n  paused    yes\n")
    assert warning.code == 1
    assert "paused         yes: maintenance" in warning.out
    assert (resumed.code, resumed.out) == (0, "resume: done\n  paused    no\n")
    # The reason reaches guardd (its journal's `resumed`, a fleet's `rearmed`).
    assert ("resume", {"reason": "failover done"}) in [c[:2] for c in guard.calls]
    assert locked.code == 0
    assert locked.out == (
        "qos lock: done\n  qos lock  HELD: locked by an operator "
        "(until 2026-11-22T04:45:00.123Z, by uid:0(root))\n"
    )
    assert blocked.code == 1
    assert "locked by an operator" in blocked.out
    assert unlocked.code == 0
    assert unlocked.out == "qos unlock: done\n  qos lock  none, deploys allowed\n"
    assert allowed.code == 0


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["switch", "blue"], "the QoS lock is held (lock file present (no details))"),
        (["promote"], "the QoS lock is held"),
        (["qos", "lock", "--for", "1h"], "a QoS lock is already held"),
        (["switch", "green", "--force"], "green is already active"),
    ],
)
def test_refused_changes_exit_1_and_say_why(
    guard: FakeGuard, run_dir: Path, argv: list[str], why: str
) -> None:
    """A refusal exits 1 with guardd's reason on stderr; nothing is printed as done."""
    guard.lock_file.touch()

    run = guardctl("--instance", "threader", *argv, run_dir=run_dir)

    assert run.code == 1
    assert run.out == ""
    assert why in run.err
    assert run.err.startswith("guardctl: refused: ")


def test_unlock_without_a_lock_is_refused(guard: FakeGuard, run_dir: Path) -> None:
    """`qos unlock` with no lock held exits 1 and says so."""
    run = guardctl("--instance", "threader", "qos", "unlock", run_dir=run_dir)

    assert run.code == 1
    assert run.err == "guardctl: refused: no QoS lock is held\n"


def test_refused_unhealthy_switch_and_force(guard: FakeGuard, run_dir: Path) -> None:
    """Switching to an unhealthy color is refused, and done with --force."""
    guard.reset("guard_window")
    guard.lock_file.unlink(missing_ok=True)

    refused = guardctl("--instance", "threader", "switch", "green", run_dir=run_dir)
    forced = guardctl("--instance", "threader", "switch", "green", "--force", run_dir=run_dir)

    assert (refused.code, forced.code) == (1, 0)
    assert "green is unhealthy; use --force" in refused.err
    assert forced.out == (
        "switch: done\n"
        "  active    green\n"
        "  journal   2026-11-22T05:00:00.000Z switch blue->green "
        "by uid:0(root): switch by an operator\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["switch", "blue"],
        ["rollback"],
        ["promote"],
        ["pause"],
        ["resume"],
        ["qos", "lock", "--for", "1m"],
        ["qos", "unlock"],
    ],
)
def test_changes_without_a_daemon_exit_3(run_dir: Path, stopped: str, argv: list[str]) -> None:
    """Every mutating command exits 3 when guardd does not answer."""
    run = guardctl("--instance", stopped, *argv, run_dir=run_dir)

    assert run.code == 3
    assert "is guardd running?" in run.err


def test_qos_lock_without_a_daemon_names_the_manual_way(run_dir: Path, stopped: str) -> None:
    """With guardd down, `qos lock` says how to block deploys by hand."""
    run = guardctl("--instance", stopped, "qos", "lock", run_dir=run_dir)

    assert f"touch {run_dir / 'stopped.qos.lock'}" in run.err


@pytest.mark.parametrize(
    "argv",
    [
        ["switch", "blue"],
        ["rollback"],
        ["promote"],
        ["promote", "--wait", "1m"],
        ["switch", "blue", "--wait", "1m"],
        ["pause"],
        ["resume"],
        ["qos", "lock"],
        ["qos", "unlock"],
    ],
)
def test_changes_from_an_unprivileged_user_exit_4(
    guard: FakeGuard, run_dir: Path, argv: list[str]
) -> None:
    """A caller who is not root, guardd's user or an admin gets exit 4 and nothing changes."""
    run = guardctl("--instance", "threader", *argv, run_dir=run_dir, as_nobody=True)

    assert run.code == 4
    assert run.err.startswith("guardctl: not permitted: ")
    assert "uid:65534(nobody)" in run.err
    assert guard.calls == []


def test_reading_is_open_to_an_unprivileged_user(guard: FakeGuard, run_dir: Path) -> None:
    """status and history work for anyone who can reach the socket."""
    status = guardctl("--instance", "threader", "status", "--json", run_dir=run_dir, as_nobody=True)
    history = guardctl("--instance", "threader", "history", run_dir=run_dir, as_nobody=True)

    assert status.code == 0
    assert json.loads(status.out) == fixture("steady")
    assert history.code == 0
    assert [by for _, _, by in guard.calls] == ["uid:65534(nobody)"] * 2


def _on_a_terminal(argv: list[str], run_dir: Path, env: Mapping[str, str]) -> str:
    """guardctl's output when its stdout is a pseudo-terminal."""
    leader, follower = pty.openpty()
    full_env = {
        "PATH": os.environ["PATH"],
        **_dirs(run_dir),
        "TERM": "xterm",
        **env,
    }
    with subprocess.Popen(
        [str(GUARDCTL), *argv], stdout=follower, stderr=subprocess.PIPE, env=full_env
    ) as process:
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side has closed
                break
            if not chunk:
                break
            output += chunk
        process.wait(timeout=WAIT_S)
    os.close(leader)
    return output.decode()


def test_color_only_on_a_terminal_and_never_with_no_color(guard: FakeGuard, run_dir: Path) -> None:
    """ANSI colors appear on a terminal, not with NO_COLOR, and never in a pipe."""
    guard.reset("hold")
    argv = ["--instance", "threader", "status"]

    colored = _on_a_terminal(argv, run_dir, {})
    plain = _on_a_terminal(argv, run_dir, {"NO_COLOR": "1"})
    piped = guardctl(*argv, run_dir=run_dir)

    assert "\x1b[1;31mNO" in colored
    assert "\x1b[" not in plain
    assert plain.replace("\r\n", "\n") == golden("hold")
    assert "\x1b[" not in piped.out


def test_import_is_light() -> None:
    """guardctl loads no server-side machinery, so it starts fast on a busy host."""
    heavy = [
        "anyio",
        "httpx",
        "pydantic",
        "pydantic_settings",
        "structlog",
        "prometheus_client",
        "sdnotify",
        "stamina",
        "asyncio",
        "guardd.control.server",
        "guardd.config",
        # The decision core is the daemon's: guardctl needs its vocabulary alone.
        "guardd.core.machine",
        "guardd.core.policy",
        "guardd.core.rules",
        "guardd.core.window",
        # `--watch`, `wait`, `incident` and an UNKNOWN status load these when they run; a
        # plain `status` or `qos status` does not.
        "guardd.ctlwatch",
        "guardd.incident",
        "guardd.journal",
    ]
    code = (
        "import json, sys, guardd.ctl\n"
        f"heavy = {heavy!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if m in heavy or m.split('.')[0] in heavy)))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=WAIT_S
    )

    assert json.loads(done.stdout) == []


@pytest.mark.parametrize("held", [False, True])
def test_qos_status_with_a_config_and_no_guardd_never_loads_the_control_client(
    tmp_path: Path, held: bool
) -> None:
    """The deploy script's question reads the lock file: no socket module, no client (a
    guardd running is asked before "allowed": e2e/test_guardctl.py)."""
    lock = tmp_path / "threader.qos.lock"
    if held:
        lock.touch()  # a lock taken by hand, as the contract allows
    config = tmp_path / "threader.toml"
    config.write_text(f'[qos]\nlock_file = "{lock}"\n[state]\ndir = "{tmp_path}"\n')
    _stopped_state(tmp_path)
    code = (
        "import json, sys\n"
        "from guardd.ctl import main\n"
        f"sys.argv = ['guardctl', '--config', {str(config)!r}, 'qos', 'status']\n"
        "code = main()\n"
        "loaded = [m for m in ('socket', 'guardd.control.client', 'guardd.control.protocol')\n"
        "          if m in sys.modules]\n"
        "print(json.dumps([code, loaded]), file=sys.stderr)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=WAIT_S
    )

    assert json.loads(done.stderr.splitlines()[-1]) == [1 if held else 0, []], done.stderr
    assert ("QoS lock HELD" if held else "no QoS lock") in done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["status"],
        ["history"],
        ["switch"],
        ["rollback"],
        ["promote"],
        ["pause"],
        ["resume"],
        ["wait"],
        ["incident"],
        ["qos"],
        ["qos", "status"],
        ["qos", "lock"],
        ["qos", "unlock"],
    ],
)
def test_every_command_has_a_manual(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` describes the command, gives examples and lists the exit codes."""
    with pytest.raises(SystemExit) as done:
        ctl.main([*argv, "--help"])

    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith(f"usage: guardctl {' '.join(argv)}".rstrip())
    assert "examples:\n  guardctl " in out
    if argv != ["qos"]:
        assert "exit codes:\n" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["switch"],
        ["switch", "red"],
        ["history", "--limit", "0"],
        ["history", "--limit", "ten"],
        ["qos"],
        ["qos", "lock", "--for", "5x"],
        ["qos", "lock", "--for", "0"],
        ["qos", "lock", "--for", "-3s"],
        ["qos", "lock", "--for", "5 00ms"],
        ["status", "--bogus"],
        ["status", "--watch", "--interval", "0"],
        ["promote", "--wait", "soon"],
        ["switch", "blue", "--wait", "-1s"],
        ["wait", "steady"],
        ["wait", "sunny", "--timeout", "1m"],
        ["incident", "INC-20261130-1", "--last"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], run_dir: Path) -> None:
    """A mistyped command line exits 2 with a usage message, without calling guardd."""
    run = guardctl(*argv, run_dir=run_dir)

    assert run.code == 2
    assert run.out == ""
    assert "usage: guardctl" in run.err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("3s", 3.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("90", 90.0),
        ("1.5", 1.5),
        (" 2m ", 120.0),
        (".5s", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    """Durations are written as in the config: a number with ms, s, m or h, or plain seconds."""
    assert ctl.parse_duration(text) == seconds


# --- Which guard: guardctl says UNKNOWN (exit 3) whenever it cannot tell.


@dataclass
class Host:
    """A host's guardd places, private to one test: configs, runtime and state."""

    root: Path

    @property
    def etc(self) -> Path:
        """The config directory."""
        return self.root / "etc"

    @property
    def run(self) -> Path:
        """The runtime directory (sockets, locks)."""
        return self.root / "run"

    @property
    def lib(self) -> Path:
        """The state root."""
        return self.root / "lib"

    def env(self) -> dict[str, str]:
        """guardctl's environment for this host."""
        return {
            "RUNTIME_DIRECTORY": str(self.run),
            "CONFIGURATION_DIRECTORY": str(self.etc),
            "GUARDD_STATE_ROOT": str(self.lib),
        }

    def ctl(self, *argv: str, as_nobody: bool = False) -> Run:
        """guardctl on this host."""
        return guardctl(*argv, run_dir=self.run, env=self.env(), as_nobody=as_nobody)

    def config(self, name: str, body: str = "", *, mode: int = 0o644, gid: int = 0) -> Path:
        """`<etc>/<name>.toml`, owned by root and `gid`."""
        path = self.etc / f"{name}.toml"
        path.write_text(body)
        os.chown(path, 0, gid)
        path.chmod(mode)
        return path

    def state(self, name: str, events: list[dict[str, Any]]) -> Path:
        """`<lib>/<name>/events.jsonl` with `events`."""
        directory = self.lib / name
        directory.mkdir()
        journal = directory / "events.jsonl"
        journal.write_text("".join(json.dumps(e) + "\n" for e in events))
        return journal


@pytest.fixture
def host() -> Iterator[Host]:
    """An empty host an unprivileged user can look into (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="gdhost-", dir="/tmp"))
    the_host = Host(root)
    for path in (root, the_host.etc, the_host.run, the_host.lib):
        path.mkdir(exist_ok=True)
        path.chmod(0o755)
    yield the_host
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def group() -> Iterator[tuple[str, int]]:
    """A throwaway system group, as the package's `guardd` group: (name, gid)."""
    name = f"gdt{os.getpid() % 100000}"
    subprocess.run(["groupadd", "--system", name], check=True, timeout=WAIT_S)
    try:
        yield (
            name,
            int(
                subprocess.run(
                    ["getent", "group", name], capture_output=True, text=True, check=True
                ).stdout.split(":")[2]
            ),
        )
    finally:
        subprocess.run(["groupdel", name], check=True, timeout=WAIT_S)


def _held_lock(path: Path) -> None:
    path.write_text(
        json.dumps(
            {"reason": "rolled back green -> blue", "by": "guardd", "until": "2999-01-01T00:00:00Z"}
        )
    )


def _one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    return text


@pytest.mark.parametrize("how", ["--instance", "--config", "only-instance"])
def test_unreadable_config_is_unknown_never_allowed(
    host: Host, group: tuple[str, int], how: str
) -> None:
    """A user who cannot read the 0640 config gets exit 3 and the fix, not "deploys allowed".

    The lock is held at the config's own path and at the default path alike.
    """
    name, gid = group
    lock = host.run / "deploy-gate.lock"
    config = host.config("threader", f'[qos]\nlock_file = "{lock}"\n', mode=0o640, gid=gid)
    _held_lock(lock)
    _held_lock(host.run / "threader.qos.lock")
    select = {
        "--instance": ["--instance", "threader"],
        "--config": ["--config", str(config)],
        "only-instance": [],
    }[how]

    runs = {
        argv: host.ctl(*select, *argv, as_nobody=True)
        for argv in (
            ("qos", "status"),
            ("qos", "status", "--json"),
            ("status",),
            ("status", "--json"),
            ("history",),
        )
    }
    as_root = host.ctl(*select, "qos", "status")

    for argv, run in runs.items():
        assert run.code == 3, (argv, run)
        # The text of `status` is a check's verdict on stdout; with --json stdout is the
        # UNKNOWN object and the line goes to stderr, as for every other command.
        said = run.out if argv == ("status",) else run.err
        assert _one_line(said).startswith(
            "UNKNOWN: " if argv == ("status",) else "guardctl: UNKNOWN: "
        )
        if "--json" in argv:
            unknown_answer(run, status=argv[0] == "status")
        assert f"{config}: permission denied" in said
        assert f"add nobody to group {name} (usermod -aG {name} nobody)" in said
        assert "deploys allowed" not in run.out
    assert as_root.code == 1
    assert str(lock) in as_root.out


def test_unreadable_config_names_the_instance_by_its_stem(host: Host) -> None:
    """The instance is the config file's stem when the file cannot be read (root's 0600)."""
    config = host.config("threader", 'instance = "threader"\n', mode=0o600)

    run = host.ctl("--config", str(config), "qos", "status", as_nobody=True)

    assert run.code == 3
    assert "to find threader's socket and lock file: give it a group" in run.err
    # Readable by root alone: the fix is the README's 0640 root:guardd, not only root.
    assert f"(chgrp guardd {config}; chmod 0640 {config})" in run.err
    assert "usermod -aG guardd nobody), or run guardctl as root" in run.err


@pytest.mark.parametrize(
    "argv",
    [("qos", "status"), ("qos", "status", "--json"), ("status",), ("history",), ("pause",)],
)
def test_misspelled_instance_is_unknown_and_lists_the_instances(
    host: Host, argv: tuple[str, ...]
) -> None:
    """An instance with no config, socket or state exits 3 and names the ones that exist."""
    host.config("threader")
    host.state("web", EVENTS)

    run = host.ctl("--instance", "thraeder", *argv)

    said = run.out if argv[0] == "status" else run.err
    assert run.code == 3
    assert _one_line(said).endswith(
        f"UNKNOWN: no guardd instance 'thraeder': no {host.etc / 'thraeder.toml'}, "
        f"no socket {host.run / 'thraeder.sock'}, no state in {host.lib / 'thraeder'}; "
        "instances here: threader, web; name one with --instance NAME\n"
    )


def test_missing_config_named_explicitly_is_unknown(host: Host) -> None:
    """`--config` or $GUARDD_CONFIG naming no file exits 3; nothing falls back to defaults."""
    host.config("threader")
    (host.run / "threader.qos.lock").unlink(missing_ok=True)
    absent = host.etc / "thraeder.toml"

    by_option = host.ctl("--config", str(absent), "qos", "status")
    by_env = guardctl(
        "qos", "status", run_dir=host.run, env={**host.env(), "GUARDD_CONFIG": str(absent)}
    )

    for run in (by_option, by_env):
        assert run.code == 3
        assert f"UNKNOWN: {absent}: no such config file" in run.err


def test_invalid_config_is_unknown(host: Host) -> None:
    """A config that is not TOML cannot say where the lock is: exit 3, and how to check it."""
    host.config("threader", "[qos\n")

    run = host.ctl("--instance", "threader", "qos", "status")

    assert run.code == 3
    assert "threader.toml: not valid TOML" in run.err
    assert "guardd check-config" in run.err


def test_missing_or_hidden_lock_directory_is_unknown(host: Host) -> None:
    """An absent lock proves nothing when its directory is missing or cannot be searched."""
    gone = host.root / "gone" / "threader.qos.lock"
    host.config("gone", f'[qos]\nlock_file = "{gone}"\n')
    hidden = host.root / "hidden"
    hidden.mkdir(mode=0o700)
    host.config("hidden", f'[qos]\nlock_file = "{hidden / "x.lock"}"\n')
    shutil.rmtree(host.run)  # /run/guardd itself is gone (never started since boot)
    host.config("fresh")

    missing = host.ctl("--instance", "gone", "qos", "status")
    unsearchable = host.ctl("--instance", "hidden", "qos", "status", "--json", as_nobody=True)
    no_run_dir = host.ctl("--instance", "fresh", "qos", "status")

    assert missing.code == 3
    assert f"the lock directory {gone.parent} does not exist" in missing.err
    assert (
        f"{hidden} cannot be searched (permission denied)"
        in (unknown_answer(unsearchable)["warning"])
    )
    assert no_run_dir.code == 3
    assert f"the lock directory {host.run} does not exist" in no_run_dir.err


@pytest.mark.parametrize("argv", [("qos", "status"), ("status",), ("history",), ("switch", "blue")])
def test_no_instance_at_all_is_unknown(host: Host, argv: tuple[str, ...]) -> None:
    """With no instance on the host and none named, every command exits 3 and says where."""
    host.config("example")  # the packaged example is not an instance

    run = host.ctl(*argv)

    said = run.out if argv[0] == "status" else run.err
    assert run.code == 3
    assert "UNKNOWN: no guardd instance found here (no " in _one_line(said)
    assert "name one with --instance NAME or --config PATH" in said


def test_the_only_instance_is_used(host: Host, guard: FakeGuard, run_dir: Path) -> None:
    """Without --instance, the one instance on the host is used, whichever place shows it."""
    host.config(
        "threader",
        f'[control]\nsocket = "{run_dir / "threader.sock"}"\n'
        f'[qos]\nlock_file = "{guard.lock_file}"\n',
    )
    guard.lock_file.touch()

    status = host.ctl("status", "--json")
    blocked = host.ctl("qos", "status")

    assert status.code == 1  # the lock is held: WARNING
    assert json.loads(status.out)["guard"] == "threader"
    assert blocked.code == 1
    assert str(guard.lock_file) in blocked.out


def test_the_only_instance_by_its_journal(host: Host) -> None:
    """An instance known by its state alone is used too; its journal answers `history`."""
    journal = host.state("web", EVENTS)

    history = host.ctl("history", "--json")
    allowed = host.ctl("qos", "status")

    assert (history.code, json.loads(history.out)) == (0, EVENTS)
    assert str(journal) in history.err
    assert (allowed.code, allowed.out) == (
        0,
        f"no QoS lock: deploys allowed ({host.run / 'web.qos.lock'})\n",
    )


@pytest.mark.parametrize("argv", [("qos", "status"), ("status",), ("history",), ("qos", "unlock")])
def test_several_instances_are_listed(host: Host, argv: tuple[str, ...]) -> None:
    """Without --instance among several instances, guardctl exits 3 and lists them."""
    host.config("alpha")
    host.config("example")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(host.run / "beta.sock"))
        (host.run / "notasocket.sock").touch()
        host.state("gamma", [])
        (host.lib / "empty").mkdir()

        run = host.ctl(*argv)

    said = run.out if argv[0] == "status" else run.err
    assert run.code == 3
    assert _one_line(said).endswith(
        "UNKNOWN: several guardd instances here (alpha, beta, gamma): "
        "name one with --instance NAME\n"
    )


def test_qos_status_with_only_a_socket_asks_guardd(guard: FakeGuard, run_dir: Path) -> None:
    """`--socket` alone does not say where the lock is: guardd answers, or it is UNKNOWN."""
    guard.lock_file.touch()

    held = guardctl("--socket", str(run_dir / "threader.sock"), "qos", "status", run_dir=run_dir)
    down = guardctl("--socket", str(run_dir / "gone.sock"), "qos", "status", run_dir=run_dir)

    assert held.code == 1
    assert f"guardd at {run_dir / 'threader.sock'}" in held.out
    assert down.code == 3
    assert "name the instance with --instance NAME or --config PATH" in down.err


_RELEASED_BY_GUARDD = (
    "(expired; guardd releases it, or extends the guard window, at its next check)"
)


@pytest.mark.parametrize(
    ("by", "owned", "note"),
    [
        ("guardd", None, _RELEASED_BY_GUARDD),
        ("uid:0(root)", True, _RELEASED_BY_GUARDD),  # an operator's, taken through guardd
        ("uid:0(root)", False, ("(expired, but guardd did not take it (written by hand?) and "
         "never removes it: it holds until it is removed (`guardctl qos unlock`))")),
    ],
)  # fmt: skip
def test_qos_status_of_an_expired_lock_with_the_daemon_up(
    guard: FakeGuard, run_dir: Path, by: str, owned: bool | None, note: str
) -> None:
    """With guardd running, an expired lock still blocks. guardd releases or extends its
    own; one it did not take (a `uid:` lock written by hand while it was down: its answer
    says `owned: false`) it never removes, and guardctl does not promise it will."""
    lock = {"reason": "r", "by": by, "until": "2026-01-01T00:00:00Z"}
    guard.lock_file.write_text(json.dumps(lock))
    if owned is not None:
        guard.qos_answer = {**read_lock(guard.lock_file).to_json(), "owned": owned}

    run = guardctl("--instance", "threader", "qos", "status", run_dir=run_dir)

    assert run.code == 1
    assert f"  until      2026-01-01T00:00:00Z {note}\n" in run.out
    assert [cmd for cmd, _, _ in guard.calls] == ["qos_status"]


def test_a_socket_does_not_vouch_for_a_misspelled_instance(guard: FakeGuard, run_dir: Path) -> None:
    """`--instance typo --socket S`: the lock of "typo" is no answer; guardd at S gives it."""
    guard.lock_file.touch()
    sock = str(run_dir / "threader.sock")

    gate = guardctl("--instance", "thraeder", "--socket", sock, "qos", "status", run_dir=run_dir)
    status = guardctl("--instance", "thraeder", "--socket", sock, "status", run_dir=run_dir)

    assert gate.code == 1
    assert f"guardd at {sock}" in gate.out
    assert status.code == 1  # the lock is held: WARNING, from the guard at the socket


# --- UNKNOWN with --json: an object saying so on stdout, exit 3, never an empty stdout.

_JSON_ANSWERS = [("qos", "status", "--json"), ("status", "--json"), ("status", "--watch", "--json")]


@pytest.mark.parametrize("argv", _JSON_ANSWERS, ids=["qos-status", "status", "watch"])
def test_which_guard_cannot_be_told_answers_a_json_unknown(
    host: Host, argv: tuple[str, ...]
) -> None:
    """No instance, several, a misspelled one, a config missing, not TOML, or naming another
    instance with nobody answering: with --json a pipeline parses an UNKNOWN object."""
    is_status = argv[0] == "status"
    host.config("example")  # the packaged example is not an instance
    nothing = host.ctl(*argv)
    alpha = host.config("alpha")
    host.config("beta")
    host.config("broken", "[qos\n")
    several = host.ctl(*argv)
    misspelled = host.ctl("--instance", "alhpa", *argv)
    absent = host.ctl("--config", str(host.etc / "gone.toml"), *argv)
    broken = host.ctl("--instance", "broken", *argv)
    other = host.ctl("--instance", "beta", "--config", str(alpha), *argv)

    cases = [
        (nothing, None, "no guardd instance found here (no "),
        (several, None, "several guardd instances here (alpha, beta, broken)"),
        (misspelled, "alhpa", "no guardd instance 'alhpa': no "),
        (absent, None, f"{host.etc / 'gone.toml'}: no such config file"),
        (broken, "broken", "broken.toml: not valid TOML"),
        (other, "beta", f"{alpha} is instance 'alpha', not 'beta', and no guardd answers"),
    ]
    for run, guard, why in cases:
        doc = unknown_answer(run, status=is_status)
        assert why in doc["warning"], (why, doc)
        if is_status:
            assert doc["guard"] == guard, doc
        # `status --watch --json` prints compact lines; the others indent.
        assert run.out.count("\n") == 1 if "--watch" in argv else run.out.count("\n") > 1


@pytest.fixture
def silent_socket(run_dir: Path) -> Iterator[Path]:
    """A control socket that accepts connections and never answers (a guardd hung)."""
    path = run_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen(8)
        yield path
    path.unlink()


def test_guardd_not_answering_is_a_json_unknown(
    guard: FakeGuard, run_dir: Path, stopped: str, silent_socket: Path
) -> None:
    """guardd not running, a dead socket, one that never answers (5 s), an error answer:
    `status --json` (also `--watch`) and `qos status --json` through `--socket` answer the
    UNKNOWN object; the text forms keep their line."""
    dead = run_dir / "dead-json.sock"
    threader = str(run_dir / "threader.sock")
    guard.failing.update({"status", "qos_status"})
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(dead))  # bound, never listening: nothing listens
        with ThreadPoolExecutor(max_workers=8) as pool:
            runs = {
                name: pool.submit(guardctl, *argv, run_dir=run_dir)
                for name, argv in {
                    "stopped": ("--instance", stopped, "status", "--json"),
                    "stopped-watch": ("--instance", stopped, "status", "--watch", "--json"),
                    "stopped-text": ("--instance", stopped, "status"),
                    "gone-qos": ("--socket", str(run_dir / "gone.sock"), "qos", "status", "--json"),
                    "dead": ("--socket", str(dead), "status", "--json"),
                    "dead-qos": ("--socket", str(dead), "qos", "status", "--json"),
                    "silent": ("--socket", str(silent_socket), "status", "--json"),
                    "silent-qos": ("--socket", str(silent_socket), "qos", "status", "--json"),
                }.items()
            }
            done = {name: future.result() for name, future in runs.items()}
    dead.unlink()
    failing = guardctl("--instance", "threader", "status", "--json", run_dir=run_dir)
    failing_qos = guardctl("--socket", threader, "qos", "status", "--json", run_dir=run_dir)

    for name in ("stopped", "stopped-watch"):
        doc = unknown_answer(done[name], status=True)
        assert doc["guard"] == stopped
        assert doc["warning"].startswith(f"guardd stopped: no control socket at {run_dir}"), doc
    assert done["stopped-watch"].out.count("\n") == 1
    text = done["stopped-text"]
    assert (text.code, text.err) == (3, "")
    assert text.out == f"UNKNOWN: {json.loads(done['stopped'].out)['warning']}\n"
    assert "no control socket at" in unknown_answer(done["gone-qos"])["warning"]
    assert "nothing listens" in unknown_answer(done["dead"], status=True)["warning"]
    assert "nothing listens" in unknown_answer(done["dead-qos"])["warning"]
    for name, is_status in (("silent", True), ("silent-qos", False)):
        doc = unknown_answer(done[name], status=is_status)
        assert "guardd did not answer within 5s" in doc["warning"], doc
        assert doc.get("guard") is None
    assert "internal error" in unknown_answer(failing, status=True)["warning"]
    assert unknown_answer(failing, status=True)["guard"] == "threader"
    assert "internal error" in unknown_answer(failing_qos)["warning"]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            {"locked": None, "unknown": True, "reason": None, "until": None, "locked_at": None,
             "by": None, "source": "fleet",
             "warning": "etcd is unreachable: the fleet's QoS lock is unknown"},
            id="fleet-unknown",
        ),
        pytest.param({"locked": None, "reason": None, "until": None}, id="locked-null"),
        pytest.param({"reason": "no locked key"}, id="no-locked"),
    ],
)  # fmt: skip
def test_a_lock_guardd_cannot_tell_is_a_json_unknown(
    guard: FakeGuard, run_dir: Path, answer: dict[str, Any]
) -> None:
    """guardd answering that it cannot tell (a fleet node cut off from etcd), or an answer
    without a true or false `locked`: UNKNOWN, exit 3, never "deploys allowed" (exit 0)."""
    guard.qos_answer = answer
    sock = str(run_dir / "threader.sock")

    as_json = guardctl("--socket", sock, "qos", "status", "--json", run_dir=run_dir)
    text = guardctl("--socket", sock, "qos", "status", run_dir=run_dir)

    doc = unknown_answer(as_json)
    assert doc["warning"].startswith(f"guardd at {sock}: "), doc
    if answer.get("unknown"):
        assert doc["warning"] == f"guardd at {sock}: {answer['warning']}"
        assert doc["source"] == "fleet"
    else:
        assert doc["warning"].endswith("its answer does not say whether the lock is held")
        assert "source" not in doc
    assert (text.code, text.out, text.err) == (3, "", as_json.err)


@contextlib.contextmanager
def _silent_tcp() -> Iterator[str]:
    """A loopback URL that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("etcd", ["closed", "silent", "not-http", "tls"])
def test_a_fleet_lock_etcd_cannot_give_is_a_json_unknown(
    tmp_path: Path, run_dir: Path, etcd: str
) -> None:
    """`qos status --config --json` with `[fleet]` and etcd not to be asked (nothing listens,
    no answer in 2 s, no HTTP, TLS files missing): the UNKNOWN object, `"source": "fleet"`;
    the text form keeps its line on stderr alone."""
    lock = tmp_path / "threader.qos.lock"
    config = _write_config(tmp_path / "threader.toml", tmp_path / "nobody-listens.sock", lock)
    with contextlib.ExitStack() as stack:
        url, why = {
            "closed": (f"http://127.0.0.1:{_closed_port()}", "URLError: Connection refused"),
            "silent": (stack.enter_context(_silent_tcp()), "TimeoutError"),
            "not-http": (stack.enter_context(_not_http()), "BadStatusLine"),
            "tls": ("https://127.0.0.1:1", "TLS files cannot be used"),
        }[etcd]
        fleet = f'\n[fleet]\nnode = "lb-a"\netcd = ["{url}"]\n'
        if etcd == "tls":
            fleet += f'ca_file = "{tmp_path / "no-such-ca.pem"}"\n'
        config.write_text(config.read_text() + fleet)
        as_json = guardctl("--config", str(config), "qos", "status", "--json", run_dir=run_dir)
        text = guardctl("--config", str(config), "qos", "status", run_dir=run_dir)

    doc = unknown_answer(as_json)
    assert doc["source"] == "fleet", doc
    assert doc["warning"].startswith("cannot tell whether the fleet's QoS lock (threader) is held")
    assert why in doc["warning"], doc
    assert (text.code, text.out, text.err) == (3, "", as_json.err)


@pytest.mark.parametrize("reachable", [True, False])
def test_fleet_status_cut_off_says_unknown_first_and_marks_every_row(reachable: bool) -> None:
    """Cut off from etcd, `fleet status` shows the fleet as last read: the head says the
    fleet is UNKNOWN now, and every node's row says it is as last read."""
    doc = {
        "prefix": "/guardd/threader",
        "node": "lb-c",
        "leader": "lb-b",
        "desired": {"color": "blue", "generation": 3},
        "rollbacks": 1,
        "etcd_reachable": reachable,
        "problem": None if reachable else "ConnectError",
        "warnings": [],
        "nodes": [
            {
                "node": n,
                "serving": "blue",
                "generation": 3,
                "lease_age_s": 22.5,
                "leader": n == "lb-b",
            }
            for n in ("lb-a", "lb-b", "lb-c")
        ],
    }
    lines = ctl.fleet_status_lines(doc)
    rows = [ln for ln in lines if ln.startswith("  ")]
    assert len(rows) == 3
    if reachable:
        assert lines[0].startswith("fleet /guardd/threader: leader lb-b")
        assert not any("as last read" in ln for ln in lines)
    else:
        assert lines[0].startswith("UNKNOWN now; as last read: fleet /guardd/threader")
        assert lines[1].startswith("WARNING: etcd is unreachable from lb-c: ConnectError")
        assert all(ln.endswith("(as last read)") for ln in rows)


def test_a_fleet_with_no_decision_yet_says_so_alike_in_status_and_fleet_status() -> None:
    """A new fleet has written no desired color: neither view shows it as a color `unset`
    at generation 0, nor as `-`."""
    lines = ctl.fleet_status_lines(
        {"prefix": "/guardd/threader", "leader": "lb-a", "desired": None, "rollbacks": 0,
         "etcd_reachable": True, "warnings": [], "nodes": []}
    )  # fmt: skip
    assert lines[0] == "fleet /guardd/threader: leader lb-a, no desired color yet, 0 rollback(s)"
    line = render._fleet_line(
        {"node": "lb-a", "leader": "lb-a", "desired": None, "generation": None, "applied": 0,
         "etcd_reachable": True, "last_read": None}
    )  # fmt: skip
    assert line == "node lb-a (leader), no desired color yet, applied here 0"


def test_fleet_status_json_without_a_daemon_is_a_json_unknown(run_dir: Path, stopped: str) -> None:
    """`fleet status --json` with guardd not answering: an UNKNOWN object on stdout, exit 3
    (a pipeline parsing it never gets plain text); the text form keeps its line."""
    dead = run_dir / "dead.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(dead))  # bound, never listening: nothing answers
        as_json = guardctl("--socket", str(dead), "fleet", "status", "--json", run_dir=run_dir)
        text = guardctl("--socket", str(dead), "fleet", "status", run_dir=run_dir)
    dead.unlink()
    assert as_json.code == 3, as_json
    doc = json.loads(as_json.out)
    assert doc["unknown"] is True and doc["etcd_reachable"] is None and doc["nodes"] == []
    assert as_json.err == f"guardctl: UNKNOWN: {doc['warning']}\n", as_json
    assert text.code == 3 and text.out.startswith("UNKNOWN: guardd "), text


def test_root_refused_is_not_told_to_run_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "threader.toml"
    path.write_text("")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    said = ctl._permission_fix(path)
    assert "root may not read it here either" in said and "CAP_DAC_OVERRIDE" in said
    assert "run guardctl as root" not in said and "run as root" not in said
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    assert ctl._permission_fix(path).endswith("or run guardctl as root")
