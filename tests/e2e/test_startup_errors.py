"""`guardd run` as a user who may not write what the config names: one line, exit 1.

Real `guardd run` processes, run as `nobody` with setpriv, against a state dir and a control
socket folder that only root may write. The guard itself needs no nginx here: a state-file
switch and upstreams on closed ports are enough to reach every start-up step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import NOBODY, nobody_prefix
from tests.harness.paths import shared_tmp_dir
from tests.harness.receiver import closed_port

HINT = (
    "run guardd as the guardd user (as guardd@.service does), "
    "or set {key} to a path this user may write"
)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder that `nobody` may enter but not write (pytest's tmp is private to root)."""
    with shared_tmp_dir("guardd-startup-") as path:
        yield path


def write_config(folder: Path, *, default_lock: bool = False, **sections: dict[str, str]) -> Path:
    """A config for `nobody`; its QoS lock in a folder nobody may write, unless
    `default_lock` leaves it at its default (/run/guardd, root's)."""
    state_file = folder / "deploy" / "state.json"
    state_file.parent.mkdir(exist_ok=True)
    state_file.parent.chmod(0o777)
    state_file.write_text(json.dumps({"activeColor": "blue"}))
    state_file.chmod(0o666)
    if not default_lock:
        sections = {"qos": {"lock_file": str(state_file.parent / "x.qos.lock")}, **sections}
    lines = [
        'instance = "x"',
        "[upstreams.blue]",
        f'url = "http://127.0.0.1:{closed_port()}/healthz"',
        "[upstreams.green]",
        f'url = "http://127.0.0.1:{closed_port()}/healthz"',
        "[probe]",
        'interval = "200ms"',
        'timeout = "500ms"',
        "[switch]",
        'kind = "state-file"',
        f'path = "{state_file}"',
    ]
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f'{k} = "{v}"' for k, v in body.items()]
    path = folder / "x.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def guardd_run(config: Path, *, as_nobody: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = nobody_prefix(as_nobody)
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    return subprocess.run(
        [*prefix, sys.executable, "-m", "guardd.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
        check=False,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "ExceptionGroup" not in result.stderr
    return result.stderr.splitlines()


def test_a_state_dir_the_user_cannot_create_is_one_line(shared_tmp: Path) -> None:
    locked = shared_tmp / "root-only"
    locked.mkdir(mode=0o755)
    config = write_config(
        shared_tmp,
        state={"dir": str(locked / "state")},
        control={"socket": str(shared_tmp / "run" / "x.sock")},
    )
    (shared_tmp / "run").mkdir(mode=0o777)
    (shared_tmp / "run").chmod(0o777)
    lines = assert_clean_failure(guardd_run(config))
    assert lines == [
        f"{config}: state.dir: cannot create {locked}/state: Permission denied; "
        + HINT.format(key="state.dir")
    ]


def test_an_existing_state_dir_the_user_cannot_write_is_one_line(shared_tmp: Path) -> None:
    state = shared_tmp / "state"
    state.mkdir(mode=0o755)  # root's, as /var/lib/guardd/<i> is the guardd user's
    run = shared_tmp / "run"
    run.mkdir()
    run.chmod(0o777)
    config = write_config(
        shared_tmp, state={"dir": str(state)}, control={"socket": str(run / "x.sock")}
    )
    lines = assert_clean_failure(guardd_run(config))
    assert lines == [
        f"{config}: state.dir: cannot write {state}: Permission denied; "
        + HINT.format(key="state.dir")
    ]


def test_the_default_paths_as_another_user_are_one_line_each(shared_tmp: Path) -> None:
    """No state.dir, no control.socket, no qos.lock_file: /var/lib/guardd/x,
    /run/guardd/x.sock and /run/guardd/x.qos.lock, root's."""
    config = write_config(shared_tmp, default_lock=True)
    lines = assert_clean_failure(guardd_run(config))
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{config}: state.dir: cannot create /var/lib/guardd/x: ")
    assert lines[0].endswith(HINT.format(key="state.dir"))
    assert lines[1].startswith(f"{config}: control.socket: ")
    assert "/run/guardd" in lines[1]
    assert lines[1].endswith(HINT.format(key="control.socket"))
    # The lock's folder too: a lock guardd cannot write is one deploys never see.
    assert lines[2].startswith(f"{config}: qos.lock_file: cannot ")
    assert "/run/guardd" in lines[2]
    assert lines[2].endswith(HINT.format(key="qos.lock_file"))


def test_a_socket_folder_the_user_cannot_write_is_one_line(shared_tmp: Path) -> None:
    state = shared_tmp / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    locked = shared_tmp / "root-run"
    locked.mkdir(mode=0o755)
    config = write_config(
        shared_tmp, state={"dir": str(state)}, control={"socket": str(locked / "x.sock")}
    )
    lines = assert_clean_failure(guardd_run(config))
    assert lines == [
        f"{config}: control.socket: cannot bind {locked}/x.sock: Permission denied; "
        + HINT.format(key="control.socket")
    ]
    assert not list(state.iterdir()), "nothing may start before the paths are known good"


def test_a_socket_that_fails_to_bind_after_start_up_is_one_log_line(shared_tmp: Path) -> None:
    """The socket is bound after the first probe round: a bind error there stops guardd cleanly."""
    state = shared_tmp / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    # Writable folder, but a name longer than AF_UNIX allows: only bind() itself can tell.
    deep = shared_tmp / ("d" * 100)
    deep.mkdir()
    deep.chmod(0o777)
    sock = deep / "x.sock"
    config = write_config(shared_tmp, state={"dir": str(state)}, control={"socket": str(sock)})
    lines = assert_clean_failure(guardd_run(config))
    failed = [json.loads(line) for line in lines if '"startup_failed"' in line]
    assert len(failed) == 1, lines
    assert failed[0]["level"] == "error"
    assert failed[0]["error"].startswith(f"{config}: control.socket: cannot bind {sock}: ")
    assert failed[0]["error"].endswith(HINT.format(key="control.socket"))
    events = [
        json.loads(line)["event"] for line in (state / "events.jsonl").read_text().splitlines()
    ]
    assert events[-1] == "stopped"


def test_a_file_where_the_socket_belongs_is_one_line(shared_tmp: Path) -> None:
    """Even for root: guardd never removes a file that is not a socket to bind its own."""
    squatter = shared_tmp / "x.sock"
    squatter.write_text("someone's file\n")
    config = write_config(
        shared_tmp, state={"dir": str(shared_tmp / "state")}, control={"socket": str(squatter)}
    )
    lines = assert_clean_failure(guardd_run(config, as_nobody=False))
    assert lines == [
        f"{config}: control.socket: cannot bind {squatter}: something that is not a socket "
        "is in the way; " + HINT.format(key="control.socket")
    ]
    assert squatter.read_text() == "someone's file\n"


def test_socket_groups_this_host_lacks_are_one_line_each(tmp_path: Path) -> None:
    # Looked up only as the socket is bound, after the first probe round: an
    # ExceptionGroup from the task group, once.
    config = write_config(
        tmp_path,
        state={"dir": str(tmp_path / "state")},
        control={
            "socket": str(tmp_path / "run" / "x.sock"),
            "group": "guardd-no-such-group",
            "admin_group": "guardd-no-such-admins",
        },
    )
    lines = assert_clean_failure(guardd_run(config, as_nobody=False))
    assert lines == [
        f"{config}: control.group: no group 'guardd-no-such-group' on this host",
        f"{config}: control.admin_group: no group 'guardd-no-such-admins' on this host",
    ]
