"""Issue: the core, end to end — a failing green behind a real nginx is rolled back to blue."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from guardd import qoslock
from tests.harness.daemon import GUARDD, Daemon, Lab, MakeLab, guardctl, wait_until
from tests.harness.upstream import Mode

pytestmark = pytest.mark.nginx


def assert_rolled_back(lab: Lab, d: Daemon, after: int = 0) -> dict[str, Any]:
    """nginx serves only blue; the journal, lock file and state.json agree."""
    started = d.wait_event("rollback_started", after=after)
    done = d.wait_event("rollback_completed", after=after)
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert started["from"] == "green" and started["to"] == "blue"
    assert done["from"] == "green" and done["to"] == "blue"
    assert done["rollback_id"] == started["id"]
    assert done["reason"] and done["severity"] in ("P0", "P1")
    ev = done["evidence"]
    assert {"rule", "threshold", "value", "samples"} <= ev.keys()
    assert wait_until(lab.lock_file.exists, 10, "the QoS lock file")
    assert wait_until(lambda: d.state().get("active") == "blue", 10, "state.json active=blue")
    return done


@pytest.mark.parametrize(
    ("mode", "rule"),
    [
        ("http_503", "consecutive_failures"),
        ("hang", "consecutive_failures"),
        ("not_json", "consecutive_failures"),
        ("json_down", "consecutive_failures"),
    ],
)
def test_failing_green_is_rolled_back(make_lab: MakeLab, mode: Mode, rule: str) -> None:
    lab = make_lab()
    d = lab.daemon()
    assert lab.nginx.served_color() == "green"
    lab.green.set_mode(mode)
    done = assert_rolled_back(lab, d)
    assert done["evidence"]["rule"] == rule
    assert done["evidence"]["color"] == "green"
    assert d.stop() == 0
    events = [e["event"] for e in d.events()]
    assert events.index("rollback_started") < events.index("rollback_completed")
    assert events[-1] == "stopped"


def test_noisy_but_healthy_green_is_not_rolled_back(make_lab: MakeLab) -> None:
    # 1 % random 5xx over 2,000 probes at a 20 ms cadence: never 3 in a row, ratio ~0.01.
    lab = make_lab(
        probe__interval="20ms",
        probe__fast_interval="20ms",
        policy__window="10s",
        policy__min_samples=20,
    )
    d = lab.daemon()
    lab.green.set_mode("random_5xx", probability=0.01, seed=7)
    served_before = lab.green.requests
    assert lab.green.wait_for_requests(served_before + 2000, timeout=180)
    assert lab.green.counts["http_503"] >= 5, "the noise really happened"
    assert not [e for e in d.events() if e["event"].startswith("rollback")]
    assert lab.nginx.served_color() == "green"
    assert d.stop() == 0


def test_ratio_rule_catches_a_pattern_never_three_in_a_row(make_lab: MakeLab) -> None:
    lab = make_lab(policy__p0_error_ratio=0.5)
    d = lab.daemon()
    lab.green.set_mode("pattern", statuses=[503, 503, 200])
    done = assert_rolled_back(lab, d)
    assert done["evidence"]["rule"] == "p0_error_ratio"
    assert done["evidence"]["value"] >= 0.5
    assert done["evidence"]["samples"] >= 5


def test_both_colors_down_holds_then_rolls_back_when_blue_recovers(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    lab.blue.set_mode("http_503")
    lab.green.set_mode("http_503")
    hold = d.wait_event("hold")
    assert hold["from"] == "green" and hold["to"] == "blue"
    assert "unhealthy" in hold["reason"]
    assert wait_until(lambda: d.state().get("state") == "hold", 10, "state hold")
    assert not [e for e in d.events() if e["event"] == "rollback_started"]
    assert lab.nginx.served_color() is None  # green is really failing behind nginx
    # Users meet a failing green and guardd will not act: deploys wait too, as long as the
    # hold (the lock file, which every gate reads, says why; taken as the hold began).
    assert _hold_locked(lab)
    lab.blue.set_mode("ok")
    assert_rolled_back(lab, d)
    # The rollback's guard window took the hold's place, in one step.
    assert (qoslock.read_lock(lab.lock_file).reason or "").startswith("rollback green -> blue")
    assert not [e for e in d.events() if e["event"] == "qos_released"]
    holds = [e for e in d.events() if e["event"] == "hold"]
    assert len(holds) == 1, [h["reason"] for h in holds]  # one hold per incident


def test_target_rejected_by_nginx_test_restores_link(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    before = lab.nginx.active_link.readlink()
    lab.nginx.targets["blue"].write_text("this is not nginx syntax {\n")
    lab.green.set_mode("http_503")
    failed = d.wait_event("rollback_failed")
    assert "[emerg]" in failed["reason"], "nginx's own complaint, not its banner"
    d.wait_event("hold")
    assert lab.nginx.active_link.readlink() == before
    assert lab.nginx.master_pid is not None
    lab.green.set_mode("ok")
    assert lab.nginx.wait_serving_only("green", hold=0.3, timeout=10)
    assert d.proc is not None and d.proc.poll() is None, "the daemon stays alive"
    assert wait_until(lambda: d.state().get("state") == "hold", 10, "sticky hold")
    assert d.stop() == 0


def test_kill9_during_slow_reload_is_resumed_at_restart(make_lab: MakeLab) -> None:
    lab = make_lab()
    (lab.fault_dir / "after_renamed").touch()  # pause the switch between rename and reload
    d = lab.daemon()
    lab.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 30, "the switch to pause")
    d.kill9()
    (lab.fault_dir / "after_renamed").unlink()
    lines_before = d.raw_journal().splitlines()
    d2 = lab.daemon()
    done = d2.wait_event("rollback_completed")
    started = [e for e in d2.events() if e["event"] == "rollback_started"]
    assert len(started) == 1 and done["rollback_id"] == started[0]["id"]
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    after = d2.raw_journal().splitlines()
    assert after[: len(lines_before)] == lines_before, "no journal line lost or rewritten"
    assert d2.stop() == 0


def test_rollback_budget_holds_and_survives_restart(make_lab: MakeLab) -> None:
    lab = make_lab(policy__max_rollbacks=3)
    d = lab.daemon()
    for n in range(3):
        lab.green.set_mode("http_503")

        def rolled_back(times: int = n + 1) -> bool:
            return len([e for e in d.events() if e["event"] == "rollback_completed"]) == times

        wait_until(rolled_back, 30, f"rollback {n + 1}")
        lab.green.set_mode("ok")
        count = len(d.events())
        lab.nginx.active_link.unlink()
        lab.nginx.active_link.symlink_to(lab.nginx.targets["green"])
        lab.nginx.reload()
        d.wait_event("external_switch", after=count)
    # Budget spent: the next failure holds instead of switching; a restart does not reset it.
    d.stop()
    d2 = lab.daemon()
    lab.green.set_mode("http_503")
    # The hold is journaled once per incident: before the restart, or after it if green's
    # window had not yet failed; either way it is in force after the restart.
    hold = wait_until(lambda: d2.state().get("hold"), 30, "a hold after the restart")
    assert "budget" in hold["reason"] and hold["sticky"]
    assert "budget" in [e for e in d2.events() if e["event"] == "hold"][-1]["reason"]
    assert len([e for e in d2.events() if e["event"] == "rollback_started"]) == 3
    assert lab.nginx.served_color() is None  # still on the failing green: held, not switched
    # Deploys wait: the last rollback's guard window, not met on the failing green, holds
    # the lock (a gate reading the lock file says so too), and across a restart.
    out = guardctl("qos", "status", "--config", str(lab.config_path))
    assert out.returncode == 1, out
    assert d2.stop() == 0
    d3 = lab.daemon()
    d3.wait_event("started", after=0)
    out = guardctl("qos", "status", "--config", str(lab.config_path))
    assert out.returncode == 1, out
    assert d3.stop() == 0


@pytest.mark.parametrize("how", ["a hotfix copy", "removed"])
def test_a_switch_target_changed_by_hand_to_no_color_holds_and_locks(
    make_lab: MakeLab, how: str
) -> None:
    """The active link pointed by hand at a file that is neither color's (a copy of green's
    for a hotfix), or removed: guardd can no longer say what users are served, so it says
    so and holds, with deploys locked, until the link names a color again. The hold says
    which: a link that names no color, or no link at all."""
    lab = make_lab()
    d = lab.daemon()
    count = len(d.events())
    lab.nginx.active_link.unlink()
    why = f"the switch target cannot be read ({lab.nginx.active_link}: does not exist)"
    said = f"{why}; guardd holds until it names blue or green"
    unknown = f"the switch target cannot be read: {lab.nginx.active_link}: does not exist"
    if how == "a hotfix copy":
        hotfix = lab.nginx.targets["green"].with_name("hotfix.conf")
        hotfix.write_text(lab.nginx.targets["green"].read_text())
        lab.nginx.active_link.symlink_to(hotfix)
        lab.nginx.reload()
        why = "the switch target names neither blue nor green"
        said = (
            "the switch target was changed outside guardd and names neither blue nor "
            "green; guardd holds until it names one"
        )
        unknown = "the switch target names neither color"
    moved = d.wait_event("external_switch", after=count)
    assert (moved["from"], moved["to"]) == ("green", None)
    assert moved["reason"] == said
    held = d.wait_event("hold", after=count)
    assert held["reason"] == why
    assert wait_until(lambda: _hold_locked(lab), 10, "deploys locked")
    doc = json.loads(guardctl("--config", str(lab.config_path), "status", "--json").stdout)
    assert (doc["active"], doc["state"], doc["hold_reason"]) == (None, "hold", why), doc
    refused = guardctl("--config", str(lab.config_path), "rollback")
    assert refused.returncode != 0
    assert f"the active color is unknown ({unknown})" in refused.stderr
    # Named again: adopted, the hold and its lock end.
    count = len(d.events())
    if lab.nginx.active_link.is_symlink():
        lab.nginx.active_link.unlink()
    lab.nginx.active_link.symlink_to(lab.nginx.targets["green"])
    lab.nginx.reload()
    back = d.wait_event("external_switch", after=count)
    assert (back["from"], back["to"]) == (None, "green")
    d.wait_event("qos_released", after=count)
    assert d.stop() == 0


@pytest.mark.parametrize("how", ["removed", "a directory", "a file with two names"])
def test_a_start_that_finds_no_switch_target_holds_and_says_why(
    make_lab: MakeLab, how: str
) -> None:
    """Stopped on green, started with nginx's active link removed, or a folder or a second
    name of a target file in its place: the unit's check passes (with a warning), guardd
    starts, says the target changed while it was down and why it cannot be read, holds with
    deploys locked, and takes a reload; the link put back, it is adopted."""
    lab = make_lab()
    d = lab.daemon()
    d.wait_event("started")
    assert d.stop() == 0
    link = lab.nginx.active_link
    link.unlink()
    kind = {
        "removed": None,
        "a directory": "a directory",
        "a file with two names": "a regular file",
    }
    if how == "a directory":
        link.mkdir()
    elif how == "a file with two names":
        link.hardlink_to(lab.nginx.targets["green"])
    checked = subprocess.run(
        [*GUARDD, "check-config", str(lab.config_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr  # (ExecStartPre's check)
    assert "switch.active_link: warning: " in checked.stderr, checked.stderr
    count = len(d.events())
    d2 = lab.daemon()
    if how != "a file with two names":  # (nginx reads a file as well as a link to it)
        alert = d2.wait_event("alert", after=count)
        assert alert["reason"].startswith("the switch target failed its check at start: ")
    found = "does not exist" if kind[how] is None else f"not a symlink ({kind[how]})"
    why = f"the switch target cannot be read ({link}: {found})"
    moved = d2.wait_event("external_switch", after=count)
    assert (moved["from"], moved["to"]) == ("green", None), moved
    assert moved["reason"] == f"{why}; guardd holds until it names blue or green"
    held = d2.wait_event("hold", after=count)
    assert held["reason"] == why
    assert wait_until(lambda: _hold_locked(lab), 10, "deploys locked")
    gate = guardctl("--config", str(lab.config_path), "qos", "status")
    assert gate.returncode == 1, gate
    # No link to keep for an undo: a forced switch is refused, and says how to put one back.
    forced = guardctl("--config", str(lab.config_path), "switch", "blue", "--force")
    assert forced.returncode == 1, forced
    assert "switch to blue failed at switch (nothing was changed)" in forced.stderr, forced
    assert "ln -sfn TARGET" in forced.stderr, forced
    d2.signal(signal.SIGHUP)  # a reload is taken, the host's state notwithstanding
    d2.wait_event("config_reloaded", after=count)
    count = len(d2.events())
    if link.is_dir():
        link.rmdir()
    elif how != "removed":
        link.unlink()
    link.symlink_to(lab.nginx.targets["green"])
    back = d2.wait_event("external_switch", after=count)
    assert (back["from"], back["to"]) == (None, "green")
    d2.wait_event("qos_released", after=count)
    assert d2.stop() == 0


def test_a_state_file_replaced_by_a_symlink_holds_and_says_why(make_lab: MakeLab) -> None:
    """A deploy tool swaps a symlink in for the state file (to a copy naming green): guardd
    never follows it, and the hold an operator is paged with names the link, not "names
    neither color"; a file again, it is adopted and the hold ends."""
    lab = make_lab()
    state = lab.tmp / "deploy-state.json"
    state.write_text('{"activeColor": "green"}\n')
    lab.write_config(switch__kind="state-file", switch__path=str(state))
    d = lab.daemon()
    count = len(d.events())
    copy, swap = lab.tmp / "copy.json", lab.tmp / "swap.json"
    copy.write_text('{"activeColor": "green"}\n')
    swap.symlink_to(copy)
    swap.rename(state)  # (at once, as `ln -sfn` would have it)
    held = d.wait_event("hold", after=count)
    why = f"the switch target cannot be read ({state}: is a symlink; refusing to follow it)"
    assert held["reason"] == why
    doc = json.loads(guardctl("--config", str(lab.config_path), "status", "--json").stdout)
    assert (doc["active"], doc["state"], doc["hold_reason"]) == (None, "hold", why), doc
    count = len(d.events())
    state.unlink()
    state.write_text('{"activeColor": "green"}\n')
    back = d.wait_event("external_switch", after=count)
    assert (back["from"], back["to"]) == (None, "green")
    assert d.stop() == 0


