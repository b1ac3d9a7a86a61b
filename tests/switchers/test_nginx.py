"""NginxSwitcher against a real private nginx and real upstreams: traffic really moves."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd.commands import RetryPolicy
from guardd.exceptions import CommandFailed, StorageError, SwitchRefused, SwitchRejected
from guardd.switchers import NGINX_STEPS, Switcher
from guardd.switchers.nginx import NginxSwitcher
from tests.harness.nginx import Nginx
from tests.harness.upstream import Upstream

pytestmark = [pytest.mark.anyio, pytest.mark.nginx]

FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
# "upstream lab_app { server ...:1 }": the missing ";" is a syntax error nginx -t rejects.
BROKEN = "upstream lab_app {\n    server 127.0.0.1:1\n}\n"


@pytest.fixture
def upstreams() -> Iterator[dict[str, Upstream]]:
    with Upstream("blue") as blue, Upstream("green") as green:
        yield {"blue": blue, "green": green}


@pytest.fixture
def nginx(tmp_path: Path, upstreams: dict[str, Upstream]) -> Iterator[Nginx]:
    with Nginx(tmp_path / "nginx", upstreams) as server:
        assert server.wait_serving_only("blue", hold=0.1)
        yield server


def make_switcher(nginx: Nginx, **kw: Any) -> NginxSwitcher:
    params: dict[str, Any] = {
        "active_link": nginx.active_link,
        "targets": nginx.targets,
        "test_command": nginx.test_command,
        "reload_command": nginx.reload_command,
        "timeout": 10.0,
        "retry": FAST_RETRY,
    } | kw
    return NginxSwitcher(**params)


def link_target(nginx: Nginx) -> Path:
    return nginx.active_link.readlink()


def upstream_files(nginx: Nginx) -> list[str]:
    """Everything in the upstreams directory: debris of a switch would show here."""
    return sorted(p.name for p in nginx.upstream_dir.iterdir())


CLEAN = ["lab_active.conf", "lab_blue.conf", "lab_green.conf"]


def nginx_accepts(nginx: Nginx) -> bool:
    return subprocess.run(nginx.test_command, capture_output=True, check=False).returncode == 0


def logging_reload(tmp_path: Path, nginx: Nginx, log: Path, *, fail_on: str = "") -> list[str]:
    """A reload command that logs where the link points when it runs; fails on *fail_on*."""
    script = tmp_path / "logging-reload"
    fail = f'case "$target" in *{fail_on}*) exit 1;; esac\n' if fail_on else ""
    script.write_text(
        "#!/bin/sh\n"
        f'target=$(readlink "{nginx.active_link}")\n'
        f'echo "$target" >> "{log}"\n' + fail + 'exec "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script), *nginx.reload_command]


def logged_colors(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return ["green" if "green" in line else "blue" for line in lines]


async def test_switch_moves_real_traffic(nginx: Nginx) -> None:
    """blue -> green -> blue: fresh connections follow, every step is reported in order."""
    seen: list[tuple[str, str | None]] = []

    async def on_step(step: str) -> None:
        # Mid-switch, read_active() answers at once with the committed color.
        seen.append((step, await switcher.read_active()))

    switcher = make_switcher(nginx, on_step=on_step)
    assert isinstance(switcher, Switcher)
    assert await switcher.read_active() == "blue"

    await switcher.switch("green")
    assert await switcher.read_active() == "green"
    assert nginx.wait_serving_only("green")

    await switcher.switch("blue")
    assert await switcher.read_active() == "blue"
    assert nginx.wait_serving_only("blue")

    assert seen == [(step, "blue") for step in NGINX_STEPS] + [
        (step, "green") for step in NGINX_STEPS
    ]
    assert upstream_files(nginx) == CLEAN


async def test_rejected_target_is_never_loaded(nginx: Nginx) -> None:
    """nginx -t refuses green's file: SwitchRejected with nginx's words, blue stays, no reload."""
    nginx.targets["green"].write_text(BROKEN)
    workers = nginx.worker_pids()
    switcher = make_switcher(nginx)

    with pytest.raises(SwitchRejected, match=r"nginx rejected .*lab_green\.conf.*emerg"):
        await switcher.switch("green")

    assert link_target(nginx) == nginx.targets["blue"]
    assert await switcher.read_active() == "blue"
    assert upstream_files(nginx) == CLEAN
    assert nginx.worker_pids() == workers  # no reload happened: the same worker serves
    assert nginx.wait_serving_only("blue", hold=0.2)


async def test_failing_reload_is_retried_then_undone(tmp_path: Path, nginx: Nginx) -> None:
    """A reload that keeps failing: tried `attempts` times, the old link back and reloaded."""
    log = tmp_path / "reloads"
    reload = logging_reload(tmp_path, nginx, log, fail_on="green")
    switcher = make_switcher(nginx, reload_command=reload)

    with pytest.raises(CommandFailed, match=r"nginx reload .* 3 attempt\(s\)"):
        await switcher.switch("green")

    # Three tries with green in place, then the undo's reload with blue back.
    assert logged_colors(log) == ["green", "green", "green", "blue"]
    assert link_target(nginx) == nginx.targets["blue"]
    assert upstream_files(nginx) == CLEAN
    assert nginx.wait_serving_only("blue", hold=0.2)


async def test_hanging_test_command_times_out(tmp_path: Path, nginx: Nginx) -> None:
    """A test command that hangs past the switch timeout is killed; the switch is undone."""
    switcher = make_switcher(nginx, test_command=["sleep", "300"], timeout=1.0, retry=None)

    with pytest.raises(CommandFailed, match="timed out"):
        await switcher.switch("green")

    assert link_target(nginx) == nginx.targets["blue"]
    assert upstream_files(nginx) == CLEAN
    assert nginx.wait_serving_only("blue", hold=0.2)


async def test_cancelled_after_reload_is_undone(nginx: Nginx) -> None:
    """Cancelled mid-switch (SIGTERM): the old link is put back and nginx reloaded onto it."""
    reached = anyio.Event()

    async def stall_after_reload(step: str) -> None:
        if step == "reloaded":
            reached.set()
            await anyio.sleep_forever()

    switcher = make_switcher(nginx, on_step=stall_after_reload)
    async with anyio.create_task_group() as tg:
        tg.start_soon(switcher.switch, "green")
        with anyio.fail_after(30):
            await reached.wait()
        tg.cancel_scope.cancel()

    assert link_target(nginx) == nginx.targets["blue"]
    assert upstream_files(nginx) == CLEAN
    assert nginx.wait_serving_only("blue")


async def test_read_active_adopts_a_change_made_by_hand(nginx: Nginx) -> None:
    """`ln -sfn` + reload by an operator is the truth; a link elsewhere is unknown."""
    switcher = make_switcher(nginx)

    await anyio.run_process(["ln", "-sfn", str(nginx.targets["green"]), str(nginx.active_link)])
    nginx.reload()
    assert await switcher.read_active() == "green"
    assert nginx.wait_serving_only("green")

    # A relative link to the same file is the same color.
    await anyio.run_process(["ln", "-sfn", "lab_blue.conf", str(nginx.active_link)])
    assert await switcher.read_active() == "blue"

    other = nginx.upstream_dir / "lab_canary.conf"
    other.write_text(nginx.targets["blue"].read_text())
    await anyio.run_process(["ln", "-sfn", str(other), str(nginx.active_link)])
    assert await switcher.read_active() is None


async def test_read_active_says_why_there_is_no_link_to_read(nginx: Nginx) -> None:
    """A link removed, or a file put in its place, is no target that names nothing: the
    error says which, for the hold to quote."""
    switcher = make_switcher(nginx)
    link = nginx.active_link
    link.unlink()
    with pytest.raises(StorageError, match=f"^{re.escape(str(link))}: does not exist$"):
        await switcher.read_active()
    link.write_text(nginx.targets["blue"].read_text())
    with pytest.raises(StorageError, match=r": not a symlink \(a regular file\)$"):
        await switcher.read_active()
    link.unlink()
    link.mkdir()
    with pytest.raises(StorageError, match=r": not a symlink \(a directory\)$"):
        await switcher.read_active()
    link.rmdir()
    link.symlink_to(nginx.targets["green"])
    assert await switcher.read_active() == "green"


@pytest.mark.parametrize("place", ["nothing", "a folder"])
async def test_a_switch_with_no_link_to_swap_is_refused_before_anything_is_written(
    nginx: Nginx, place: str
) -> None:
    """No link to keep as the undo record: refused at the switch step, nothing written, and
    the error says how to put one there by hand (guardd adopts it)."""
    switcher = make_switcher(nginx)
    link = nginx.active_link
    link.unlink()
    if place == "a folder":
        link.mkdir()
    before = sorted(p.name for p in link.parent.iterdir())
    with pytest.raises(SwitchRefused) as info:
        await switcher.switch("blue")
    assert info.value.step == "switch"
    said = "does not exist" if place == "nothing" else "is not a symlink (a directory)"
    assert str(info.value).startswith(f"{link} {said}"), info.value
    assert "ln -sfn TARGET" in str(info.value)
    assert sorted(p.name for p in link.parent.iterdir()) == before


# -- recovery after kill -9 ----------------------------------------------------------

_KILL_AT_STEP = """
import json, os, signal, sys
from pathlib import Path
import anyio
from guardd.switchers.nginx import NginxSwitcher

