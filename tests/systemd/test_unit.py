"""The shipped guardd@.service under a real systemd 252, guarding a real nginx (see lab.py).

The unit files from systemd/ are installed unmodified; the only test drop-ins are a 2s
watchdog with the stall hook's environment (the watchdog test) and the read-only /run of a
real host (the nginx restart test; the comment there says why nspawn needs it).
One container is booted for the whole module; each test starts from ``Lab.reset()``.
Measurements are printed as ``MEASURED name = value`` lines (run with ``-s`` or ``-rA``)
and recorded as junit properties; no test asserts one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.harness.nspawn import Container, unique_name
from tests.systemd.lab import (
    CONFIG,
    FAULT_DIR,
    GUARD_CONFIG,
    INSTANCE,
    LOCK_FILE,
    SECOND_UNIT,
    SHIPPED,
    UNIT,
    UNIT_FILES,
    UPSTREAMS_DIR,
    Lab,
    message,
    realtime,
)

pytestmark = pytest.mark.systemd

# CAP_DAC_OVERRIDE (1), CAP_KILL (5), CAP_NET_BIND_SERVICE (10): the unit's whole set.
GUARD_CAPS = (1 << 1) | (1 << 5) | (1 << 10)
WATCHDOG_DROPIN = f"""\
# Test only: a short watchdog, and guardd's stall hook armed by files in {FAULT_DIR}.
[Service]
WatchdogSec=2s
Environment=GUARDD_FAULT_DIR={FAULT_DIR}
ReadWritePaths={FAULT_DIR}
"""
# Inside nspawn, any of these four leaves /run (and /tmp) writable under ProtectSystem=strict,
# because of how the container's /proc and /sys are mounted; with none of them /run is
# read-only, as it is on a host. The test turns them off to see the host's read-only /run.
READ_ONLY_RUN_DROPIN = """\
# Test only: the read-only /run of a real host (see test_unit.py).
[Service]
ProtectKernelTunables=no
ProtectControlGroups=no
ProtectProc=default
ProcSubset=all
"""


@pytest.fixture(scope="module")
def lab(systemd_image: Path, guardd_wheelhouse: Path) -> Iterator[Lab]:
    """One booted container with the lab laid out, shared by every test of this module."""
    with Container(systemd_image, unique_name()) as container:
        container.install_guardd(guardd_wheelhouse)
        booted = Lab(container)
        booted.prepare()
        container.boot()
        booted.start()
        yield booted


@pytest.fixture
def fresh(lab: Lab) -> Lab:
    """The lab with the guard stopped, green active and healthy, no state, no drop-ins."""
    lab.reset()
    return lab


@pytest.fixture
def measured(record_property: Callable[[str, object], None]) -> Iterator[dict[str, float]]:
    """Collect measurements; they are printed and recorded when the test ends."""
    values: dict[str, float] = {}
    yield values
    for name, value in values.items():
        print(f"MEASURED {name} = {value:.3f}")
        record_property(name, round(value, 3))


def test_start_returns_only_once_guardd_is_ready(fresh: Lab, measured: dict[str, float]) -> None:
    """`systemctl start` waits for READY=1, which guardd sends after its first probe round."""
    took = fresh.timed_systemctl("start", UNIT)

    props = fresh.show(
        "ActiveState",
        "SubState",
        "StatusText",
        "MainPID",
        "InactiveExitTimestampMonotonic",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    assert props["ActiveState"] == "active"
    assert props["SubState"] == "running"
    # READY=1 came after the switch target was read and both colors were probed once.
    assert props["StatusText"].startswith("active=green ")
    assert "blue=up" in props["StatusText"]
    assert "green=up" in props["StatusText"]
    assert "started" in fresh.event_names()

    # The hardening is applied to the running daemon, not only written in the file.
    status = fresh.proc_status(int(props["MainPID"]))
    guardd_uid = fresh.c.run("id", "-u", "guardd").stdout.strip()
    assert status["Uid"].split()[0] == guardd_uid
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert int(status["CapBnd"], 16) == GUARD_CAPS
    assert int(status["CapAmb"], 16) == GUARD_CAPS
    mounts = fresh.mounts_seen_by(int(props["MainPID"]))
    assert mounts["/"].startswith("ro")
    assert mounts["/etc/guardd"].startswith("ro")
    assert mounts[UPSTREAMS_DIR].startswith("rw")

    begun = int(props["InactiveExitTimestampMonotonic"])
    main = int(props["ExecMainStartTimestampMonotonic"])
    ready = int(props["ActiveEnterTimestampMonotonic"])
    measured["ready_latency_systemctl_start_s"] = took
    measured["ready_latency_systemd_whole_start_s"] = (ready - begun) / 1e6
    measured["ready_latency_systemd_main_process_s"] = (ready - main) / 1e6


def test_the_shipped_unit_rolls_the_real_nginx_back(fresh: Lab, measured: dict[str, float]) -> None:
    """Green fails; guardd, sandboxed as shipped, swaps nginx's link to blue and reloads it."""
    fresh.c.systemctl("start", UNIT)
    assert fresh.front_door()["color"] == "green"
    seen = len(fresh.events())

    failed_at = time.time()
    fresh.fail("green")
    completed = fresh.wait_event("rollback_completed", after=seen, timeout=90)

    assert completed["from"] == "green"
    assert completed["to"] == "blue"
    assert fresh.active_link() == f"{UPSTREAMS_DIR}/lab_blue.conf"
    # nginx's old workers accept new connections for ~0.1 s after a reload: once blue
    # answers, several fresh connections in a row must all reach blue.
    fresh.c.wait_for(lambda: fresh.front_door()["color"] == "blue", 30, "blue at the front door")
    answers = [fresh.front_door() for _ in range(5)]
    assert [(a["http_status"], a["color"]) for a in answers] == [(200, "blue")] * 5
    fresh.wait_event("qos_locked", after=seen, timeout=30)
    assert fresh.c.run("test", "-f", LOCK_FILE, check=False).returncode == 0
    fresh.c.wait_for(
        lambda: fresh.show("StatusText")["StatusText"].startswith("active=blue "),
        30,
        "STATUS= to say blue is active",
    )
    assert fresh.show("ActiveState")["ActiveState"] == "active"

    completed_at = _epoch(completed["ts"])
    measured["rollback_failure_to_completed_s"] = completed_at - failed_at
    measured["rollback_switch_and_verify_s"] = float(completed["duration_ms"]) / 1000


