"""The replayed guard's edges: the QoS lock and state.json kept in memory answer as the
daemon's files would, across a replayed restart too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd import config as guardd_config
from guardd import qoslock
from guardd.core.types import Outcome
from guardd.probes.http import ProbeResult
from guardd.replay._engine import Simulation
from guardd.replay._world import MemoryLocks, MemoryStateFile, probe_result
from tests.replay.history import Timeline
from tests.replay.history import config as write_config

LOCKS = [
    qoslock.LockInfo(True, "rollback green -> blue: P0", "2026-12-01T00:00:00Z", None, "guardd"),
    qoslock.LockInfo(True, "held", "2026-12-01T00:00:00Z", "2026-12-01T00:01:00Z", "ops"),
    # Fields a file cannot give back as they were: an empty reason, none at all, unicode.
    qoslock.LockInfo(True, "", None, None, None),
    qoslock.LockInfo(True, None, None, None, None),
    qoslock.LockInfo(True, "déploiement bloqué ✋", "x", "y", "z"),
]


@pytest.mark.parametrize("lock", LOCKS)
def test_memory_locks_answer_as_the_lock_files_do(tmp_path: Path, lock: qoslock.LockInfo) -> None:
    files, memory = qoslock.LOCK_FILES, MemoryLocks()
    path = tmp_path / "lab.qos.lock"
    assert memory.read(path) == files.read(path) == qoslock.LockInfo(held=False)
    assert memory.remove(path) is files.remove(path) is False
    files.write(path, lock)
    memory.write(path, lock)
    assert memory.read(path) == files.read(path)
    assert memory.read(path).held
    assert memory.read(tmp_path / "other.lock") == qoslock.LockInfo(held=False)
    assert memory.remove(path) is files.remove(path) is True
    assert memory.read(path) == files.read(path) == qoslock.LockInfo(held=False)


def test_memory_state_file_gives_the_document_as_its_last_save_left_it() -> None:
    state = MemoryStateFile()
    assert state.load() == {}
    built: list[int] = []
    things: dict[str, Any] = {"active": "green"}

    def build() -> dict[str, Any]:
        built.append(1)
        return dict(things)

    for _ in range(1000):
        state.save_from(build)
    assert built == []  # nothing is built until it is read
    things["active"] = "blue"  # the writer saves again (as the replay does before a restart)
    state.save_from(build)
    assert state.load() == {"active": "blue"}
    assert len(built) == 1
    state.save({"active": "green"})  # a document given whole is kept as given
    assert state.load() == {"active": "green"}
    assert len(built) == 1


def test_a_lock_taken_before_a_replayed_restart_is_kept_in_memory_not_on_disk(
    tmp_path: Path,
) -> None:
    tl = Timeline(tmp_path / "state")
    tl.start(active="green")
    tl.rounds(150)
    tl.rounds(10, green="http_5xx")
    tl.rounds(20)
    tl.start(active="blue")  # a restart well within the guard window (1 minute)
    tl.rounds(50)
    tl.close()
    cfg = write_config(tmp_path, tmp_path / "state", qos_window="1m")
    settings = guardd_config.load(cfg)
    sim = Simulation(settings, tmp_path / "state" / "observations", since=None, until=None)
    sim.build_signals()
    anyio.run(sim.run)
    events = [e["event"] for e in sim.journal.events]
    assert events.count("started") == 2, events
    assert events.count("rollback_completed") == 1, events
    # Taken once, by the rollback; the restarted guard took it back from state.json and
    # the lock store, rather than locking again or losing it.
    assert events.count("qos_locked") == 1, events
    assert "qos_released" not in events, events
    guard = sim.guard
    assert guard is not None
    assert guard.qos.store is sim.locks
    assert guard.qos.own_lock is not None
    assert guard.qos.held
    assert sim.locks.read(guard.s.lock_file).held
    assert sim.state_file.load()["qos"]["reason"] == guard.qos.own_lock.info.reason
    # The configured lock file was never written: deploys are not blocked by a replay.
    assert not (tmp_path / "run").exists()


def test_probe_results_read_alike_are_one_object_and_others_are_not_confused() -> None:
    ok = {"kind": "probe", "color": "green", "outcome": "ok", "latency_s": 0.004, "status": 200}
    first, again = probe_result(dict(ok)), probe_result(dict(ok))
    assert first is again
    assert first == ProbeResult(Outcome.OK, 0.004, None, 200)
    # Equal as dict keys, not as fields: each is read as the record says.
    cases: list[tuple[dict[str, Any], ProbeResult | None]] = [
        ({**ok, "latency_s": 1}, ProbeResult(Outcome.OK, 1.0, None, 200)),
        ({**ok, "latency_s": True}, ProbeResult(Outcome.OK, 0.0, None, 200)),
        ({**ok, "latency_s": 1.0}, ProbeResult(Outcome.OK, 1.0, None, 200)),
        ({**ok, "status": True}, ProbeResult(Outcome.OK, 0.004, None, None)),
        ({**ok, "status": 1}, ProbeResult(Outcome.OK, 0.004, None, 1)),
        ({**ok, "status": 1.0}, ProbeResult(Outcome.OK, 0.004, None, None)),
        ({**ok, "error": 1}, ProbeResult(Outcome.OK, 0.004, None, 200)),
        ({**ok, "error": ["HTTP 503"]}, ProbeResult(Outcome.OK, 0.004, None, 200)),
        ({**ok, "error": {"a": 1}, "status": [1]}, ProbeResult(Outcome.OK, 0.004, None, None)),
        (
            {**ok, "outcome": "http_5xx", "error": "HTTP 503", "status": 503},
            ProbeResult(Outcome.HTTP_5XX, 0.004, "HTTP 503", 503),
        ),
        ({**ok, "outcome": ["ok"]}, None),
        ({**ok, "outcome": "fine"}, None),
        ({**ok, "latency_s": -1.0}, None),  # no probe takes less than no time: damage
    ]
    for _ in range(2):  # read, then read again from what was kept
        for doc, want in cases:
            assert probe_result(doc) == want, doc
            if want is not None:
                assert type(probe_result(doc).latency_s) is float  # type: ignore[union-attr]