spec = json.loads(sys.argv[1])

async def kill_at(step):
    if step == spec["step"]:
        os.kill(os.getpid(), signal.SIGKILL)

switcher = NginxSwitcher(
    active_link=Path(spec["active_link"]),
    targets={color: Path(p) for color, p in spec["targets"].items()},
    test_command=spec["test_command"],
    reload_command=spec["reload_command"],
    timeout=30,
    retry=None,
    on_step=kill_at,
)
anyio.run(switcher.switch, "green")
"""


async def crash_switch_to_green(nginx: Nginx, step: str) -> None:
    """Run a switch to green in another process and SIGKILL it right after *step*."""
    spec = {
        "step": step,
        "active_link": str(nginx.active_link),
        "targets": {color: str(p) for color, p in nginx.targets.items()},
        "test_command": nginx.test_command,
        "reload_command": nginx.reload_command,
    }
    crashed = await anyio.run_process(
        [sys.executable, "-c", _KILL_AT_STEP, json.dumps(spec)], check=False
    )
    assert crashed.returncode == -9, crashed.stderr.decode()


@pytest.mark.parametrize(
    ("step", "green_broken", "survivor"),
    [
        ("link_written", False, "blue"),  # never in force: undone
        ("renamed", False, "green"),  # renamed, not tested: accepted, so finished
        ("renamed", True, "blue"),  # renamed onto a file nginx rejects: undone
        ("tested", False, "green"),  # tested fine, never reloaded: finished
        ("tested", True, "blue"),  # rejected, killed before the undo: undone
        ("reloaded", False, "green"),  # done but for the commit: finished
    ],
)
async def test_recover_after_kill_at_each_step(
    nginx: Nginx, step: str, green_broken: bool, survivor: str
) -> None:
    """Wherever the kill hit, recover() leaves an accepted link, no debris, traffic on it."""
    if green_broken:
        nginx.targets["green"].write_text(BROKEN)
    await crash_switch_to_green(nginx, step)
    assert upstream_files(nginx) != CLEAN  # the crash did leave something to recover

    switcher = make_switcher(nginx)
    assert await switcher.read_active() == "blue"  # uncommitted: the undo record rules
    await switcher.recover()

    assert link_target(nginx) == nginx.targets[survivor]
    assert await switcher.read_active() == survivor
    assert upstream_files(nginx) == CLEAN
    assert nginx_accepts(nginx)
    assert nginx.wait_serving_only(survivor)


async def test_recover_clears_a_lone_pending_link_without_reloading(
    tmp_path: Path, nginx: Nginx
) -> None:
    """A pending link with no undo record was never in force: removed, nothing reloaded."""
    log = tmp_path / "reloads"
    pending = nginx.upstream_dir / ".lab_active.conf.guardd-new"
    pending.symlink_to(nginx.targets["green"])
    switcher = make_switcher(nginx, reload_command=logging_reload(tmp_path, nginx, log))

    await switcher.recover()

    assert upstream_files(nginx) == CLEAN
    assert link_target(nginx) == nginx.targets["blue"]
    assert logged_colors(log) == []


async def test_recover_refuses_a_rejected_hand_made_link(nginx: Nginx) -> None:
    """No undo record and nginx rejects the active link: guardd reports, does not overrule."""
    nginx.targets["blue"].write_text(BROKEN)

    with pytest.raises(SwitchRejected, match="nginx rejects the active link"):
        await make_switcher(nginx).recover()

    assert link_target(nginx) == nginx.targets["blue"]


async def test_restore_puts_the_replaced_link_back_and_reloads(
    tmp_path: Path, nginx: Nginx
) -> None:
    """A committed switch that did not verify is undone: the exact old link, nginx reloaded."""
    # A hand-made, relative link to blue: restore puts this very text back, not a rewrite.
    nginx.active_link.unlink()
    nginx.active_link.symlink_to(nginx.targets["blue"].name)
    switcher = make_switcher(nginx)
    await switcher.switch("green")
    assert nginx.wait_serving_only("green", hold=0.2)

    await switcher.restore("blue")

    assert link_target(nginx) == Path(nginx.targets["blue"].name)
    assert nginx.wait_serving_only("blue", hold=0.2)
    assert upstream_files(nginx) == CLEAN


async def test_restore_without_a_remembered_switch_sets_the_color(
    tmp_path: Path, nginx: Nginx
) -> None:
    """After a restart the switcher remembers nothing: restore points the link at the color."""
    nginx.active_link.unlink()
    nginx.active_link.symlink_to(nginx.targets["green"])  # changed, never reloaded
    await make_switcher(nginx).restore("blue")
    assert link_target(nginx) == nginx.targets["blue"]
    assert nginx.wait_serving_only("blue", hold=0.2)


async def test_reapply_reloads_what_the_link_names(nginx: Nginx) -> None:
    """A link flipped by hand without a reload: reapply makes nginx serve it."""
    nginx.active_link.unlink()
    nginx.active_link.symlink_to(nginx.targets["green"])
    assert nginx.served_color() == "blue"
    await make_switcher(nginx).reapply()
    assert nginx.wait_serving_only("green", hold=0.2)
    assert link_target(nginx) == nginx.targets["green"]


async def test_failed_steps_are_named(tmp_path: Path, nginx: Nginx) -> None:
    """The error says which step failed: test (a rejected target) or reload."""
    nginx.targets["green"].write_text(BROKEN)
    with pytest.raises(SwitchRejected) as rejected:
        await make_switcher(nginx).switch("green")
    assert rejected.value.step == "test"
    nginx.write_target("green")
    failing = [sys.executable, "-c", "raise SystemExit(1)"]
    with pytest.raises(CommandFailed) as reload_failed:
        await make_switcher(nginx, reload_command=failing).switch("green")
    assert reload_failed.value.step == "reload"
    assert link_target(nginx) == nginx.targets["blue"]
    with pytest.raises(CommandFailed) as reapply_failed:
        await make_switcher(nginx, reload_command=failing).reapply()
    assert reapply_failed.value.step == "reload"


async def test_a_reapply_reloads_once_where_a_switch_retries(tmp_path: Path, nginx: Nginx) -> None:
    """A re-apply is a repair guardd tries from the decision path, where a rollback the
    active color's failure calls for waits behind it: a failed reload is not retried."""
    calls = tmp_path / "reloads"
    failing = [sys.executable, "-c", f"open({str(calls)!r}, 'a').write('.'); raise SystemExit(1)"]
    with pytest.raises(CommandFailed):
        await make_switcher(nginx, reload_command=failing).reapply()
    assert calls.read_text() == "."
    calls.unlink()
    with pytest.raises(CommandFailed):
        await make_switcher(nginx, reload_command=failing).switch("green")
    assert len(calls.read_text()) >= FAST_RETRY.attempts  # (then the undo's own reloads)


