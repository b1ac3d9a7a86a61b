"""A full disk under the state dir, and a torn journal line from a power cut.

The state dir is a small tmpfs that the test fills up, so every write guardd makes
there fails for real with ENOSPC (or is cut short). Guarding must go on, the failure
must show everywhere an operator looks, and the backlog must land, in order, by itself.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guardd.control import client
from guardd.journal import EVENTS
from tests.faults.util import (
    FaultLab,
    MakeFaultLab,
    assert_journal_well_formed,
    figure,
    guardctl_json,
    metric,
    metrics_port,
    scrape,
    status,
    status_lines,
)
from tests.harness.daemon import Daemon, guardctl, log_lines, wait_until

pytestmark = pytest.mark.nginx


def fill(path: Path) -> int:
    """Write `path` until the filesystem refuses another byte; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    n = os.write(fd, b"\0" * size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < size:
                    break
    finally:
        os.close(fd)
    return written


def fill_until_the_journal_is_refused(lab: FaultLab, filler: Path) -> None:
    """Fill the state dir's file system with `filler`, then journal events (a pause and
    a resume) until guardd keeps one in memory: the journal's last page may have room."""
    assert fill(filler) > 0
    for _ in range(200):
        if status(lab)["storage"]["journal_backlog"]:
            return
        client.call(lab.socket_path, "pause", {"reason": "x" * 200})
        client.call(lab.socket_path, "resume")
    raise AssertionError("the full tmpfs never refused a journal line")


def journal_ids_in_log(d: Daemon) -> list[str]:
    """The ids of the events the daemon journaled, in the order it logged them."""
    return [line["id"] for line in log_lines(d) if line.get("event") in EVENTS and "id" in line]


def test_full_state_dir_guard_goes_on_and_recovers_by_itself(
    make_lab: MakeFaultLab, small_tmpfs: Callable[[Path, str], Path]
) -> None:
    lab: FaultLab = make_lab(metrics__listen="127.0.0.1:0")
    small_tmpfs(lab.state_dir, "256k")
    d = lab.daemon()
    port = metrics_port(d)
    filler = lab.state_dir / "filler"
    fill_until_the_journal_is_refused(lab, filler)
    on_disk_before = len(d.events())

    # The fault that matters happens now, on a full disk: green fails.
    lab.green.set_mode("http_503")
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=30), "rolled back to blue"
    assert wait_until(lab.lock_file.exists, 10, "the QoS lock (in the run dir, not full)")
    logged = [line.get("event") for line in log_lines(d)]
    assert "rollback_started" in logged and "rollback_completed" in logged
    assert len(d.events()) == on_disk_before, "nothing reached the full disk"

    # Reported everywhere: log, metric, STATUS=, guardctl status --json.
    failures = [line for line in log_lines(d) if line.get("event") == "storage_write_failed"]
    assert {f["kind"] for f in failures} >= {"journal", "state"}, failures[:3]
    assert all(f["level"] == "error" for f in failures)
    samples = scrape(port)
    assert metric(samples, "guardd_storage_errors_total", kind="journal") >= 1
    assert metric(samples, "guardd_storage_errors_total", kind="state") >= 1
    assert wait_until(
        lambda: any("storage=failing" in s for s in status_lines(lab)),
        10,
        "STATUS= with storage=failing",
    )
    doc = guardctl_json(lab, "status")
    assert doc["storage"]["ok"] is False
    assert doc["storage"]["journal_backlog"] >= 3
    assert doc["active"] == "blue"
    assert d.proc is not None and d.proc.poll() is None
    # What the disk has not taken yet is no less what happened: history and the incident
    # read it from guardd's memory, the incident saying so.
    history = [e["event"] for e in guardctl_json(lab, "history")]
    assert "rollback_started" in history and "rollback_completed" in history, history
    told = guardctl("--config", str(lab.config_path), "incident", "--json")
    assert told.returncode == 0, told.stderr
    incident = json.loads(told.stdout)
    assert (incident["from"], incident["to"], incident["outcome"]) == (
        "green", "blue", "guard_window",
    ), incident  # fmt: skip
    assert "could not write to" in told.stderr and "read from its memory" in told.stderr

    # Space comes back: the backlog lands in order, storage is ok again, nobody touched it.
    backlog = doc["storage"]["journal_backlog"]
    freed = time.monotonic()
    filler.unlink()
    wait_until(lambda: status(lab)["storage"]["ok"], 20, "storage ok again")
    recovered_s = time.monotonic() - freed
    assert status(lab)["storage"]["journal_backlog"] == 0
    events = assert_journal_well_formed(d.journal_path)
    assert [e["id"] for e in events] == journal_ids_in_log(d), (
        "the journal on disk holds every event, in the order they happened"
    )
    names = [e["event"] for e in events]
    assert names.index("rollback_started") < names.index("rollback_completed")
    done = next(e for e in events if e["event"] == "rollback_completed")
    started = next(e for e in events if e["event"] == "rollback_started")
    assert done["rollback_id"] == started["id"]
    assert wait_until(lambda: d.state().get("active") == "blue", 10, "state.json caught up")
    assert "journal_backlog_written" in [line.get("event") for line in log_lines(d)]
    mark = len(status_lines(lab))
    wait_until(
        lambda: any("storage=failing" not in s for s in status_lines(lab)[mark - 1 :]),
        10,
        "STATUS= without storage=failing",
    )
    assert guardctl_json(lab, "status")["storage"]["ok"] is True
    figure(
        "disk_full",
        backlog_lines=backlog,
        space_back_to_storage_ok_s=round(recovered_s, 2),
        lines_lost=0,
        torn=0,
        storage_errors=metric(scrape(port), "guardd_storage_errors_total"),
    )
    assert d.stop() == 0
    assert_journal_well_formed(d.journal_path)


