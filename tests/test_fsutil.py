"""Atomic writes and symlink-refusing opens, on a real filesystem."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardd import fsutil
from guardd.exceptions import AlreadyRunning, StorageError, UnsafePath
from guardd.fsutil import (
    atomic_write,
    hold_instance_lock,
    hold_switch_lock,
    open_nofollow,
    read_bytes,
    release_switch_lock,
    remove_debris,
    temp_path_for,
)


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    """A new file gets 0o644; a replaced one keeps its mode; no temp file remains."""
    path = tmp_path / "state.json"

    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    assert path.stat().st_mode & 0o777 == 0o644

    path.chmod(0o640)
    atomic_write(path, b"two")

    assert path.read_bytes() == b"two"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_explicit_mode(tmp_path: Path) -> None:
    """An explicit mode wins over the replaced file's."""
    path = tmp_path / "secret"
    atomic_write(path, b"x")
    atomic_write(path, b"y", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600


def test_readers_see_old_or_new_never_a_mix(tmp_path: Path) -> None:
    """A reader racing many replacements only ever sees one complete version."""
    path = tmp_path / "state.json"
    versions = [bytes([65 + i]) * 65536 for i in range(4)]
    atomic_write(path, versions[0])
    seen: set[bytes] = set()
    torn: list[int] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            data = path.read_bytes()
            if data in versions:
                seen.add(data[:1])
            else:
                torn.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            atomic_write(path, versions[i % len(versions)])
    finally:
        done.set()
        thread.join()

    assert torn == []
    assert seen  # the reader did read while the writer wrote


_FAILING_WRITE = """
import resource, signal, sys
from pathlib import Path
from guardd.exceptions import StorageError
from guardd.fsutil import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
try:
    atomic_write(Path(sys.argv[1]), b"n" * 5000)
except StorageError as exc:
    print("StorageError", exc)
"""


def test_failed_write_leaves_the_old_content(tmp_path: Path) -> None:
    """A write the kernel refuses half-way (file size limit) leaves the old file, no debris."""
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    out = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert out.stdout.startswith("StorageError"), out.stderr
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_planted_symlink_at_temp_path_is_not_followed(tmp_path: Path) -> None:
    """A symlink planted at the temp path is replaced, and its target is left alone."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "state.json"
    temp_path_for(path).symlink_to(victim)

    atomic_write(path, b"new")

    assert victim.read_text() == "precious"
    assert path.read_bytes() == b"new"
    assert not path.is_symlink()
    assert not os.path.lexists(temp_path_for(path))


def test_crash_debris_is_removed(tmp_path: Path) -> None:
    """remove_debris() clears a temp file a crashed write left, and says so."""
    path = tmp_path / "state.json"
    temp_path_for(path).write_bytes(b"half")

    assert remove_debris(path) is True
    assert remove_debris(path) is False
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_symlink(tmp_path: Path) -> None:
    """The target itself being a symlink is refused; the link and its target stay."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "state.json"
    path.symlink_to(victim)

    with pytest.raises(UnsafePath, match="symlink"):
        atomic_write(path, b"new")

    assert path.is_symlink()
    assert victim.read_text() == "precious"
    assert not os.path.lexists(temp_path_for(path))


def test_refuses_to_replace_a_directory(tmp_path: Path) -> None:
    """A directory where a file is expected is refused."""
    (tmp_path / "state.json").mkdir()
    with pytest.raises(UnsafePath, match="not a regular file"):
        atomic_write(tmp_path / "state.json", b"x")


def test_open_nofollow_refuses_symlinks(tmp_path: Path) -> None:
    """O_NOFOLLOW: a symlink is refused for reading and for writing."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(victim)

    with pytest.raises(UnsafePath, match="symlink"):
        read_bytes(link)
    with pytest.raises(UnsafePath, match="symlink"):
        open_nofollow(link, os.O_WRONLY | os.O_APPEND)
    assert victim.read_text() == "precious"


def test_open_nofollow_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    """A FIFO planted where a file is expected is refused rather than hanging the open."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath, match="not a regular file"):
        read_bytes(fifo)


def test_open_nofollow_appends_to_a_regular_file(tmp_path: Path) -> None:
    """The journal's use: append to a regular file through the returned fd."""
    path = tmp_path / "events.jsonl"
    for n in range(2):
        fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, json.dumps({"n": n}).encode() + b"\n")
        finally:
            os.close(fd)

    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [0, 1]
    assert path.stat().st_mode & 0o777 == 0o600


def test_read_bytes_missing_file(tmp_path: Path) -> None:
    """A missing file is FileNotFoundError, so callers can tell it from a broken one."""
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "missing")


