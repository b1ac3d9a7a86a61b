"""The world a replayed guard lives in: simulated time, and edges that touch nothing.

The guard (`guardd.guard.Guard`) is the daemon's own; only what it is plugged into
differs. The clock is moved by the replay to each recorded moment; the switcher moves
traffic in memory and always succeeds at once; the journal keeps its events in memory
(they are the replay's decisions); the state file remembers its last document in memory
(a replayed restart reads it back, as the daemon reads state.json); the QoS lock is kept
in memory too, across restarts, as a file would be; metrics go nowhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from guardd import qoslock
from guardd.core.rules import Verdict
from guardd.core.types import COLORS, Color, Outcome
from guardd.core.window import SlidingWindow
from guardd.journal import Journal
from guardd.metrics import GuardMetrics
from guardd.probes.http import ProbeResult
from guardd.statefile import StateFile


class SimClock:
    """Simulated time: `monotonic()` is the history's own clock, `wall()` its wall clock.

    `set(at, ts)` places the clock at a record (monotonic `at`, wall `ts`); `advance(at)`
    moves it on from there, the wall clock by as much as the monotonic one.
    """

    def __init__(self) -> None:
        self._mono = 0.0
        self._offset = 0.0  # wall - monotonic, from the last record

    def set(self, at: float, ts: float) -> None:
        """Stand at a record: monotonic `at` (never back), wall `ts`."""
        if at > self._mono:  # noqa: PLR1730 - `max` without its call: once a record
            self._mono = at
        self._offset = ts - at

    @contextlib.contextmanager
    def stepped(self, at: float, ts: float) -> Iterator[None]:
        """Within: the wall clock as of a record (`at`, `ts`) not reached yet, the monotonic
        one where it stands; after, as before (the record is then stood at with `set`)."""
        kept, self._offset = self._offset, ts - at
        try:
            yield
        finally:
            self._offset = kept

    def advance(self, at: float) -> None:
        """Move the monotonic clock on to `at` (never back); the wall clock follows."""
        self._mono = max(self._mono, at)

    def wall_at(self, at: float) -> float:
        """What the wall clock of the last record said (or would have) at monotonic `at`."""
        return at + self._offset

    def to_mono(self, wall: float) -> float:
        """Where wall time `wall` falls on the monotonic clock, as of the last record."""
        return wall - self._offset

    def monotonic(self) -> float:
        """Seconds on the history's monotonic clock."""
        return self._mono

    def wall(self) -> float:
        """Seconds since the epoch, as the history's wall clock said (or would have)."""
        return self._mono + self._offset


#: Colors named by a `MemorySwitcher` kept with their time, at most (a history of runs
#: beyond it says less of what was served, never something else).
_MAX_SERVED: Final = 100_000


class MemorySwitcher:
    """A switch target in memory (`guardd.switchers.Switcher`): every switch succeeds now.

    Each color it names is kept with the wall time (`wall`) it was named from (`served`):
    what the replayed config served when (`served_at`)."""

    def __init__(
        self, active: Color | None = None, wall: Callable[[], float] | None = None
    ) -> None:
        self._wall = wall
        self.served: list[tuple[float, Color | None]] = []
        self._active: Color | None = None
        self.active = active

    @property
    def active(self) -> Color | None:
        """The color the target names."""
        return self._active

    @active.setter
    def active(self, color: Color | None) -> None:
        changed = not self.served or self.served[-1][1] != color
        if changed and self._wall is not None and len(self.served) < _MAX_SERVED:
            self.served.append((self._wall(), color))
        self._active = color

    def served_at(self, at: float) -> Color | None:
        """The color named at wall time `at` (the latest named at or before it, in the
        order named: a wall clock stepped back lives some times twice); None: unknown."""
        color: Color | None = None
        for since, named in self.served:
            if since <= at:
                color = named
        return color

    async def read_active(self) -> Color | None:
        """The color the target names."""
        return self.active

    async def switch(self, to: Color) -> None:
        """Name `to`; never fails."""
        self.active = to

    async def recover(self) -> None:
        """Nothing is ever left half done."""

    async def restore(self, previous: Color) -> None:
        """Name `previous` again."""
        self.active = previous

    async def reapply(self) -> None:
        """Nothing to re-apply in memory."""