@pytest.mark.parametrize("under", [None, "another tool's lock"])
def test_a_rollback_on_a_full_disk_killed_and_started_again_ends_its_own_lock(
    make_lab: MakeFaultLab, small_tmpfs: Callable[[Path, str], Path], under: str | None
) -> None:
    # Rolled back on a full state disk, the lock written (in the run dir), then killed
    # before state.json or the journal took a byte of it, and started on the same full
    # disk: the lock is guardd's own, so it is judged as a guard window from the start
    # and released once blue's SLOs held, never left as someone else's for ever. Laid
    # over another tool's lock with no end, it stays, as that lock would have.
    lab: FaultLab = make_lab()
    small_tmpfs(lab.state_dir, "256k")
    d = lab.daemon()
    if under is not None:
        lab.lock_file.write_text('{"by": "deploybot", "reason": "deploy 1234", "until": null}')
    fill_until_the_journal_is_refused(lab, lab.state_dir / "filler")
    lab.green.set_mode("http_503")
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=30), "rolled back to blue"
    assert wait_until(
        lambda: '"by": "guardd"' in lab.lock_file.read_text(), 10, "the QoS lock (in /run)"
    )
    assert d.state().get("qos") is None, "state.json never named the lock"
    d.kill9()

    d2 = lab.daemon()
    said = wait_until(
        lambda: next(
            (
                line
                for line in log_lines(d2)
                if "state.json does not name it" in str(line.get("reason", ""))
            ),
            None,
        ),
        30,
        "the alert that the lock is guardd's own",
    )
    assert said["event"] == "alert", said
    qos = ["--config", str(lab.config_path), "qos", "status"]
    if under is None:
        assert wait_until(lambda: not lab.lock_file.exists(), 30, "the lock released")
        assert guardctl(*qos).returncode == 0
    else:
        assert said["reason"].endswith("it stays until `guardctl qos unlock`"), said
        # Past a whole guard window with blue healthy, deploys are still held.
        lab.blue.wait_for_requests(lab.blue.requests + 30, timeout=60)
        assert "deploy 1234" in lab.lock_file.read_text()
        assert guardctl(*qos).returncode == 1
    assert d2.stop() == 0


def test_torn_last_line_from_a_power_cut_is_skipped_at_start(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab()
    lab.state_dir.mkdir()
    good = {
        "ts": "2024-05-01T10:00:00.000Z",
        "id": "a" * 32,
        "event": "started",
        "guard": "lab",
        "from": None,
        "to": "green",
        "reason": "before the power cut",
        "severity": None,
        "by": "guardd",
    }
    torn = b'{"ts":"2024-05-01T10:00:01.000Z","event":"rollback_sta'
    d_path = lab.state_dir / "events.jsonl"
    d_path.write_bytes(json.dumps(good).encode() + b"\n" + torn)
    d = lab.daemon()
    skipped = [line for line in log_lines(d) if line.get("event") == "journal_lines_skipped"]
    assert skipped and skipped[0]["count"] == 1
    raw = d_path.read_bytes()
    assert raw.startswith(json.dumps(good).encode() + b"\n" + torn + b"\n"), (
        "the good line is kept and the torn one sealed, not glued to the next event"
    )
    events = d.events()
    assert events[0]["id"] == good["id"] and events[-1]["event"] == "started"
    history = client.call(lab.socket_path, "history")["events"]
    assert [e["event"] for e in history] == ["started", "started"]
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert d.stop() == 0


def test_torn_last_line_on_a_full_disk_is_not_fatal(
    make_lab: MakeFaultLab, small_tmpfs: Callable[[Path, str], Path]
) -> None:
    # The seal itself cannot be written: guardd starts anyway and seals once it can.
    lab: FaultLab = make_lab()
    small_tmpfs(lab.state_dir, "128k")
    journal = lab.state_dir / "events.jsonl"
    line = (
        json.dumps(
            {
                "ts": "2024-05-01T10:00:00.000Z",
                "id": "b" * 32,
                "event": "started",
                "guard": "lab",
                "from": None,
                "to": "green",
                "reason": "r",
                "severity": None,
                "by": "guardd",
            }
        ).encode()
        + b"\n"
    )
    torn = b'{"ts":"2024-05-01T10:00:01.000Z","event":"rollback_sta'
    # Exactly two pages, so not one more byte fits once the tmpfs is full.
    pad = 8192 - len(line) - len(torn)
    journal.write_bytes(line + b"\n" * pad + torn)
    filler = lab.state_dir / "filler"
    fill(filler)
    d = lab.daemon()
    assert status(lab)["storage"]["ok"] is False
    assert journal.read_bytes().endswith(torn)
    filler.unlink()
    wait_until(lambda: status(lab)["storage"]["ok"], 20, "storage ok again")
    raw = journal.read_bytes()
    assert raw.startswith(line + b"\n" * pad + torn + b"\n")
    after = raw[len(line) + pad + len(torn) + 1 :]
    assert json.loads(after.splitlines()[0])["event"] == "started"
    assert d.stop() == 0