def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    """A write into a directory that does not exist is a StorageError, not a crash."""
    with pytest.raises(StorageError):
        atomic_write(tmp_path / "missing-dir" / "state.json", b"x")


def _held_elsewhere(target: Path) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    """Another process holding `target`'s switch lock while the block runs."""
    script = target.with_name("guardd")  # run as `python .../guardd`, as a daemon may be
    script.write_text(
        "import sys; from pathlib import Path; from guardd.fsutil import hold_switch_lock; "
        f"hold_switch_lock(Path({str(target)!r})); print('held', flush=True); sys.stdin.read()"
    )
    return _holding(script=script)


@contextlib.contextmanager
def _holding(code: str = "", script: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """Run `code` (or the file `script`) in another process, from when it prints `held`
    until the block ends."""
    with subprocess.Popen(
        [sys.executable, *(["-c", code] if script is None else [str(script)])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        try:
            yield proc
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)


@pytest.mark.parametrize("kind", ["active link", "state file"])
def test_a_switch_target_is_locked_by_one_process_until_it_ends(tmp_path: Path, kind: str) -> None:
    """The lock beside the target names its holder's pid, and dies with the holder."""
    target = tmp_path / ("app_active.conf" if kind == "active link" else "active.json")
    if kind == "active link":
        target.symlink_to(tmp_path / "blue.conf")
    else:
        target.write_text('{"activeColor": "blue"}')
    lock = tmp_path / f".{target.name}.guardd.lock"
    with _held_elsewhere(target) as holder:
        with pytest.raises(AlreadyRunning) as refused:
            hold_switch_lock(target)
        assert str(refused.value) == (
            f"another guardd (pid {holder.pid}) switches {target}: {lock} is locked"
        )
    path, fd = hold_switch_lock(target)
    try:
        assert path == lock and lock.read_text() == f"{os.getpid()}\n"
        # One process, two opens: flock tells them apart too (a reload moving back).
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            hold_switch_lock(target)
    finally:
        os.close(fd)
    # The target itself is untouched: a link stays a link to where it pointed.
    assert target.is_symlink() or target.read_text() == '{"activeColor": "blue"}'


def test_a_symlink_planted_at_the_switch_lock_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_text("{}")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".active.json.guardd.lock").symlink_to(victim)
    with pytest.raises(UnsafePath, match="symlink"):
        hold_switch_lock(target)
    assert victim.read_text() == "precious"


def test_an_alias_of_the_active_link_shares_its_lock(tmp_path: Path) -> None:
    """alias.conf -> active.conf -> blue.conf: a guard given the alias is refused beside
    the one given the link nginx reads; a link whose targets are symlinks is no alias."""
    blue, green = tmp_path / "deploy-blue.conf", tmp_path / "deploy-green.conf"
    blue.write_text("")
    green.write_text("")
    # The colors' targets are symlinks themselves (into a deploy tree): the chain stops at them.
    targets = [tmp_path / "app_blue.conf", tmp_path / "app_green.conf"]
    targets[0].symlink_to(blue)
    targets[1].symlink_to(green)
    active = tmp_path / "active.conf"
    active.symlink_to(targets[0])
    alias = tmp_path / "alias.conf"
    alias.symlink_to(active)
    path, fd = hold_switch_lock(active, targets)
    try:
        assert path == tmp_path / ".active.conf.guardd.lock"
        with pytest.raises(
            AlreadyRunning, match=r"switches .*alias\.conf: .*\.active\.conf\.guardd\.lock"
        ):
            hold_switch_lock(alias, targets)
    finally:
        os.close(fd)


def test_a_lock_held_by_a_process_that_wrote_no_pid_says_so(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_text("{}")
    lock = tmp_path / ".active.json.guardd.lock"
    with _holding(
        "import fcntl, os, sys; "
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"
    ):
        with pytest.raises(AlreadyRunning) as refused:
            hold_switch_lock(target)
        assert str(refused.value) == (
            f"another process (a guardd?) switches {target}: {lock} is locked"
        )


def _reaped_pid() -> int:
    """The pid of a process that ran, ended and was reaped."""
    with subprocess.Popen(["true"]) as proc:
        proc.wait(timeout=30)
    return proc.pid


@pytest.mark.parametrize(
    "named", ["a pid that ended", "a process that is no guardd", "a program reading its log"]
)
def test_a_lock_whose_file_names_no_running_guardd_never_blames_one(
    tmp_path: Path, named: str
) -> None:
    """The pid in a lock file is a hint: a holder that could not write its own (a full
    disk; `flock` from a shell) leaves an earlier one. Only a pid that runs guardd now is
    called another guardd, for the switch lock and the state directory's alike."""
    with contextlib.ExitStack() as stack:
        if named == "a pid that ended":
            pid = _reaped_pid()
        else:
            log = tmp_path / "guardd.log"
            log.write_text("")
            argv = (
                ["sleep", "600"]
                if named == "a process that is no guardd"
                else ["tail", "-f", str(log)]
            )
            other = stack.enter_context(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
            stack.callback(other.kill)
            pid = other.pid
        target = tmp_path / "active.json"
        target.write_text("{}")
        lock = tmp_path / ".active.json.guardd.lock"
        lock.write_text(f"{pid}\n")
        state = tmp_path / "state"
        state.mkdir()
        (state / "guardd.pid").write_text(f"{pid}\n")
        who = f"another process (the pid its file names, {pid}, runs no guardd)"
        with _holding(
            "import fcntl, os, sys; "
            f"fd = os.open({str(lock)!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            f"dfd = os.open({str(state)!r}, os.O_RDONLY); fcntl.flock(dfd, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.read()"
        ):
            with pytest.raises(AlreadyRunning) as refused:
                hold_switch_lock(target)
            assert str(refused.value) == f"{who} switches {target}: {lock} is locked"
            with pytest.raises(AlreadyRunning) as refused:
                hold_instance_lock(state)
            assert str(refused.value) == (
                f"{who} runs with this state directory: {state} is locked"
            )


@pytest.mark.parametrize(
    ("argv", "program"),
    [
        (["/usr/bin/guardd", "run", "--config", "/etc/guardd/a.toml"], "guardd"),
        (["/usr/bin/python3", "/usr/bin/guardd", "run"], "guardd"),
        (["/opt/venv/bin/python3.11", "-X", "importtime", "-m", "guardd.cli", "run"], "guardd.cli"),
        (["python", "-O", "/srv/guardd", "run"], "guardd"),
        (["tail", "-f", "/var/log/guardd.log"], "tail"),
        (["journalctl", "-u", "guardd@threader"], "journalctl"),
        (["python3", "-c", "import guardd", "guardd"], "-c"),
        (["python3", "-c", "import time; time.sleep(9)", "-m", "guardd.cli"], "-c"),
        (["python3", "-u", "-mguardd.cli", "run"], "guardd.cli"),
        (["python3", "-Wignore", "-X", "dev", "-Om", "guardd", "run"], "guardd"),
        (["python3", "-m", "guardd.ctl", "status", "--watch"], "guardd.ctl"),
        (["python3", "-m"], ""),
        ([""], ""),
    ],
)
def test_the_program_a_command_line_runs(argv: list[str], program: str) -> None:
    assert fsutil._program(argv) == program


@pytest.mark.parametrize(
    ("argv", "daemon"),
    [
        (["/usr/bin/guardd", "run"], True),
        (["python3", "-m", "guardd", "run"], True),
        (["python3", "-m", "guardd.cli", "run"], True),
        (["python3", "-m", "guardd.ctl", "status", "--watch"], False),  # guardctl
        (["/usr/bin/guardctl", "status", "--watch"], False),
        (["less", "/var/lib/guardd/threader/events.jsonl"], False),
    ],
)
def test_only_the_daemon_is_called_a_guardd(argv: list[str], daemon: bool) -> None:
    assert (fsutil._program(argv) in fsutil._DAEMONS) is daemon


def test_a_hard_link_planted_at_the_switch_lock_is_not_written(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_text("{}")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.link(victim, tmp_path / ".active.json.guardd.lock")
    with pytest.raises(UnsafePath, match="has 2 hard links; refusing to write it"):
        hold_switch_lock(target)
    assert victim.read_text() == "precious"


def test_a_lock_file_left_with_another_mode_gets_its_own(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_text("{}")
    lock = tmp_path / ".active.json.guardd.lock"
    lock.write_text("not a pid\n")
    lock.chmod(0o666)
    path, fd = hold_switch_lock(target)
    os.close(fd)
    assert path == lock and lock.stat().st_mode & 0o777 == 0o640
    assert lock.read_text() == f"{os.getpid()}\n"


def test_a_released_switch_lock_leaves_no_file_and_frees_the_target(tmp_path: Path) -> None:
    """A clean stop removes the lock file (a purge finds nothing of guardd's beside the
    link); one replaced meanwhile is not its to remove."""
    target = tmp_path / "active.json"
    target.write_text("{}")
    path, fd = hold_switch_lock(target)
    release_switch_lock(path, fd)
    assert not path.exists()
    path, fd = hold_switch_lock(target)
    path.unlink()
    path.write_text("someone else's\n")
    release_switch_lock(path, fd)
    assert path.read_text() == "someone else's\n"
