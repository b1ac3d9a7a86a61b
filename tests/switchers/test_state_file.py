"""StateFileSwitcher on real files and real reload commands."""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import anyio
import pytest

from guardd.commands import RetryPolicy
from guardd.exceptions import CommandFailed, StorageError, SwitchRejected
from guardd.fsutil import temp_path_for
from guardd.switchers import STATE_FILE_STEPS, Switcher
from guardd.switchers.state_file import StateFileSwitcher

pytestmark = pytest.mark.anyio

DOCUMENT = {"version": "2.4.1", "activeColor": "blue", "replicas": {"blue": 3, "green": 3}}


def make_state(tmp_path: Path, document: object = DOCUMENT) -> Path:
    path = tmp_path / "deploy-state.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def reload_script(tmp_path: Path, state: Path, log: Path, *, fail_on: str = "") -> list[str]:
    """An app's reload: logs the color the file names when it runs; fails on *fail_on*."""
    path = tmp_path / "reload-app"
    check = f'[ "$color" != "{fail_on}" ]\n' if fail_on else ""
    path.write_text(
        "#!/bin/sh\n"
        f"color=$({sys.executable} -c 'import json,sys; print(json.load(open(sys.argv[1]))"
        f'["activeColor"])\' {state})\n'
        f'echo "$color" >> {log}\n' + check
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return [str(path)]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_switch_sets_the_color_and_keeps_everything_else(tmp_path: Path) -> None:
    """Only activeColor changes; other keys, their order and the file's style stay."""
    path = make_state(tmp_path)
    steps: list[str] = []

    async def on_step(step: str) -> None:
        steps.append(step)

    switcher = StateFileSwitcher(
        path=path, reload_command=None, timeout=10, retry=None, on_step=on_step
    )
    assert isinstance(switcher, Switcher)

    await switcher.switch("green")

    assert path.read_text() == json.dumps(DOCUMENT | {"activeColor": "green"}, indent=2) + "\n"
    assert list(json.loads(path.read_text())) == ["version", "activeColor", "replicas"]
    assert await switcher.read_active() == "green"
    assert steps == ["written"]
    assert names(tmp_path) == ["deploy-state.json"]


async def test_reload_runs_after_the_write(tmp_path: Path) -> None:
    """The reload command sees the new color on disk; both steps are reported."""
    path = make_state(tmp_path)
    log = tmp_path / "reloads"
    steps: list[str] = []

    async def on_step(step: str) -> None:
        steps.append(step)

    switcher = StateFileSwitcher(
        path=path,
        reload_command=reload_script(tmp_path, path, log),
        timeout=10,
        retry=None,
        on_step=on_step,
    )

    await switcher.switch("green")

    assert lines(log) == ["green"]
    assert steps == list(STATE_FILE_STEPS)
    assert names(tmp_path) == ["deploy-state.json", "reload-app", "reloads"]


async def test_failed_reload_restores_the_file(tmp_path: Path) -> None:
    """A reload that keeps failing: retried, the old bytes put back, the app reloaded on them."""
    path = tmp_path / "deploy-state.json"
    path.write_text('{"activeColor": "blue",  "compact": true}')  # odd spacing, kept as is
    original = path.read_bytes()
    log = tmp_path / "reloads"
    switcher = StateFileSwitcher(
        path=path,
        reload_command=reload_script(tmp_path, path, log, fail_on="green"),
        timeout=10,
        retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01),
    )

    with pytest.raises(CommandFailed, match=r"app reload .* 2 attempt\(s\)"):
        await switcher.switch("green")

    assert path.read_bytes() == original
    assert lines(log) == ["green", "green", "blue"]
    assert await switcher.read_active() == "blue"
    assert names(tmp_path) == ["deploy-state.json", "reload-app", "reloads"]


