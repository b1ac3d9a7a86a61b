"""sd_notify against a real NOTIFY_SOCKET: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""

from __future__ import annotations

import itertools
import signal
import time

import pytest

from tests.harness.daemon import Lab, MakeLab, wait_until

pytestmark = pytest.mark.nginx


def test_ready_only_after_a_probe_of_each_color(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    lab.blue.set_mode("slow", delay=1.5)
    d = lab.daemon()
    assert lab.notify is not None
    lines = lab.notify.lines()
    ready = lines.index("READY=1")
    # The STATUS= sent with READY already judges blue's slow first probe (it timed out):
    # READY waited for that probe's outcome, not for a clock.
    said = [line for line in lines[:ready] if line.startswith("STATUS=")]
    assert said and "blue=down(1/" in said[-1], said
    assert lab.blue.requests >= 1 and lab.green.requests >= 1
    # Blue's probes time out (1.5 s > probe.timeout): its lost protection may be alerted since.
    events = [e["event"] for e in d.events() if "no safe rollback" not in (e["reason"] or "")]
    assert events[-1] == "started"
    assert d.stop() == 0


def test_status_reports_the_active_color_and_follows_a_rollback(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    assert lab.notify is not None
    lab.notify.wait_for(lambda m: m.startswith("STATUS=active=green state=steady"))
    lab.green.set_mode("http_503")
    lab.notify.wait_for(lambda m: m.startswith("STATUS=") and "green=down(" in m)
    lab.notify.wait_for(lambda m: m.startswith("STATUS=active=blue") and "qos=locked" in m)
    assert d.stop() == 0


def test_watchdog_pings_on_time_and_stop_when_the_tick_stalls(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon(env={"WATCHDOG_USEC": "2000000"})
    assert lab.notify is not None
    first, _, _ = lab.notify.wait_for("WATCHDOG=1")
    lab.notify.wait_for("WATCHDOG=1", after=first + 5, timeout=15)
    pings = [at for at, m in lab.notify.messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(gaps) >= 5 and max(gaps) <= 1.1, gaps
    # Stall the decision tick on purpose: the pings must stop.
    (lab.fault_dir / "stall_tick").touch()
    wait_until((lab.fault_dir / "stall_tick.reached").exists, 10, "the tick to stall")
    stalled_at = time.monotonic()
    wait_until(lambda: time.monotonic() - stalled_at > 3.0, 5, "three seconds of stall")
    late = [at for at, m in lab.notify.messages if m == "WATCHDOG=1" and at > stalled_at + 1.1]
    assert late == [], "a stalled supervisor must not ping the watchdog"
    (lab.fault_dir / "stall_tick").unlink()
    lab.notify.wait_for(lambda m: m == "WATCHDOG=1", after=len(lab.notify.messages))
    assert d.stop() == 0


def test_watchdog_keeps_pinging_through_a_slow_switch(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    (lab.fault_dir / "after_renamed").touch()  # the switch dwells between rename and test
    lab.daemon(env={"WATCHDOG_USEC": "2000000"})
    assert lab.notify is not None
    lab.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 20, "the switch to pause")
    paused_at = time.monotonic()
    wait_until(lambda: time.monotonic() - paused_at > 3.0, 5, "three seconds into the switch")
    pings = [at for at, m in lab.notify.messages if m == "WATCHDOG=1" and at > paused_at]
    assert len(pings) >= 2, "a switch within switch.timeout is progress, not a stall"
    (lab.fault_dir / "after_renamed").unlink()
    lab.daemons[-1].wait_event("rollback_completed")


def test_sighup_reloads_and_a_broken_config_keeps_the_old_one(make_lab: MakeLab) -> None:
    # Only the run of failures may fire, so its threshold shows which config is in force.
    lab: Lab = make_lab(policy__p0_error_ratio=1.0, policy__p1_error_ratio=1.0)
    d = lab.daemon()
    assert lab.notify is not None
    mark = len(lab.notify.messages)
    lab.write_config(policy__consecutive_failures=5)
    d.signal(signal.SIGHUP)
    i, _, _ = lab.notify.wait_for(lambda m: m.startswith("RELOADING=1"), after=mark)
    lab.notify.wait_for("READY=1", after=i + 1)
    reloaded = d.wait_event("config_reloaded")
    assert reloaded["kept_history"] == ["blue", "green"]
    # A broken file: the daemon says why, journals an alert, and keeps running on the old one.
    good = lab.config_path.read_text()
    lab.config_path.write_text(good.replace("consecutive_failures = 5", "consecutive_failures = 0"))
    mark = len(lab.notify.messages)
    count = len(d.events())
    d.signal(signal.SIGHUP)
    i, _, _ = lab.notify.wait_for(lambda m: m.startswith("RELOADING=1"), after=mark)
    lab.notify.wait_for("READY=1", after=i + 1)
    alert = d.wait_event("alert", after=count)
    assert "policy.consecutive_failures: must be >= 1" in alert["reason"]
    assert "config_invalid" in d.log()
    assert d.proc is not None and d.proc.poll() is None
    # Still guarding with the last valid config (5 failures), not the default.
    lab.green.set_mode("http_503")
    done = d.wait_event("rollback_completed")
    assert done["evidence"]["rule"] == "consecutive_failures", done["evidence"]
    assert done["evidence"]["threshold"] == 5
    assert d.stop() == 0


def test_sigterm_sends_stopping_and_exits_zero(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    assert lab.notify is not None
    mark = len(lab.notify.messages)
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    lab.notify.wait_for("STOPPING=1", after=mark)
