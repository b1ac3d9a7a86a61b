"""guardctl as operators run it: a real process against a real control socket.

The daemon is a `ControlServer` with a scripted handler that keeps to guardd's shapes
(the status object, `{"events": [...]}` for history, `{"message": ...}` for changes),
running on its own event loop in a background thread.
"""

from __future__ import annotations

import copy
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from guardd import ctl
from guardd.control.server import Caller, ControlServer
from guardd.exceptions import Refused
from guardd.qoslock import read_lock
from guardd.render import render_history, render_status

HERE = Path(__file__).parent
FIXTURES = ("steady", "guard_window", "hold", "paused")
NOBODY = 65534
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

    def reset(self, status: str = "steady") -> None:
        """Back to a fixture, no lock, no calls."""
        self.status = fixture(status)
        self.own_lock = None
        self.calls.clear()
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
        status, by = self.status, caller.by()
        status["qos"] = self._lock_json()
        if cmd == "status":
            return copy.deepcopy(status)
        if cmd == "history":
            limit = args["limit"]
            return {"events": EVENTS[-limit:] if limit else EVENTS}
        if cmd == "qos_status":
            return self._lock_json()
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


def guardctl(
    *argv: str, run_dir: Path, env: Mapping[str, str] | None = None, as_nobody: bool = False
) -> Run:
    """Run guardctl as its own process, with paths defaulting into `run_dir`."""
    assert GUARDCTL.exists(), "the guardctl script is missing: run `uv sync --frozen`"
    full_env = {
        "PATH": os.environ["PATH"],
        "RUNTIME_DIRECTORY": str(run_dir),
        "GUARDD_CONFIG": str(run_dir / "absent.toml"),
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    prefix = (
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
    )
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


def test_status_unreachable(run_dir: Path, tmp_path: Path) -> None:
    """No daemon, or a dead socket, is UNKNOWN: exit 3."""
    missing = guardctl("--instance", "nosuch", "status", run_dir=run_dir)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(run_dir / "dead.sock"))
        stale = guardctl(
            "--socket", str(run_dir / "dead.sock"), "status", "--json", run_dir=run_dir
        )

    assert missing.code == 3
    assert missing.out.startswith("UNKNOWN: guardd nosuch: no control socket at")
    assert stale.code == 3
    assert "nothing listens" in stale.out


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
        pytest.param(_status(no_rollback_target="blue is down"), 1, id="no-rollback-target"),
        pytest.param(_status(state="hold", no_rollback_target="blue"), 2, id="hold-wins"),
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
        "2026-11-22T05:01:17.598Z  started           ->green      -   guardd       "
        "guardd 0.1.0 guarding threader\n"
        "2026-11-22T05:01:24.771Z  rollback_started  green->blue  P0  guardd       "
        "HTTP 503\\x1b[2J\n"
        "2026-11-22T05:01:24.773Z  qos_locked        -            -   uid:0(root)\n"
    )
    assert render_history([]) == "no events\n"


def test_history_unreachable(run_dir: Path) -> None:
    """`history` without a daemon exits 3."""
    run = guardctl("--instance", "nosuch", "history", run_dir=run_dir)

    assert run.code == 3
    assert "no control socket" in run.err


def _write_config(path: Path, socket_path: Path, lock_file: Path) -> Path:
    path.write_text(
        f'instance = "threader"\n[control]\nsocket = "{socket_path}"\n'
        f'[qos]\nlock_file = "{lock_file}"\n'
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
                "until": "2026-11-22T04:45:00.123Z",
            }
        )
    )
    held, held_json = qos_status(), qos_status("--json")

    assert (absent.code, absent_json.code) == (0, 0)
    assert absent.out == f"no QoS lock: deploys allowed ({lock})\n"
    assert json.loads(absent_json.out) == {
        "locked": False,
        "reason": None,
        "until": None,
        "locked_at": None,
        "by": None,
    }
    assert (touched.code, touched_json.code) == (1, 1)
    assert touched.out.startswith("QoS lock HELD: deploys blocked\n")
    assert "lock file present (no details)" in touched.out
    assert json.loads(touched_json.out)["locked"] is True
    assert (held.code, held_json.code) == (1, 1)
    assert held.out == (
        "QoS lock HELD: deploys blocked\n"
        "  reason     rolled back green -> blue\n"
        "  until      2026-11-22T04:45:00.123Z\n"
        "  locked at  2026-11-22T04:40:00.123Z\n"
        "  by         guardd\n"
        f"  file       {lock}\n"
    )
    assert json.loads(held_json.out) == {
        "locked": True,
        "reason": "rolled back green -> blue",
        "until": "2026-11-22T04:45:00.123Z",
        "locked_at": "2026-11-22T04:40:00.123Z",
        "by": "guardd",
    }


def test_default_lock_path_follows_the_instance(run_dir: Path) -> None:
    """Without a config, the lock is `$RUNTIME_DIRECTORY/<instance>.qos.lock`."""
    lock = run_dir / "other.qos.lock"
    lock.touch()
    try:
        other = guardctl("--instance", "other", "qos", "status", run_dir=run_dir)
    finally:
        lock.unlink()
    default = guardctl("qos", "status", run_dir=run_dir)

    assert other.code == 1
    assert str(lock) in other.out
    assert default.code == 0
    assert str(run_dir / "default.qos.lock") in default.out


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
    resumed = guardctl(*base, "resume", run_dir=run_dir)
    locked = guardctl(*base, "qos", "lock", "--for", "5m", run_dir=run_dir)
    blocked = guardctl(*base, "qos", "status", run_dir=run_dir)
    unlocked = guardctl(*base, "qos", "unlock", run_dir=run_dir)
    allowed = guardctl(*base, "qos", "status", run_dir=run_dir)

    assert (paused.code, paused.out) == (0, "pause: done\n  paused    yes\n")
    assert warning.code == 1
    assert "paused         yes: maintenance" in warning.out
    assert (resumed.code, resumed.out) == (0, "resume: done\n  paused    no\n")
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
def test_changes_without_a_daemon_exit_3(run_dir: Path, argv: list[str]) -> None:
    """Every mutating command exits 3 when guardd does not answer."""
    run = guardctl("--instance", "nosuch", *argv, run_dir=run_dir)

    assert run.code == 3
    assert "is guardd running?" in run.err


def test_qos_lock_without_a_daemon_names_the_manual_way(run_dir: Path) -> None:
    """With guardd down, `qos lock` says how to block deploys by hand."""
    run = guardctl("--instance", "nosuch", "qos", "lock", run_dir=run_dir)

    assert f"touch {run_dir / 'nosuch.qos.lock'}" in run.err


@pytest.mark.parametrize(
    "argv",
    [
        ["switch", "blue"],
        ["rollback"],
        ["promote"],
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
        "RUNTIME_DIRECTORY": str(run_dir),
        "GUARDD_CONFIG": str(run_dir / "absent.toml"),
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
        ["status", "--bogus"],
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
