"""An operator's switch is judged by what the color does from then on.

A `switch --force` (or a promote) to a color whose probe window still holds failures from
before the act must not be undone on the next tick by those old failures; new failures
still roll it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guardd.exceptions import OperationRefused
from guardd.guard import Guard
from guardd.operator import handle
from tests.harness.guard_fakes import DOWN, OK, SPEC, FakeClock, prepare, start, steps

pytestmark = pytest.mark.anyio
ROOT = "uid:0(root)"


def events(g: Guard, name: str) -> list[dict[str, Any]]:
    return [e for e in g.journal.recent if e["event"] == name]


async def switched_back_to_a_fixed_green(tmp_path: Path) -> tuple[Guard, FakeClock]:
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    # Green fails and is rolled back; its window is full of failures.
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 6)
    # One tuple, so that mypy does not narrow g.active to "blue" past the switch below.
    assert (g.active, len(events(g, "rollback_completed"))) == ("blue", 1)
    await handle(g, "qos_unlock", {}, ROOT)
    # Green is fixed; the operator puts it back at once, past the gate.
    await steps(g, clock, [(OK, OK)])
    await handle(g, "switch", {"color": "green", "force": True, "reason": "fixed"}, ROOT)
    assert g.active == "green"
    return g, clock


async def test_old_failures_do_not_undo_an_operators_switch(tmp_path: Path) -> None:
    g, clock = await switched_back_to_a_fixed_green(tmp_path)
    await steps(g, clock, [(OK, OK)] * 10)
    assert g.active == "green"
    assert len(events(g, "rollback_started")) == 1  # only the first one, before the switch


async def test_new_failures_still_roll_it_back(tmp_path: Path) -> None:
    g, clock = await switched_back_to_a_fixed_green(tmp_path)
    await steps(g, clock, [(OK, DOWN)] * SPEC.consecutive_failures)
    assert g.active == "blue"
    assert len(events(g, "rollback_completed")) == 2


@pytest.mark.parametrize("cmd", ["switch", "promote"])
async def test_a_gate_never_opens_on_a_window_that_cannot_tell(tmp_path: Path, cmd: str) -> None:
    """Green failed, was rolled back, and guardd restarted: green's window is started afresh
    and holds none of those failures. Until it holds policy.min_samples probes, `switch`
    and `promote` without --force refuse, as before the restart, and say why."""
    prepare(tmp_path)
    clock = FakeClock()
    g = await start(tmp_path, clock, SPEC)
    await steps(g, clock, [(OK, OK)] + [(OK, DOWN)] * 6)
    await handle(g, "qos_unlock", {}, ROOT)
    g.save_state()
    g2 = await start(tmp_path, clock, SPEC)  # the restart: empty windows
    await steps(g2, clock, [(OK, OK)] * 2)  # green passes its probes, 2 of min_samples 3
    args: dict[str, Any] = {"color": "green"} if cmd == "switch" else {}
    with pytest.raises(OperationRefused, match=r"2 of 3 samples"):
        await handle(g2, cmd, args, ROOT)
    before = g2.active  # (not narrowing g2.active past the move below)
    assert before == "blue"
    await steps(g2, clock, [(OK, OK)] * 3)  # judged now, and clean
    await handle(g2, cmd, args, ROOT)
    assert g2.active == "green"