async def test_planted_symlink_at_the_temp_path_is_not_followed(tmp_path: Path) -> None:
    """Whatever waits at the temp path is replaced, never written through."""
    path = make_state(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    temp_path_for(path).symlink_to(victim)
    switcher = StateFileSwitcher(path=path, reload_command=None, timeout=10, retry=None)

    await switcher.switch("green")

    assert victim.read_text() == "precious"
    assert await switcher.read_active() == "green"
    assert not path.is_symlink()
    assert names(tmp_path) == ["deploy-state.json", "victim"]


async def test_state_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """guardd does not write through a symlink at the state path."""
    real = make_state(tmp_path)
    link = tmp_path / "linked-state.json"
    link.symlink_to(real)
    before = real.read_bytes()

    with pytest.raises(SwitchRejected, match="symlink"):
        await StateFileSwitcher(path=link, reload_command=None, timeout=10, retry=None).switch(
            "green"
        )

    assert link.is_symlink()
    assert real.read_bytes() == before


async def test_unparseable_file_is_left_alone(tmp_path: Path) -> None:
    """A file that is not a JSON object is not overwritten (it holds the app's other keys)."""
    path = tmp_path / "deploy-state.json"
    path.write_text("[1, 2")
    switcher = StateFileSwitcher(path=path, reload_command=None, timeout=10, retry=None)

    assert await switcher.read_active() is None
    with pytest.raises(SwitchRejected, match="refusing to overwrite"):
        await switcher.switch("green")
    assert path.read_text() == "[1, 2"


async def test_missing_file_is_created(tmp_path: Path) -> None:
    """No file yet: read_active() says it does not exist, and a switch creates it."""
    path = tmp_path / "deploy-state.json"
    switcher = StateFileSwitcher(path=path, reload_command=None, timeout=10, retry=None)
    with pytest.raises(StorageError, match=f"^{re.escape(str(path))}: does not exist$"):
        await switcher.read_active()

    await switcher.switch("blue")

    assert json.loads(path.read_text()) == {"activeColor": "blue"}


@pytest.mark.parametrize("document", [{"activeColor": "purple"}, {"other": 1}, ["blue"]])
async def test_read_active_unknown_is_none(tmp_path: Path, document: object) -> None:
    """A color guardd does not know, or no color at all, reads as unknown."""
    switcher = StateFileSwitcher(
        path=make_state(tmp_path, document), reload_command=None, timeout=10, retry=None
    )
    assert await switcher.read_active() is None


_KILL_AFTER_WRITE = """
import json, os, signal, sys
from pathlib import Path
import anyio
from guardd.switchers.state_file import StateFileSwitcher

async def kill_after_write(step):
    if step == "written":
        os.kill(os.getpid(), signal.SIGKILL)

path, reload = sys.argv[1], json.loads(sys.argv[2])
switcher = StateFileSwitcher(path=Path(path), reload_command=reload, timeout=30, retry=None,
                             on_step=kill_after_write)
anyio.run(switcher.switch, "green")
"""


async def test_recover_after_kill_between_write_and_reload(tmp_path: Path) -> None:
    """kill -9 after the write: recover() reloads so the app runs what the file says."""
    path = make_state(tmp_path)
    log = tmp_path / "reloads"
    reload = reload_script(tmp_path, path, log)
    crashed = await anyio.run_process(
        [sys.executable, "-c", _KILL_AFTER_WRITE, str(path), json.dumps(reload)], check=False
    )
    assert crashed.returncode == -9, crashed.stderr
    assert json.loads(path.read_text())["activeColor"] == "green"
    assert lines(log) == []

    switcher = StateFileSwitcher(path=path, reload_command=reload, timeout=10, retry=None)
    await switcher.recover()

    assert lines(log) == ["green"]
    assert await switcher.read_active() == "green"
    assert names(tmp_path) == ["deploy-state.json", "reload-app", "reloads"]

    await switcher.recover()  # nothing in flight any more: no second reload
    assert lines(log) == ["green"]


async def test_restore_puts_the_old_bytes_back_and_reloads(tmp_path: Path) -> None:
    """Undoing a switch that did not verify restores the file byte for byte, then reloads."""
    path = make_state(tmp_path)
    before = path.read_bytes()
    log = tmp_path / "reloads"
    switcher = StateFileSwitcher(
        path=path, reload_command=reload_script(tmp_path, path, log), timeout=10, retry=None
    )
    await switcher.switch("green")
    await switcher.restore("blue")
    assert path.read_bytes() == before
    assert lines(log) == ["green", "blue"]
    await switcher.reapply()
    assert lines(log) == ["green", "blue", "blue"]


async def test_restore_without_a_remembered_switch_sets_the_color(tmp_path: Path) -> None:
    """A fresh switcher (after a restart) restores by setting the color."""
    path = make_state(tmp_path, DOCUMENT | {"activeColor": "green"})
    switcher = StateFileSwitcher(path=path, reload_command=None, timeout=10, retry=None)
    await switcher.restore("blue")
    assert json.loads(path.read_text()) == DOCUMENT


async def test_a_failed_reload_is_named_as_the_step(tmp_path: Path) -> None:
    """The error of a reload that fails names the reload step; the file is put back."""
    path = make_state(tmp_path)
    log = tmp_path / "reloads"
    switcher = StateFileSwitcher(
        path=path,
        reload_command=reload_script(tmp_path, path, log, fail_on="green"),
        timeout=10,
        retry=None,
    )
    with pytest.raises(CommandFailed) as failed:
        await switcher.switch("green")
    assert failed.value.step == "reload"
    assert json.loads(path.read_text()) == DOCUMENT


async def test_a_reapply_reloads_once_where_a_switch_retries(tmp_path: Path) -> None:
    """A re-apply from the decision path is not retried (`NginxSwitcher.reapply`)."""
    path = make_state(tmp_path, {**DOCUMENT, "activeColor": "green"})
    log = tmp_path / "reloads"
    retry = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.01)
    reload = reload_script(tmp_path, path, log, fail_on="green")
    switcher = StateFileSwitcher(path=path, reload_command=reload, timeout=10, retry=retry)
    with pytest.raises(CommandFailed):
        await switcher.reapply()
    assert lines(log) == ["green"]
