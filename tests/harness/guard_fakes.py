"""A `Guard` on real files (journal, state.json, lock file) with a fake clock and switcher.

Fast enough to drive through hundreds of ticks in a test, and real where a restart looks:
everything the guard keeps lives in one directory, so copying the directory is a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guardd.core.machine import Decision, GuardMachine
from guardd.core.policy import PolicySpec
from guardd.core.types import Color, Outcome
from guardd.exceptions import SwitchError
from guardd.guard import Guard, GuardSettings
from guardd.journal import Journal
from guardd.metrics import GuardMetrics
from guardd.probes.http import ProbeResult
from guardd.statefile import StateFile

INTERVAL = 1.0
OK = ProbeResult(Outcome.OK, 0.01)
DOWN = ProbeResult(Outcome.HTTP_5XX, 0.01, "HTTP 503")


class FakeClock:
    """Both clocks, moved by the test only."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_s = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_s

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall_s += s


class FakeSwitcher:
    """The switch target, as a file beside the state, so a copy of the directory copies it."""

    def __init__(self, path: Path, on_switch: Callable[[], None] | None = None) -> None:
        self.path = path
        self.fail = False
        self.on_switch = on_switch

    async def read_active(self) -> Color | None:
        text = self.path.read_text().strip()
        return "blue" if text == "blue" else "green" if text == "green" else None

    async def switch(self, to: Color) -> None:
        if self.on_switch is not None:
            self.on_switch()  # the moment a crash would leave the files in
        if (self.path.parent / "switch-fails").exists():
            raise SwitchError("nginx -t failed: [emerg] unexpected end of file")
        self.path.write_text(to)

    async def recover(self) -> None:
        return None

    async def restore(self, previous: Color) -> None:
        self.path.write_text(previous)

    async def reapply(self) -> None:
        self.reapplied = getattr(self, "reapplied", 0) + 1


class FakeVerifier:
    """The front door: answers what the test last set (`result`), on every probe."""

    def __init__(self) -> None:
        self.result = ProbeResult(Outcome.OK, 0.001)

    async def probe(self) -> ProbeResult:
        return self.result

    async def aclose(self) -> None:
        return None


class Log:
    """A structlog stand-in that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def emit(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return emit


SPEC = PolicySpec(
    rollback_to="blue",
    consecutive_failures=3,
    window=30.0,
    min_samples=3,
    p1_sustain=5.0,
    max_rollbacks=3,
    budget_window=3600.0,
)


def settings(root: Path, spec: PolicySpec) -> GuardSettings:
    return GuardSettings(
        instance="lab",
        policy=spec,
        probe_interval=INTERVAL,
        confirm_interval=INTERVAL,
        switch_timeout=5.0,
        verify_url=None,
        verify_successes=1,
        lock_file=root / "run" / "lab.qos.lock",
        qos_window=10.0,
        qos_max_error_ratio=0.01,
        qos_min_health_ratio=0.99,
    )


def build(root: Path, clock: FakeClock, spec: PolicySpec, verifier: Any = None, **kw: Any) -> Guard:
    (root / "run").mkdir(parents=True, exist_ok=True)
    journal = Journal(root / "state" / "events.jsonl", "lab", clock.wall)
    journal.open()
    s = settings(root, spec)
    guard = Guard(
        s,
        machine=GuardMachine(spec, INTERVAL),
        switcher=FakeSwitcher(root / "target", **kw),
        journal=journal,
        state_file=StateFile(root / "state" / "state.json"),
        metrics=GuardMetrics("lab", "0"),
        verifier=verifier,
        clock=clock,
        log=Log(),
    )
    guard.load_history()
    return guard


def prepare(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "target").write_text("green")


async def start(
    root: Path, clock: FakeClock, spec: PolicySpec, verifier: Any = None, **kw: Any
) -> Guard:
    guard = build(root, clock, spec, verifier, **kw)
    await guard.recover(guard.state_file.load())
    return guard


async def step(
    guard: Guard,
    clock: FakeClock,
    blue: ProbeResult,
    green: ProbeResult,
    front: ProbeResult | None = None,
) -> Decision:
    """One probe round of each color (and of the front door, when given), then a decision
    tick, as the supervisor does."""
    clock.advance(INTERVAL)
    guard.observe("blue", blue)
    guard.observe("green", green)
    if front is not None:
        guard.observe_front_door(front)
    async with guard.lock:
        return await guard.tick()


async def steps(guard: Guard, clock: FakeClock, rounds: Sequence[tuple[ProbeResult, ...]]) -> None:
    for probes in rounds:
        await step(guard, clock, *probes)
