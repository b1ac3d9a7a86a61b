"""The systemd harness itself: a real systemd boots, honours Type=notify, and goes away cleanly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness.nspawn import (
    CGROUP_HIERARCHIES,
    KEEP_ENV,
    PROPAGATE_DIR,
    Container,
    analyze_verify,
)

pytestmark = pytest.mark.systemd

# One line, because it goes into ExecStart=; chr(0) because systemd would unescape a "\0".
NOTIFY_AFTER_ONE_SECOND = (
    "import os, socket, time; time.sleep(1); "
    "address = os.environ['NOTIFY_SOCKET']; "
    "address = chr(0) + address[1:] if address.startswith('@') else address; "
    "sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
    "sock.sendto(b'READY=1', address); sock.close(); "
    "time.sleep(1e9)"
)
NOTIFY_UNIT = f"""\
[Unit]
Description=Harness check: becomes ready one second after it starts

[Service]
Type=notify
ExecStart=/usr/bin/python3 -c "{NOTIFY_AFTER_ONE_SECOND}"
"""


def test_real_systemd_waits_for_ready_and_shuts_down_cleanly(container: Container) -> None:
    """`systemctl start` of a Type=notify unit returns only once the service sent READY=1."""
    (container.root / "etc/systemd/system/harness-notify.service").write_text(NOTIFY_UNIT)
    container.systemctl("daemon-reload")

    started = time.monotonic()
    container.systemctl("start", "harness-notify.service")
    start_took = time.monotonic() - started

    assert container.show("harness-notify.service", "ActiveState") == "active"
    assert start_took >= 1.0
    # systemd's own clocks agree: the unit went active a second after its process started.
    exec_started = int(container.show("harness-notify.service", "ExecMainStartTimestampMonotonic"))
    activated = int(container.show("harness-notify.service", "ActiveEnterTimestampMonotonic"))
    assert activated - exec_started >= 1_000_000
    assert "Started harness-notify.service" in container.journal("harness-notify.service")

    imported = container.run(
        "/opt/guardd/bin/python", "-c", "import guardd; print(guardd.__file__)"
    )
    assert imported.stdout.startswith("/opt/guardd/lib/python3.11/site-packages/guardd/")
    assert (container.root / "usr/bin/guardd").readlink() == Path("/opt/guardd/bin/guardd")
    assert (container.root / "usr/bin/guardctl").readlink() == Path("/opt/guardd/bin/guardctl")
    assert "nginx version: nginx/" in container.run("nginx", "-v").stderr

    nspawn_pid = container.nspawn_pid
    assert nspawn_pid is not None
    container.shutdown()

    assert container.exit_status == 0
    assert not Path(f"/proc/{nspawn_pid}").exists()
    for hierarchy in CGROUP_HIERARCHIES:
        assert not (hierarchy / f"guardtest-{nspawn_pid}").exists()
    assert not (PROPAGATE_DIR / container.name).exists()
    container.close()
    assert container.workdir.exists() is (os.environ.get(KEEP_ENV) == "1")


def test_analyze_verify_is_silent_on_a_sound_unit(tmp_path: Path) -> None:
    """A unit without mistakes verifies without a word, templates included."""
    unit = tmp_path / "harness-sleep@.service"
    unit.write_text(
        "[Unit]\nDescription=Harness check %i\n\n"
        "[Service]\nType=simple\nExecStart=/bin/sleep infinity\nRestart=on-failure\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )

    assert analyze_verify([unit]) == ""


def test_analyze_verify_reports_what_systemd_would_ignore(tmp_path: Path) -> None:
    """Typos and bad values pass `systemd-analyze verify` with exit 0 but show in its output."""
    unit = tmp_path / "harness-typo.service"
    unit.write_text(
        "[Service]\nType=notify\nExecStrat=/bin/true\nExecStart=/bin/true\nRestart=sometimes\n"
    )

    output = analyze_verify([unit])

    assert "Unknown key 'ExecStrat'" in output
    assert "sometimes" in output
