"""The daemon's probe loops (each color's and the front door's) fall due together, so that
one wake-up of the process serves a whole round.

The daemon runs in-process against a real nginx and real upstreams; every time a probe
loop schedules its next round (`Supervisor._next_round`) is kept.
"""

from __future__ import annotations

import itertools
from collections import Counter

import anyio
import pytest

from guardd import config
from guardd.supervisor import Supervisor
from guardd.systemd import SystemdNotifier
from tests.faults.util import FaultLab, MakeFaultLab

pytestmark = [pytest.mark.nginx, pytest.mark.anyio]

LOOPS = 3  # blue, green, the front door


async def test_the_colors_and_the_front_door_fall_due_together(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab(probe__interval="200ms")
    sup = Supervisor(config.load(lab.config_path), sd=SystemdNotifier({}))
    assert sup.settings.config.switch.verify_url, "the lab watches its front door"
    due: list[float] = []
    enough = anyio.Event()
    schedule = sup._next_round

    async def kept(last: float, started: float, interval: float) -> float:
        nxt = await schedule(last, started, interval)
        due.append(nxt)
        if len(due) >= 20 * LOOPS:
            enough.set()
        return nxt

    sup._next_round = kept  # type: ignore[method-assign,assignment]
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        with anyio.fail_after(60):
            await enough.wait()
        tg.cancel_scope.cancel()
    # Every instant a round fell due at, but the last (a loop may not have reached it),
    # is shared by the three loops: exactly, as points of one grid.
    instants = sorted(Counter(due).items())[:-1]
    assert len(instants) >= 15, instants
    assert all(n == LOOPS for _, n in instants), instants
    steps = {round(b - a, 9) for (a, _), (b, _) in itertools.pairwise(instants)}
    assert steps == {0.2}, steps