def test_a_stalled_guard_is_killed_by_the_watchdog_and_restarted(
    fresh: Lab, measured: dict[str, float]
) -> None:
    """No WATCHDOG=1 while the decision tick is stuck: systemd aborts guardd and restarts it."""
    fresh.c.run("mkdir", "-p", FAULT_DIR)
    fresh.add_dropin("50-test-watchdog.conf", WATCHDOG_DROPIN)
    fresh.c.systemctl("daemon-reload")
    fresh.c.systemctl("start", UNIT)
    first_pid = fresh.main_pid()
    restarts = int(fresh.show("NRestarts")["NRestarts"])
    cursor = fresh.journal_cursor()
    before_stall = len(fresh.events())

    fresh.c.run("touch", f"{FAULT_DIR}/stall_tick")
    fresh.c.wait_for(
        lambda: (
            fresh.c.run("test", "-f", f"{FAULT_DIR}/stall_tick.reached", check=False).returncode
            == 0
        ),
        30,
        "guardd's decision tick to stall",
    )
    timeout_entry = fresh.wait_journal("Watchdog timeout", after=cursor, timeout=60)
    # Unstall before the restart (RestartSec=2s) so the new process keeps ticking.
    fresh.c.run("rm", "-f", f"{FAULT_DIR}/stall_tick")

    fresh.c.wait_for(
        lambda: (
            fresh.main_pid() not in (0, first_pid)
            and fresh.show("ActiveState")["ActiveState"] == "active"
        ),
        60,
        "a new guardd to be active",
    )
    ready_entry = fresh.wait_journal("Started guardd@lab.service", after=cursor, timeout=30)
    messages = [message(e) for e in fresh.journal(cursor)]
    assert any("Killing process" in m and "SIGABRT" in m for m in messages), messages
    assert any("Failed with result 'watchdog'" in m for m in messages), messages
    assert int(fresh.show("NRestarts")["NRestarts"]) == restarts + 1
    fresh.wait_event("started", after=before_stall, timeout=30)
    # The new process pings: it stays active past several 2s watchdog periods.
    alive_pid = fresh.main_pid()
    seen = len(fresh.events())
    fresh.fail("green")
    fresh.wait_event("rollback_completed", after=seen, timeout=90)
    assert fresh.main_pid() == alive_pid

    measured["watchdog_kill_to_new_ready_s"] = realtime(ready_entry) - realtime(timeout_entry)


