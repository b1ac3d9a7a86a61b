"""A `Guard` on real files (journal, state.json, lock file) with a fake clock and switcher.

Built with `guardd.testing`; what is here is what only these tests need: the switch
target in a file (a directory copy is a restart), a front door answering given results.

Fast enough to drive through hundreds of ticks in a test, and real where a restart looks:
everything the guard keeps lives in one directory, so copying the directory is a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guardd.core.policy import PolicySpec
from guardd.core.types import Outcome
from guardd.exceptions import SwitchError
from guardd.guard import Guard, GuardSettings
from guardd.probes.http import ProbeResult
from guardd.switchers import STEP_LINK_WRITTEN
from guardd.testing import (
    DEFAULT_POLICY,
    ManualClock,
    MemorySwitcher,
    SwitchOp,
    build_guard,
    feed_round,
    guard_settings,
)

INTERVAL = 1.0
OK = ProbeResult(Outcome.OK, 0.01)
DOWN = ProbeResult(Outcome.HTTP_5XX, 0.01, "HTTP 503")


# The test clock is guardd's public one; the name stays for the tests that use it.
FakeClock = ManualClock


class FakeSwitcher(MemorySwitcher):
    """A `MemorySwitcher` kept in a file beside the state, so a copy of the directory
    copies the switch target too.

    *on_switch* runs as a switch begins (the moment a crash would leave the files in),
    and a file ``switch-fails`` beside it makes every switch fail at its first step.
    """

    def __init__(self, path: Path, on_switch: Callable[[], None] | None = None) -> None:
        async def hook(step: str) -> None:
            if on_switch is not None and step == STEP_LINK_WRITTEN:
                on_switch()

        super().__init__(path=path, on_step=hook)

    def _failure_for(self, op: SwitchOp, step: str) -> BaseException | None:
        fails = self.path is not None and (self.path.parent / "switch-fails").exists()
        if fails and op == "switch" and step == self.steps[0]:
            return SwitchError("nginx -t failed: [emerg] unexpected end of file")
        return None


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


# guardd.testing's quick policy, with rollbacks always to blue.
SPEC = dataclasses.replace(DEFAULT_POLICY, rollback_to="blue")


def settings(root: Path, spec: PolicySpec) -> GuardSettings:
    return guard_settings(root, spec, instance="lab", interval=INTERVAL)


def build(root: Path, clock: FakeClock, spec: PolicySpec, verifier: Any = None, **kw: Any) -> Guard:
    switcher = FakeSwitcher(root / "target", **kw)
    rig = build_guard(
        root,
        policy=spec,
        clock=clock,
        switcher=switcher,
        verifier=verifier,
        log=Log(),
        instance="lab",
        interval=INTERVAL,
    )
    return rig.guard


def prepare(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "target").write_text("green")


async def start(
    root: Path, clock: FakeClock, spec: PolicySpec, verifier: Any = None, **kw: Any
) -> Guard:
    guard = build(root, clock, spec, verifier, **kw)
    await guard.recover(guard.state_file.load())
    return guard


# One probe round of each color (and of the front door, when given), then a decision tick.
step = feed_round


async def steps(guard: Guard, clock: FakeClock, rounds: Sequence[tuple[ProbeResult, ...]]) -> None:
    for probes in rounds:
        await step(guard, clock, *probes)