class MemoryJournal(Journal):
    """A journal that keeps every event in memory (`events`) and writes no file."""

    def __init__(self, guard: str, wall: Callable[[], float]) -> None:
        super().__init__(Path("/nonexistent/replay-journal"), guard, wall)
        self.events: list[dict[str, Any]] = []

    def open(self) -> None:
        """Nothing to open."""

    def close(self) -> None:
        """Nothing to close."""

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Journal one event in memory; returns it."""
        record = super().append(event, **fields)
        self.events.append(record)
        return record

    def flush(self) -> None:
        """Drop the encoded lines: they are kept as `events`."""
        self._backlog.clear()

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The events so far (the newest `limit`)."""
        return list(self.events if limit is None else self.events[-limit:])


class MemoryLocks:
    """QoS lock files in memory (`qoslock.LockStore`), by path: each answers what the file
    would, written as `write_lock` writes it and read back as `read_lock` reads it.

    A replayed guard looks at its lock every tick; a file would be opened each time.
    """

    _NONE = qoslock.LockInfo(held=False)

    def __init__(self) -> None:
        self._files: dict[Path, qoslock.LockInfo] = {}

    def read(self, path: Path) -> qoslock.LockInfo:
        """What the lock at `path` says (not held if there is none)."""
        return self._files.get(path, self._NONE)

    def write(self, path: Path, lock: qoslock.LockInfo) -> None:
        """Keep `lock` at `path`, as the file's bytes read back."""
        self._files[path] = qoslock.parse_lock(qoslock.lock_bytes(lock))

    def remove(self, path: Path) -> bool:
        """Drop the lock at `path`; false if there was none."""
        return self._files.pop(path, None) is not None


class MemoryStateFile(StateFile):
    """state.json in memory: `save` keeps the document, `load` gives it back.

    `save_from` keeps how to build it, and builds it when it is read: the guard saves
    its state at every tick, the replay reads it back only at a restart, just after the
    old guard's last save, so the document is the one that save would have kept.
    """

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/replay-state.json"))
        self._doc: dict[str, Any] = {}
        self._build: Callable[[], dict[str, Any]] | None = None

    @property
    def doc(self) -> dict[str, Any]:
        """The last document saved (empty before the first)."""
        if self._build is not None:
            return self._build()
        return self._doc

    def load(self) -> dict[str, Any]:
        """The last document saved (empty before the first)."""
        return dict(self.doc)

    def save(self, doc: dict[str, Any]) -> None:
        """Keep `doc`."""
        self._doc, self._build = doc, None

    def save_from(self, build: Callable[[], dict[str, Any]]) -> None:
        """Keep `build`, to be called when the document is read."""
        self._build = build


class NullMetrics(GuardMetrics):
    """Metrics that go nowhere: replay serves none, and a million probes need not count."""

    def __init__(self, guard: str) -> None:
        super().__init__(guard, "replay")

    def probe_round(self, color: str, result: ProbeResult, window: SlidingWindow) -> None:
        """Not counted: a replay's rounds are a million."""

    def observe_probe(self, color: str, outcome: str, seconds: float) -> None:
        """Not counted."""

    def set_upstream(
        self, color: str, *, healthy: bool, consecutive_failures: int, error_ratio: float
    ) -> None:
        """Not kept."""

    def set_active(self, color: str | None) -> None:
        """Not kept."""

    def set_state(self, state: str) -> None:
        """Not kept."""

    def set_qos_locked(self, locked: bool | None) -> None:
        """Not kept."""

    def set_rollback_target_healthy(self, healthy: bool) -> None:
        """Not kept."""

    def set_rules(self, states: Any) -> None:
        """Not kept."""

    def set_verdicts(self, verdicts: Mapping[Color, Verdict]) -> None:
        """Not kept."""

    def decision_tick(self) -> None:
        """Not counted."""


class SwitchVerifier:
    """What verifies a replayed switch through the front door: it always serves, as the
    color `switcher` serves.

    The replayed switch is in memory and succeeds at once, so its verification does too;
    its presence tells the guard that `switch.verify_url` is watched, so that the recorded
    front-door answers (fed through `Guard.observe_front_door`) are evidence as live. Its
    answer names the served color as `switch.verify_header` would: without it, a config
    with that header never verified a replayed switch (undone, then a hold, after waiting
    out the verify budget in real time).
    """

    def __init__(self, switcher: MemorySwitcher) -> None:
        self.switcher = switcher

    async def probe(self) -> ProbeResult:
        """A passing answer, at once, from the color served."""
        return ProbeResult(Outcome.OK, 0.0, served_by=self.switcher.active)

    async def aclose(self) -> None:
        """Nothing to close."""