def test_reload_applies_a_new_config_and_fails_on_a_broken_one(fresh: Lab) -> None:
    """`systemctl reload` checks the file, then SIGHUPs: a valid file is applied; a broken
    one (in the file, or on the host) fails the reload with non-zero and changes nothing."""
    fresh.c.systemctl("start", UNIT)
    pid = fresh.main_pid()
    seen = len(fresh.events())

    fresh.write_config(GUARD_CONFIG.replace("consecutive_failures = 3", "consecutive_failures = 4"))
    fresh.c.systemctl("reload", UNIT)
    reloaded = fresh.wait_event("config_reloaded", after=seen, timeout=30)
    assert reloaded["changed"] == ["policy.consecutive_failures"]
    assert fresh.main_pid() == pid
    assert fresh.show("ActiveState")["ActiveState"] == "active"

    broken = {
        "policy.consecutive_failures: must be >= 1": GUARD_CONFIG.replace(
            "consecutive_failures = 3", "consecutive_failures = 0"
        ),
        f"switch.targets.blue: {UPSTREAMS_DIR}/lab_bleu.conf: no such file": GUARD_CONFIG.replace(
            "lab_blue.conf", "lab_bleu.conf"
        ),
    }
    for reason, text in broken.items():
        seen = len(fresh.events())
        cursor = fresh.journal_cursor()
        fresh.write_config(text)
        failed = fresh.c.systemctl("reload", UNIT, check=False)
        assert failed.returncode != 0, failed
        fresh.wait_journal(f"{CONFIG}: {reason}", after=cursor, timeout=30)
        assert fresh.show("ActiveState")["ActiveState"] == "active"
        assert fresh.main_pid() == pid
        # No signal reached guardd: nothing journaled, the running config still in force.
        assert fresh.event_names()[seen:] == []

    # A SIGHUP sent past systemd still finds the broken file: guardd keeps its config, alerts.
    seen = len(fresh.events())
    fresh.write_config(broken["policy.consecutive_failures: must be >= 1"])
    fresh.c.systemctl("kill", "--kill-who=main", "--signal=HUP", UNIT)
    alert = fresh.wait_event("alert", after=seen, timeout=30)

    assert "reload rejected" in alert["reason"]
    assert "policy.consecutive_failures" in alert["reason"]
    fresh.c.wait_for(
        lambda: fresh.show("SubState")["SubState"] == "running", 30, "the reload to finish"
    )
    assert fresh.show("ActiveState")["ActiveState"] == "active"
    assert fresh.main_pid() == pid
    assert "config_reloaded" not in fresh.event_names()[seen:]
    # The broken file is also what ExecStartPre would refuse: a restart would fail loudly.
    checked = fresh.c.run("guardd", "check-config", CONFIG, check=False)
    assert checked.returncode == 2
    assert "policy.consecutive_failures" in checked.stderr


def test_stop_is_clean_and_the_qos_lock_outlives_stop_and_restart(fresh: Lab) -> None:
    """SIGTERM ends guardd with status 0; /run/guardd (and a deploy tool's lock) is kept."""
    fresh.c.systemctl("start", UNIT)
    pid = fresh.main_pid()
    # A lock made by another tool: guardd never wrote it, so nothing but the preserved
    # runtime directory can keep it across a stop.
    fresh.c.run("touch", LOCK_FILE)
    seen = len(fresh.events())

    fresh.c.systemctl("stop", UNIT)

    props = fresh.show(
        "ActiveState", "Result", "ExecMainPID", "ExecMainCode", "ExecMainStatus", "LoadState"
    )
    assert props["LoadState"] == "loaded"  # guardd.target keeps it loaded: real values below
    assert props["ActiveState"] == "inactive"
    assert int(props["ExecMainPID"]) == pid
    assert props["Result"] == "success"
    assert props["ExecMainCode"] == "1"  # CLD_EXITED: it exited, it was not killed
    assert props["ExecMainStatus"] == "0"
    assert "stopped" in fresh.event_names()[seen:]
    # Deploys stay blocked while the guard is down, and guardctl can still tell.
    assert fresh.c.run("test", "-f", LOCK_FILE, check=False).returncode == 0
    held = fresh.c.run("guardctl", "--instance", INSTANCE, "qos", "status", check=False)
    assert held.returncode == 1, held.stdout + held.stderr

    fresh.c.systemctl("start", UNIT)
    fresh.c.systemctl("restart", UNIT)

    assert fresh.main_pid() not in (0, pid)
    assert fresh.c.run("test", "-f", LOCK_FILE, check=False).returncode == 0
    assert "qos=locked" in fresh.show("StatusText")["StatusText"]
    held = fresh.c.run("guardctl", "--instance", INSTANCE, "qos", "status", check=False)
    assert held.returncode == 1, held.stdout + held.stderr


