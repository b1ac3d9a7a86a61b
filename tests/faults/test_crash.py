"""kill -9 at every step of a rollback: after a restart nothing is worse than before.

Each case pauses guardd at one fault point of a real rollback (green failing behind a
real nginx), kills it with SIGKILL there, and starts it again. Then nginx runs a target
it accepts, the journal lost and tore nothing, and the interrupted rollback is closed.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.faults.util import (
    FaultLab,
    MakeFaultLab,
    assert_journal_well_formed,
    color_of_link,
    figure,
    journal_raw_lines,
    nginx_accepts,
)
from tests.harness.daemon import GUARDCTL, guardctl, wait_until

pytestmark = pytest.mark.nginx

# In the order a rollback passes them (docs/contract.md §3; the nginx switcher's steps).
POINTS = [
    "after_rollback_started",
    "after_link_written",
    "after_renamed",
    "after_tested",
    "after_reloaded",
    "before_rollback_completed",
]


@pytest.mark.parametrize("point", POINTS)
def test_kill9_at_each_step_of_a_rollback(make_lab: MakeFaultLab, point: str) -> None:
    lab: FaultLab = make_lab()
    (lab.fault_dir / point).touch()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    wait_until((lab.fault_dir / f"{point}.reached").exists, 30, f"guardd to reach {point}")
    d.kill9()
    (lab.fault_dir / point).unlink()
    before = journal_raw_lines(d.journal_path)
    # SIGKILL cannot tear a line that was fsynced before the pause.
    assert before[-1] == "", "the journal ended in a torn line before the restart"
    opened = [
        json.loads(line)
        for line in before
        if line and json.loads(line)["event"] == "rollback_started"
    ]
    assert len(opened) == 1, "the crash came while a rollback was open"
    rollback_id = opened[0]["id"]
    # Until guardd is back, the gate reads what it left: a rollback begun and not ended
    # (or the lock file its guard window was written to, at the last steps).
    gate = guardctl("--config", str(lab.config_path), "qos", "status", "--json")
    assert gate.returncode == 1, gate
    if not lab.lock_file.exists():
        assert "has not ended" in json.loads(gate.stdout)["reason"], gate

    restarted = time.monotonic()
    d2 = lab.daemon()
    closed = d2.wait_event(
        "rollback_completed", where=lambda e: e.get("rollback_id") == rollback_id
    )
    recovered_s = time.monotonic() - restarted
    # nginx runs a target it accepts, the one the link names, and that is blue.
    assert nginx_accepts(lab)
    assert color_of_link(lab) == "blue"
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert not any(
        p.name.endswith((".guardd-new", ".guardd-old")) for p in lab.nginx.upstream_dir.iterdir()
    ), "switch debris left behind"
    # Nothing torn, nothing lost, nothing rewritten.
    events = assert_journal_well_formed(d2.journal_path)
    after = journal_raw_lines(d2.journal_path)
    assert after[: len(before) - 1] == before[:-1], "a journal line was lost or rewritten"
    # Exactly one rollback, closed once, by the id of the one that was open.
    assert [e["id"] for e in events if e["event"] == "rollback_started"] == [rollback_id]
    closes = [e for e in events if e["event"] in ("rollback_completed", "rollback_failed")]
    assert [e["rollback_id"] for e in closes] == [rollback_id], closes
    assert closed["from"] == "green" and closed["to"] == "blue"
    assert wait_until(lab.lock_file.exists, 10, "the QoS lock after the resumed rollback")
    assert wait_until(lambda: d2.state().get("active") == "blue", 10, "state.json active=blue")
    assert d2.stop() == 0
    assert_journal_well_formed(d2.journal_path)
    figure(
        "crash",
        point=point,
        restart_to_rollback_closed_s=round(recovered_s, 2),
        lines_before=len(before) - 1,
        lines_lost=0,
        torn=0,
    )


def test_kill9_during_the_resumed_rollback_still_converges(make_lab: MakeFaultLab) -> None:
    # The restart is killed too, inside the switch it resumed: the next start settles it.
    lab: FaultLab = make_lab()
    (lab.fault_dir / "after_rollback_started").touch()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_rollback_started.reached").exists, 30, "the first pause")
    d.kill9()
    (lab.fault_dir / "after_rollback_started").unlink()
    (lab.fault_dir / "after_tested").touch()
    d2 = lab.daemon(notify=False)
    wait_until(
        (lab.fault_dir / "after_tested.reached").exists,
        30,
        "the resumed switch to pause after nginx -t",
    )
    d2.kill9()
    (lab.fault_dir / "after_tested").unlink()
    before = journal_raw_lines(d2.journal_path)
    d3 = lab.daemon()
    opened = [e for e in d3.events() if e["event"] == "rollback_started"]
    assert len(opened) == 1
    d3.wait_event("rollback_completed", where=lambda e: e.get("rollback_id") == opened[0]["id"])
    assert nginx_accepts(lab)
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    after = journal_raw_lines(d3.journal_path)
    assert after[: len(before) - 1] == before[:-1]
    events = assert_journal_well_formed(d3.journal_path)
    assert len([e for e in events if e["event"] == "rollback_completed"]) == 1
    assert d3.stop() == 0


# ---- an operator's switch -------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "made"),
    [("after_renamed", True), ("after_tested", True), ("after_link_written", False)],
)
def test_kill9_during_an_operators_switch_keeps_who_and_why(
    make_lab: MakeFaultLab, point: str, made: bool
) -> None:
    """Killed in the middle of `guardctl switch blue`, guardd tells the move at its next
    start as the operator's, with their reason: done if the switch target names blue then
    (the switcher's recovery finished it), else an alert that it was not made. Never an
    `external_switch` by no one."""
    lab: FaultLab = make_lab()
    (lab.fault_dir / point).touch()
    d = lab.daemon()
    argv = ["--config", str(lab.config_path), "switch", "blue", "--force", "--reason", "deploy 5"]
    switch = subprocess.Popen(
        [str(GUARDCTL), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until((lab.fault_dir / f"{point}.reached").exists, 30, f"the switch at {point}")
        d.kill9()
    finally:
        switch.communicate(timeout=60)
    # guardd down: the gate reads the move it left unfinished, never "allowed".
    gate = guardctl("--config", str(lab.config_path), "qos", "status", "--json")
    assert gate.returncode == 1, gate
    assert "switch to blue by uid:0(root) has not ended" in json.loads(gate.stdout)["reason"]
    (lab.fault_dir / point).unlink()
    count = len(d.events())
    d2 = lab.daemon()
    after = d2.events()[count:]
    assert not [e for e in after if e["event"] == "external_switch"], after
    if made:
        (told,) = [e for e in after if e["event"] == "switch"]
        assert (told["from"], told["to"], told["by"]) == ("green", "blue", "uid:0(root)")
        assert told["reason"] == "deploy 5; interrupted by a restart, found done at start"
        assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    else:
        (told,) = [e for e in after if e["event"] == "alert" and "cut short" in e["reason"]]
        assert told["by"] == "uid:0(root)" and "green is served" in told["reason"], told
        assert not [e for e in after if e["event"] == "switch"]
        assert color_of_link(lab) == "green"
    assert d2.state().get("moving") is None
    assert d2.stop() == 0
