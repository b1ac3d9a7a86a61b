"""run_command and CommandSwitcher against real processes: retries, timeouts, no shell."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd.commands import RetryPolicy, run_command
from guardd.exceptions import CommandFailed, StorageError, SwitchError
from guardd.switchers import COMMAND_STEPS, Switcher
from guardd.switchers.command import CommandSwitcher, substitute
from tests.harness.procs import is_gone

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)

# Appends its arguments, as one JSON list a line, to the file named by its first one.
RECORD = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"


def script(path: Path, body: str) -> Path:
    """Write an executable sh script; what a command runs inside is its own business."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def lines(path: Path) -> list[str]:
    """Return a log file's lines, none if it was never written."""
    return path.read_text().splitlines() if path.exists() else []


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll *predicate* (a file appearing, a pid exiting) until it holds, else fail."""
    with anyio.fail_after(within):
        # Another process's files and /proc entries offer no event to await.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


# -- run_command ---------------------------------------------------------------------


async def test_success_returns_output(tmp_path: Path) -> None:
    """stdout, stderr and the status come back; one attempt was made."""
    cmd = script(tmp_path / "speak", "echo out; echo 'err one' >&2; echo 'err two' >&2\n")

    result = await run_command([str(cmd)], timeout=10, retry=FAST_RETRY, what="speak")

    assert result.ok
    assert (result.returncode, result.stdout, result.attempts) == (0, "out\n", 1)
    assert result.stderr_head(1) == "err one"


async def test_a_failure_is_told_by_the_line_that_says_what_failed(tmp_path: Path) -> None:
    """nginx's failed `-s reload` says a notice first and the error second: the error is
    what an operator needs; with no line marked, the last one (said last, as it stops)."""
    nginx_says = (
        "echo 'nginx: [notice] signal process started' >&2\n"
        'echo \'nginx: [error] invalid PID number "" in "/run/nginx.pid"\' >&2\nexit 1\n'
    )
    with pytest.raises(CommandFailed) as failed:
        await run_command(
            [str(script(tmp_path / "nginx", nginx_says))], timeout=10, retry=None, what="reload"
        )
    assert str(failed.value).endswith(
        'exited with status 1: nginx: [error] invalid PID number "" in "/run/nginx.pid"'
    )
    plain = "echo 'checking' >&2; echo 'no such upstream' >&2; exit 2\n"
    with pytest.raises(CommandFailed) as failed:
        await run_command(
            [str(script(tmp_path / "app", plain))], timeout=10, retry=None, what="reload"
        )
    assert str(failed.value).endswith("exited with status 2: no such upstream")


async def test_failure_is_retried_then_raised(tmp_path: Path) -> None:
    """A command that keeps failing runs `attempts` times, then CommandFailed names it."""
    log = tmp_path / "calls"
    cmd = script(tmp_path / "fail", f"echo call >> {log}; echo 'no way' >&2; exit 1\n")

    with pytest.raises(
        CommandFailed, match=r"reload .* 3 attempt\(s\): exited with status 1: no way"
    ):
        await run_command([str(cmd)], timeout=10, retry=FAST_RETRY, what="reload")

    assert len(lines(log)) == 3


async def test_transient_failure_recovers(tmp_path: Path) -> None:
    """A command that fails twice and then succeeds is a success on attempt 3."""
    log = tmp_path / "calls"
    cmd = script(
        tmp_path / "flaky",
        f'echo call >> {log}\n[ "$(wc -l < {log})" -ge 3 ] || exit 75\n',
    )

    result = await run_command([str(cmd)], timeout=10, retry=FAST_RETRY, what="flaky")

    assert (result.ok, result.attempts, len(lines(log))) == (True, 3, 3)


async def test_unchecked_failure_is_returned_not_retried(tmp_path: Path) -> None:
    """check=False: a deterministic "no" (like nginx -t) comes back after one attempt."""
    log = tmp_path / "calls"
    cmd = script(tmp_path / "no", f"echo call >> {log}; echo 'emerg: bad' >&2; exit 1\n")

    result = await run_command([str(cmd)], timeout=10, retry=FAST_RETRY, what="test", check=False)

    assert (result.ok, result.returncode, result.stderr_head()) == (False, 1, "emerg: bad")
    assert len(lines(log)) == 1


async def test_missing_program_fails_at_once(tmp_path: Path) -> None:
    """A command that cannot start is not retried."""
    with pytest.raises(CommandFailed, match="cannot start"):
        await run_command([str(tmp_path / "nope")], timeout=10, retry=FAST_RETRY, what="x")


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A hanging command and the child it forked are killed; CommandFailed says timed out."""
    pids = tmp_path / "pids"
    cmd = script(
        tmp_path / "hang", f"sleep 300 &\necho $$ $! > {pids}.tmp\nmv {pids}.tmp {pids}\nwait\n"
    )

    with pytest.raises(CommandFailed, match=r"timed out after 1\.5s"):
        await run_command([str(cmd)], timeout=1.5, retry=None, what="hang")

    assert pids.exists(), "the script never started within its timeout"
    shell, child = map(int, pids.read_text().split())
    await wait_for(lambda: is_gone(shell) and is_gone(child))