def _hold_locked(lab: Lab) -> bool:
    lock = qoslock.read_lock(lab.lock_file)
    return lock.held and (lock.reason or "").startswith("guardd holds: ")


def test_sigterm_is_a_clean_stop(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    assert d.events()[-1]["event"] == "stopped"
    assert lab.notify is not None
    lab.notify.wait_for("STOPPING=1")


def test_paused_while_the_active_color_fails_deploys_wait_too(make_lab: MakeLab) -> None:
    """Paused, guardd does not roll back a failing green: users meet it, so no gate says
    "deploys allowed" until green no longer fails (or guardd is resumed and acts)."""
    lab = make_lab()
    d = lab.daemon()
    out = guardctl("pause", "--reason", "maintenance", socket=lab.socket_path)
    assert out.returncode == 0, out
    lab.green.set_mode("http_503")
    locked = d.wait_event("qos_locked", timeout=30)
    assert locked["reason"].startswith("guardd is paused while green fails: P0"), locked
    out = guardctl("qos", "status", "--config", str(lab.config_path))
    assert out.returncode == 1 and "guardd is paused while green fails" in out.stdout, out
    assert not [e for e in d.events() if e["event"] == "rollback_started"]
    lab.green.set_mode("ok")
    released = d.wait_event("qos_released", timeout=90)
    assert released["reason"] == "the hold ended: green no longer fails", released
    assert not lab.lock_file.exists()
    assert d.stop() == 0