async def test_a_target_that_is_no_regular_file_is_refused_at_once(
    tmp_path: Path, nginx: Nginx
) -> None:
    """A FIFO where green's file was: nginx's test would wait on it for the whole
    timeout and say nothing; the switch is refused before anything is touched."""
    nginx.targets["green"].unlink()
    os.mkfifo(nginx.targets["green"])
    switcher = make_switcher(nginx)
    with anyio.fail_after(5), pytest.raises(SwitchRejected) as refused:
        await switcher.switch("green")
    assert (
        str(refused.value)
        == f"green's target {nginx.targets['green']}: not a regular file (a FIFO)"
    )
    assert link_target(nginx) == nginx.targets["blue"]
    with anyio.fail_after(5), pytest.raises(SwitchRejected):
        await switcher.test_target("green")


async def test_retries_cut_short_by_the_timeout_say_why_they_failed(
    tmp_path: Path, nginx: Nginx
) -> None:
    """A reload failing again and again until `switch.timeout` runs out: "timed out" alone
    hides what nginx said; the last attempt's error is told with it."""
    says = "import sys; sys.stderr.write('nginx: [error] invalid PID number\\n'); sys.exit(1)"
    slow = RetryPolicy(attempts=100, base_delay=0.2, max_delay=0.2)
    switcher = make_switcher(
        nginx, reload_command=[sys.executable, "-c", says], retry=slow, timeout=1.5
    )
    with pytest.raises(CommandFailed) as failed:
        await switcher.switch("green")
    assert "switch to green timed out after 1.5s (nginx reload: exited with status 1: " in str(
        failed.value
    ), failed.value
    assert "[error] invalid PID number" in str(failed.value)