async def test_a_cancel_at_any_moment_of_the_start_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """A command cancelled while it starts (a rollback's deadline, a stop) is killed with
    everything it forked, whenever the cancel lands: before, asyncio killed the child
    alone when the cancel came while it connected the pipes, and the child's own child
    lived on holding them (one start in five here left one)."""
    nap = tmp_path / "nap"  # sleep under a name of its own, to look for
    nap.symlink_to(shutil.which("sleep") or "/bin/sleep")
    cmd = script(tmp_path / "fork", f'"{nap}" 300 &\nexec "{nap}" 301\n')

    def running() -> list[str]:
        found = subprocess.run(
            ["pgrep", "-f", str(nap)], check=False, capture_output=True, text=True
        )
        return found.stdout.split()

    try:
        for i in range(300):
            # From at once to 3 ms in: before the fork, in the spawn, in the wait.
            with anyio.move_on_after((i % 100) * 0.00003):
                await run_command([str(cmd)], timeout=10, retry=None, what="fork")
        await wait_for(lambda: not running())
    finally:
        await anyio.run_process(["pkill", "-f", str(nap)], check=False)


async def test_timeouts_are_retried(tmp_path: Path) -> None:
    """A timeout is transient: each attempt gets its own limit."""
    log = tmp_path / "calls"
    cmd = script(tmp_path / "slow", f"echo call >> {log}\nexec sleep 300\n")

    with pytest.raises(CommandFailed, match=r"2 attempt\(s\): timed out"):
        await run_command(
            [str(cmd)],
            timeout=0.5,
            retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01),
            what="slow",
        )

    assert len(lines(log)) == 2


async def test_cancelling_the_caller_kills_the_command(tmp_path: Path) -> None:
    """When the caller gives up (a switch's overall timeout), the command dies with it."""
    pid_file = tmp_path / "pid"
    body = f"echo $$ > {pid_file}.tmp\nmv {pid_file}.tmp {pid_file}\nexec sleep 300\n"
    cmd = script(tmp_path / "hang", body)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_command([str(cmd)], timeout=300, retry=None, what="hang"))
        await wait_for(pid_file.exists)
        tg.cancel_scope.cancel()

    await wait_for(lambda: is_gone(int(pid_file.read_text())))


# -- CommandSwitcher -----------------------------------------------------------------


def make_switcher(tmp_path: Path, command: list[str], **kw: Any) -> CommandSwitcher:
    params: dict[str, Any] = {
        "command": command,
        "instance": "threader",
        "timeout": 10.0,
        "retry": None,
        "state_path": tmp_path / "command-switch.json",
    } | kw
    return CommandSwitcher(**params)


async def test_substitution_is_per_argument_and_never_through_a_shell(tmp_path: Path) -> None:
    """{color} and {instance} are replaced; shell syntax in a value stays one literal argument."""
    out = tmp_path / "argv"
    nasty = "prod; touch PWNED $(touch PWNED2) `touch PWNED3` | cat > PWNED4 & *"
    steps: list[str] = []

    async def on_step(step: str) -> None:
        steps.append(step)

    switcher = make_switcher(
        tmp_path,
        [
            sys.executable,
            "-c",
            RECORD,
            str(out),
            "--color={color}",
            "{instance}",
            "{color}/{instance}.yaml",
            "{other}",
            '{"json": 1}',
        ],
        instance=nasty,
        on_step=on_step,
    )
    assert isinstance(switcher, Switcher)

    await switcher.switch("green")

    assert json.loads(out.read_text()) == [
        "--color=green",
        nasty,
        f"green/{nasty}.yaml",
        "{other}",
        '{"json": 1}',
    ]
    assert not set(names(Path.cwd())) & {"PWNED", "PWNED2", "PWNED3", "PWNED4"}
    assert steps == list(COMMAND_STEPS)


def test_substitute_is_one_pass() -> None:
    """A value that itself holds a placeholder is not substituted again."""
    assert substitute(["{instance}:{color}"], color="blue", instance="{color}") == ["{color}:blue"]


async def test_read_active_remembers_the_last_switch(tmp_path: Path) -> None:
    """Nothing switched yet: it says so; afterwards the color survives a new switcher
    instance."""
    command = [sys.executable, "-c", RECORD, str(tmp_path / "argv"), "{color}"]
    switcher = make_switcher(tmp_path, command)
    with pytest.raises(StorageError, match=r"command-switch\.json: does not exist: no switch"):
        await switcher.read_active()

    await switcher.switch("green")
    await switcher.switch("blue")

    assert await switcher.read_active() == "blue"
    assert await make_switcher(tmp_path, command).read_active() == "blue"
    assert names(tmp_path) == ["argv", "command-switch.json"]