#: The results read so far, by their fields: most probe rounds of a day are alike, and a
#: `ProbeResult` is immutable, so one object serves them all.
_RESULTS: dict[tuple[Any, ...], ProbeResult | None] = {}
_MAX_RESULTS = 4096


#: The same, for the fields of the types the recorder writes: (outcome, latency, error, status).
_PLAIN: dict[tuple[Any, ...], ProbeResult | None] = {}


def probe_result(doc: dict[str, Any]) -> ProbeResult | None:
    """The `ProbeResult` of a `probe` record; None when its fields are not one."""
    get = doc.get
    fields = (get("outcome"), get("latency_s"), get("error"), get("status"))
    outcome, latency, error, status = fields
    if (
        type(outcome) is str
        and type(latency) is float
        and (error is None or type(error) is str)
        and (status is None or type(status) is int)
    ):
        # Nearly every record: fields of these types are equal only if they are the same,
        # so the fields alone are the key (no types in it: cheaper to build and hash).
        try:
            return _PLAIN[fields]
        except KeyError:
            return _remember(_PLAIN, fields, doc)
    # The types are part of the key: 1, 1.0 and True are equal keys, not equal fields.
    key = (*fields, *map(type, fields))
    try:
        return _RESULTS[key]
    except KeyError:
        return _remember(_RESULTS, key, doc)
    except TypeError:  # a field that is a list or an object: not a key, nor a result
        return _probe_result(doc)


def _remember(
    cache: dict[tuple[Any, ...], ProbeResult | None], key: tuple[Any, ...], doc: dict[str, Any]
) -> ProbeResult | None:
    """A cache miss: the result of `doc`, kept under `key` (the cache starts over once it
    holds `_MAX_RESULTS`, so a history of ever new fields cannot grow it)."""
    result = _probe_result(doc)
    if len(cache) >= _MAX_RESULTS:
        cache.clear()
    cache[key] = result
    return result


def _probe_result(doc: dict[str, Any]) -> ProbeResult | None:
    try:
        outcome = Outcome(str(doc.get("outcome")))
    except ValueError:
        return None
    latency = doc.get("latency_s")
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        latency = 0.0
    elif not 0.0 <= latency <= MAX_LATENCY_S:
        # NaN, infinite, negative or absurd: no probe took that long (see `why_no_probe`).
        return None
    error = doc.get("error")
    status = doc.get("status")
    return ProbeResult(
        outcome,
        float(latency),
        error if isinstance(error, str) else None,
        status if isinstance(status, int) and not isinstance(status, bool) else None,
    )


#: The longest latency a probe record can say (seconds): a probe is bounded by its
#: timeout, far below this; more is damage, which the window's buckets cannot take.
MAX_LATENCY_S: Final = 86_400.0


def why_no_probe(doc: dict[str, Any]) -> str:
    """Why a `probe` record gives no `ProbeResult` (`probe_result` gave None): for the
    report's skipped lines."""
    latency = doc.get("latency_s")
    if (
        color_of(doc.get("color")) is not None
        and isinstance(latency, int | float)
        and not isinstance(latency, bool)
        and not 0.0 <= latency <= MAX_LATENCY_S
    ):
        return "probe record with an impossible latency"
    return "probe record without a color or outcome"


def color_of(value: object) -> Color | None:
    """`value` if it is one of the two colors."""
    return "blue" if value == "blue" else "green" if value == "green" else None


def fleet_decision(doc: dict[str, Any]) -> bool:
    """Whether a `switch` record is a fleet node applying its leader's own rollback
    (`by: fleet:<leader>`): a guard's decision, which the replayed config makes for itself
    from this node's probes, as it does for `by: guardd`. An operator's fleet-wide move
    (`fleet:uid:0(root)`, no `severity`) is not one. Records written before switches
    carried the rule's `severity` are told apart by their `by` alone.
    """
    by = doc.get("by")
    if not isinstance(by, str) or not by.startswith("fleet:"):
        return False
    if doc.get("event") != "rollback_completed":
        return False
    return doc.get("severity") is not None or not by.startswith("fleet:uid:")


__all__ = [
    "COLORS",
    "MemoryJournal",
    "MemoryLocks",
    "MemoryStateFile",
    "MemorySwitcher",
    "NullMetrics",
    "SimClock",
    "SwitchVerifier",
    "color_of",
    "fleet_decision",
    "probe_result",
]
