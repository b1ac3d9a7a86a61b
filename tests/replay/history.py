"""Writing a recorded history for `guardd replay` with the daemon's own `Recorder`, on a
clock the test moves, and running the real `guardd replay` command over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from guardd.journal import Journal
from guardd.observations import Recorder

GUARDD = [sys.executable, "-m", "guardd.cli"]
#: 2026-12-01T00:00:00Z: a fixed, whole day, so that files and times are predictable.
DAY0 = 1_796_083_200.0


class Timeline:
    """A guard's history, written as the daemon writes it: probe rounds of both colors at
    an interval, front-door answers, switches, restarts, and clock steps."""

    def __init__(self, state_dir: Path, guard: str = "lab", *, wall: float = DAY0 + 3600) -> None:
        self.wall = wall
        self.mono = 10_000.0
        self.guard = guard
        self.recorder = Recorder(
            state_dir / "observations",
            guard,
            keep_s=3650 * 86400,
            wall=lambda: self.wall,
            monotonic=lambda: self.mono,
        )
        self.journal = Journal(state_dir / "events.jsonl", guard, lambda: self.wall)
        self.journal.open()

    def tick(self, seconds: float) -> None:
        """Both clocks move on by `seconds`."""
        self.wall += seconds
        self.mono += seconds

    def start(
        self, active: str | None = "green", interval: float = 0.2, *, operator: bool = True
    ) -> None:
        """A daemon run begins (a new monotonic clock, far from the last one); without
        `operator`, as a daemon that did not record operator actions yet wrote it."""
        self.mono += 5_000.0
        # As the daemon: a run journals `started` as it records its `start`.
        self.journal.append("started", target=active, reason=f"guardd guarding {self.guard}")
        if operator:
            self.recorder.start(active=active, probe_interval_s=interval)
        else:
            self.recorder.add(
                "start", guard=self.guard, active=active, probe_interval_s=interval, format=1
            )

    def rounds(
        self,
        n: int,
        *,
        interval: float = 0.2,
        blue: str = "ok",
        green: str = "ok",
        front_door: bool | None = None,
    ) -> None:
        """`n` probe rounds of each color, `interval` apart (blue, then green half-way)."""
        for _ in range(n):
            self.tick(interval / 2)
            self._probe("blue", blue)
            self.tick(interval / 2)
            self._probe("green", green)
            if front_door is not None:
                self.recorder.front_door(front_door, None if front_door else "HTTP 502")
        self.recorder.write()

    def _probe(self, color: str, outcome: str) -> None:
        ok = outcome == "ok"
        self.recorder.probe(color, outcome, 0.004, None if ok else "HTTP 503", 200 if ok else 503)

    def operator(self, event: str, *, by: str, reason: str) -> None:
        """An operator's `paused` or `resumed`, journaled and recorded as the daemon does."""
        self.journal.append(event, reason=reason, by=by)
        self.recorder.operator(event, by=by, reason=reason)

    def incident(self, event: str, **fields: Any) -> None:
        """What the live guard journaled now (`rollback_completed`, `hold`)."""
        self.journal.append(event, **fields)

    def rolled_back(self, source: str = "green", target: str = "blue") -> None:
        """The live guard rolled `source` back to `target` now, on three failures in a row
        (P0), as it journals that."""
        self.incident(
            "rollback_completed",
            source=source,
            target=target,
            reason=f"P0 consecutive_failures: 3 >= 3 on {source}; rolling back to {target}",
            severity="P0",
            evidence={"rule": "consecutive_failures", "threshold": 3, "value": 3, "color": source},
        )

    def green_rolled_back(self) -> None:
        """A run begins serving green, 150 healthy rounds, then green fails three in a row
        and the live guard rolls it back to blue (journaled, and its switch recorded)."""
        self.start(active="green")
        self.rounds(150)
        self.rounds(3, green="http_5xx")
        self.rolled_back()
        # (As the daemon records it: the journal event's reason and severity.)
        reason = "P0 consecutive_failures: 3 >= 3 on green; rolling back to blue"
        self.recorder.switch("green", "blue", by="guardd", reason=reason, severity="P0")

    def failing_run(self, *, healthy_after: int = 100, down: float = 600.0) -> float:
        """A run in which green fails and is rolled back live (journaled), is promoted back
        by a deploy, serves `healthy_after` healthy rounds and stops; then `down` seconds
        with the daemon down. Returns the wall time the run began."""
        began = self.wall
        self.green_rolled_back()
        self.rounds(30, green="http_5xx")
        self.recorder.switch("blue", "green", by="deploy", reason="promote", event="promote")
        self.rounds(healthy_after)
        self.recorder.stop()
        self.tick(down)
        return began

    def close(self) -> None:
        """Write what is pending and close the files."""
        if self.recorder.pending:
            self.recorder.write()
        self.recorder.close()
        self.journal.close()


def config(
    tmp: Path,
    state_dir: Path,
    *,
    extra: str = "",
    instance: str = "lab",
    interval: str = "200ms",
    qos_window: str = "2s",
) -> Path:
    """A config guarding a pair at `interval` (the e2e lab's policy), state in `state_dir`."""
    path = tmp / f"{instance}.toml"
    path.write_text(
        f"""instance = "{instance}"
[upstreams.blue]
url = "http://127.0.0.1:9/healthz"
[upstreams.green]
url = "http://127.0.0.1:10/healthz"
[switch]
kind = "state-file"
path = "{tmp}/deploy-state.json"
[probe]
interval = "{interval}"
fast_interval = "100ms"
[policy]
rollback_to = "blue"
consecutive_failures = 3
window = "30s"
min_samples = 5
p1_sustain = "2s"
budget_window = "1h"
[qos]
window = "{qos_window}"
lock_file = "{tmp}/run/lab.qos.lock"
[state]
dir = "{state_dir}"
{extra}"""
    )
    return path


def replay(
    *args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `guardd replay` with `args` (in `env`, else this process's environment)."""
    return subprocess.run(
        [*(prefix or []), *GUARDD, "replay", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def replay_json(*args: str) -> dict[str, Any]:
    """`guardd replay --json` with `args`: its document (the command must exit 0)."""
    done = replay(*args, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict)
    return doc


def decisions(doc: dict[str, Any], event: str, config_index: int = 0) -> list[dict[str, Any]]:
    """The decisions of one kind of one config of a replay document."""
    found: list[dict[str, Any]] = [
        d for d in doc["configs"][config_index]["decisions"] if d["event"] == event
    ]
    return found
