"""A reload onto a switch target another guardd switches is rejected, and the target in
force stays locked; once that one is free, the reload moves the lock with it.

The daemon runs in-process against a real nginx; "another guardd" is this test holding
the other link's lock (`hold_switch_lock`), as a second process would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd import config
from guardd.exceptions import AlreadyRunning
from guardd.fsutil import hold_switch_lock
from guardd.guard import Guard
from guardd.supervisor import Supervisor
from guardd.systemd import SystemdNotifier
from tests.faults.util import FaultLab, MakeFaultLab

pytestmark = [pytest.mark.nginx, pytest.mark.anyio]


async def until(predicate: Callable[[], Any], what: str) -> Any:
    with anyio.move_on_after(30):
        # Polling, not an Event: the condition lives in guardd's objects.
        while not (value := predicate()):  # noqa: ASYNC110
            await anyio.sleep(0.02)
        return value
    raise AssertionError(f"timed out waiting for {what}")


def last(guard: Guard, event: str) -> dict[str, Any] | None:
    return next((e for e in reversed(guard.journal.recent) if e["event"] == event), None)


def held_by_someone(target: Path) -> bool:
    try:
        os.close(hold_switch_lock(target)[1])
    except AlreadyRunning:
        return True
    return False


async def test_a_reload_onto_another_guardds_link_is_rejected(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab()
    link = lab.nginx.active_link
    other = link.with_name("other_active.conf")
    other.symlink_to(link.readlink())
    sup = Supervisor(config.load(lab.config_path), sd=SystemdNotifier({}))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        guard: Guard = await until(
            lambda: sup.guard if sup.guard and sup.guard.ticks else None, "a tick"
        )
        assert held_by_someone(link), "the running guard holds its link"
        assert not held_by_someone(other)

        _, held = hold_switch_lock(other)
        try:
            lab.config_path.write_text(lab.config_text().replace(str(link), str(other)))
            await sup.reload()
            alert = last(guard, "alert")
            assert alert is not None and alert["reason"] == (
                "reload rejected, still running the previous config: "
                f"{lab.config_path}: switch.active_link: another guardd (pid {os.getpid()}) "
                f"switches {other}: {other.with_name('.other_active.conf.guardd.lock')} is "
                "locked; two guards of one target undo each other's switches: give each "
                "instance its own"
            ), alert
            assert sup.settings.config.switch.active_link == link
            assert held_by_someone(link), "the link in force stays locked"
        finally:
            os.close(held)
        assert not held_by_someone(other), "the rejected reload let go of nothing it took"

        await sup.reload()
        assert (last(guard, "config_reloaded") or {}).get("changed") == ["switch.active_link"]
        assert sup.settings.config.switch.active_link == other
        assert held_by_someone(other) and not held_by_someone(link)

        # The same link spelled another way (through `..`, through a symlinked folder) is
        # the lock this guard holds, not another guard's.
        folder = other.parent
        alias_dir = lab.tmp / "upstreams-alias"
        alias_dir.symlink_to(folder)
        for spelled in (folder / ".." / folder.name / other.name, alias_dir / other.name):
            lab.config_path.write_text(lab.config_text().replace(str(link), str(spelled)))
            mark = len(guard.journal.recent)
            await sup.reload()
            reloaded = [e["event"] for e in list(guard.journal.recent)[mark:]]
            assert "config_reloaded" in reloaded and "alert" not in reloaded, reloaded
            assert sup.settings.config.switch.active_link == spelled
            assert held_by_someone(other), "still held, under its new spelling"
        tg.cancel_scope.cancel()
    assert not held_by_someone(other), "a stop lets go of it"