async def test_failure_is_retried_and_undone_with_the_previous_color(tmp_path: Path) -> None:
    """A failing switch is retried, then the command runs for the old color; state unchanged."""
    log = tmp_path / "calls"
    cmd = script(tmp_path / "deploy", f'echo "$1" >> {log}\n[ "$1" != green ]\n')
    switcher = make_switcher(tmp_path, [str(cmd), "{color}"], retry=FAST_RETRY)
    await switcher.switch("blue")

    with pytest.raises(CommandFailed, match="switch command for green"):
        await switcher.switch("green")

    assert lines(log) == ["blue", "green", "green", "green", "blue"]
    assert await switcher.read_active() == "blue"


async def test_switch_timeout(tmp_path: Path) -> None:
    """A command running past the switch timeout fails the switch; the record is unchanged."""
    log = tmp_path / "calls"
    cmd = script(tmp_path / "deploy", f'echo "$1" >> {log}\n[ "$1" = blue ] || exec sleep 300\n')
    switcher = make_switcher(tmp_path, [str(cmd), "{color}"], timeout=1.0)
    await switcher.switch("blue")

    with pytest.raises(CommandFailed, match="timed out"):
        await switcher.switch("green")

    assert await switcher.read_active() == "blue"
    assert lines(log) == ["blue", "green", "blue"]


async def test_recover_resumes_an_interrupted_switch(tmp_path: Path) -> None:
    """A record left pending by a kill -9 is finished at start-up by re-running the command."""
    out = tmp_path / "argv"
    switcher = make_switcher(tmp_path, [sys.executable, "-c", RECORD, str(out), "{color}"])
    switcher.state_path.write_text(json.dumps({"activeColor": "blue", "pending": "green"}))

    await switcher.recover()

    assert json.loads(out.read_text()) == ["green"]
    assert await switcher.read_active() == "green"
    assert json.loads(switcher.state_path.read_text())["pending"] is None


async def test_recover_without_pending_runs_nothing(tmp_path: Path) -> None:
    """A clean record: recover() only clears temp debris."""
    out = tmp_path / "argv"
    switcher = make_switcher(tmp_path, [sys.executable, "-c", RECORD, str(out), "{color}"])
    switcher.state_path.write_text(json.dumps({"activeColor": "blue", "pending": None}))
    (tmp_path / ".command-switch.json.guardd-tmp").write_text("{half")

    await switcher.recover()

    assert not out.exists()
    assert await switcher.read_active() == "blue"
    assert names(tmp_path) == ["command-switch.json"]


async def test_detached_grandchild_holding_the_pipes_does_not_stall(tmp_path: Path) -> None:
    """A command that exits while a setsid'd child keeps stdout open still succeeds."""
    pid_file = tmp_path / "pid"
    cmd = script(
        tmp_path / "daemonize",
        f"echo started\nsetsid sh -c 'echo $$ > {pid_file}; exec sleep 300' &\n"
        f"while [ ! -s {pid_file} ]; do sleep 0.01; done\n",
    )
    try:
        # Far inside the command's own limit: a stall would end there and still "succeed".
        with anyio.fail_after(30):
            result = await run_command([str(cmd)], timeout=300, retry=None, what="daemonize")
        assert (result.ok, result.stdout) == (True, "started\n")
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_restore_and_reapply_run_the_command(tmp_path: Path) -> None:
    """Undo runs the command for the previous color; reapply runs it for the current one."""
    log = tmp_path / "calls"
    cmd = script(tmp_path / "deploy", f'echo "$1" >> {log}\n')
    switcher = make_switcher(tmp_path, [str(cmd), "{color}"])
    await switcher.switch("blue")
    await switcher.switch("green")
    await switcher.restore("blue")
    assert await switcher.read_active() == "blue"
    await switcher.reapply()
    assert lines(log) == ["blue", "green", "blue", "blue"]


async def test_reapply_before_any_switch_is_refused(tmp_path: Path) -> None:
    """Nothing was ever switched: there is nothing to re-apply, and it says so."""
    switcher = make_switcher(tmp_path, [sys.executable, "-c", "pass"])
    with pytest.raises(SwitchError, match="nothing to re-apply"):
        await switcher.reapply()


async def test_a_reapply_runs_the_command_once_where_a_switch_retries(tmp_path: Path) -> None:
    """A re-apply from the decision path is not retried (`NginxSwitcher.reapply`)."""
    log = tmp_path / "calls"
    broken = tmp_path / "broken"
    cmd = script(tmp_path / "deploy", f'echo "$1" >> {log}\n! [ -e {broken} ]\n')
    switcher = make_switcher(tmp_path, [str(cmd), "{color}"], retry=FAST_RETRY)
    await switcher.switch("green")
    broken.touch()
    with pytest.raises(CommandFailed):
        await switcher.reapply()
    assert lines(log) == ["green", "green"]
    with pytest.raises(CommandFailed):
        await switcher.switch("blue")
    assert lines(log)[2:] == ["blue"] * FAST_RETRY.attempts + ["green"] * FAST_RETRY.attempts