def test_guardd_target_restarts_and_stops_every_instance(fresh: Lab) -> None:
    """Instances are PartOf=guardd.target: the target reaches all of them at once."""
    fresh.c.systemctl("start", UNIT, SECOND_UNIT)
    before = {unit: fresh.main_pid(unit) for unit in (UNIT, SECOND_UNIT)}

    fresh.c.systemctl("restart", "guardd.target")

    fresh.c.wait_for(
        lambda: all(
            fresh.main_pid(unit) not in (0, pid) and fresh.c.show(unit, "ActiveState") == "active"
            for unit, pid in before.items()
        ),
        60,
        "every instance to run again with a new MainPID",
    )

    fresh.c.systemctl("stop", "guardd.target")
    fresh.c.wait_for(
        lambda: all(fresh.c.show(unit, "ActiveState") == "inactive" for unit in before),
        60,
        "every instance to stop with the target",
    )
    fresh.c.systemctl("start", "guardd.target")  # the enabled guardd@lab comes back
    fresh.c.wait_for(
        lambda: fresh.c.show(UNIT, "ActiveState") == "active", 60, "guardd@lab to start again"
    )


def test_on_a_read_only_run_an_nginx_restart_restarts_the_guard(fresh: Lab) -> None:
    """Where /run is read-only, `nginx -t` needs the bind mount of /run/nginx.pid, which an
    nginx restart invalidates; PartOf=nginx.service restarts the guard with a fresh one."""
    fresh.add_dropin("50-test-read-only-run.conf", READ_ONLY_RUN_DROPIN)
    fresh.c.systemctl("daemon-reload")
    fresh.c.systemctl("start", UNIT)
    pid = fresh.main_pid()
    mounts = fresh.mounts_seen_by(pid)
    assert mounts["/run"].startswith("ro")
    assert mounts["/run/nginx.pid"].startswith("rw")
    nginx_before = fresh.c.run("cat", "/run/nginx.pid").stdout.strip()

    fresh.c.systemctl("restart", "nginx.service")

    assert fresh.c.run("cat", "/run/nginx.pid").stdout.strip() != nginx_before
    fresh.c.wait_for(
        lambda: (
            fresh.main_pid() not in (0, pid)
            and fresh.show("ActiveState")["ActiveState"] == "active"
        ),
        60,
        "guardd to be restarted along with nginx",
    )
    seen = len(fresh.events())
    fresh.fail("green")
    fresh.wait_event("rollback_completed", after=seen, timeout=90)
    assert fresh.active_link() == f"{UPSTREAMS_DIR}/lab_blue.conf"
    assert fresh.front_door()["color"] == "blue"


def test_units_verify_silently_and_score_2_or_better(
    fresh: Lab, measured: dict[str, float]
) -> None:
    """`systemd-analyze verify` says nothing; `systemd-analyze security` scores <= 2.0.

    Scored as shipped: ``fresh`` has removed every test drop-in.
    """
    assert not fresh.c.run("systemctl", "show", "-P", "DropInPaths", UNIT).stdout.strip()
    for name in UNIT_FILES:
        installed = fresh.c.root / "etc/systemd/system" / name
        assert installed.read_bytes() == (SHIPPED / name).read_bytes(), f"{name} was modified"

    # Inside the container, where /usr/bin/guardd and nginx.service exist.
    verified = fresh.c.run(
        "systemd-analyze",
        "verify",
        "--man=no",
        *(f"/etc/systemd/system/{name}" for name in UNIT_FILES),
        UNIT,
        check=False,
    )
    assert verified.stdout + verified.stderr == ""
    users = fresh.c.run(
        "systemd-sysusers", "--dry-run", "/usr/lib/sysusers.d/guardd.conf", check=False
    )
    assert users.returncode == 0, users.stderr

    security = fresh.c.run("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    found = re.search(rf"Overall exposure level for {re.escape(UNIT)}: (\d+\.\d+)", security.stdout)
    assert found, security.stdout + security.stderr
    score = float(found.group(1))
    measured["systemd_analyze_security_exposure"] = score
    assert score <= 2.0, security.stdout


def _epoch(rfc3339: str) -> float:
    """Seconds since the epoch of a journal line's ``ts``."""
    return datetime.fromisoformat(rfc3339).timestamp()  # 3.11 reads the "Z"
