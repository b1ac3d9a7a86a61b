"""One config over the recorded history: the daemon's own guard, in simulated time.

The tick schedule mirrors `guardd.supervisor`: a tick after each probe round for which
`Guard.observe` says it may change a decision, after each answer through the front door
that may, one `PULSE_S` after new lines of a signal (`_signal_pulse`), and otherwise one
per `probe.interval` after the last tick (`_decision_loop`). The first tick of a run waits
for a probe round of each color (the daemon's first round). A `start` record is a daemon
restart: a new guard (fresh windows) that recovers from the previous one's state.json and
journal, both kept in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import heapq
import itertools
import math
import secrets
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from guardd.config import Settings
from guardd.core.cadence import next_round
from guardd.core.types import COLORS, Color, Outcome
from guardd.exceptions import OperationRefused
from guardd.guard import Guard
from guardd.observations import (
    CLOCK_STEP_S,
    FORMAT,
    ReadReport,
    Record,
    SteppedBack,
    read_history,
)
from guardd.probes.http import ProbeResult
from guardd.replay._sources import (
    AHEAD_S,
    PULSE_S,
    SourceReport,
    has_timestamps,
    line_time,
    msec_reader,
    read_lines,
    rotated_files,
    slots,
    without_overlap,
)
from guardd.replay._world import (
    MemoryJournal,
    MemoryLocks,
    MemoryStateFile,
    MemorySwitcher,
    NullMetrics,
    SimClock,
    SwitchVerifier,
    color_of,
    fleet_decision,
    probe_result,
    why_no_probe,
)
from guardd.signals import AccessLogSignal, LogMatchSignal, Signal
from guardd.signals._tail import FileFollower
from guardd.supervisor import (
    Runtime,
    build_guard,
    guard_settings,
    probe_identity,
    signal_of,
)
from guardd.timestamps import rfc3339

#: Records held while the color served is not known yet (history that begins mid-run).
_MAX_HELD = 100_000
#: Times closer than this are one moment (the history's clock is summed in floating point).
_SAME_MOMENT = 1e-6
#: A run without any record for longer than this (seconds), and `_GAP_ROUNDS` of the
#: longest a probe round can take (`probe.timeout + probe.interval`: each color is probed
#: on its own, so only both hanging at once stops the records), lost its records: the gap
#: is not ticked through. A hole of 40 s at a 1 s interval is forty rounds lost, never
#: quiet: ticking through it judged the colors on probes gone stale.
_GAP_S = 5.0
_GAP_ROUNDS = 3
#: Stretches of wall time lived kept (`Simulation.lived`), at most.
_MAX_LIVED = 10_000
#: Ticks in a row without input after which a gap in the history is crossed at once.
_QUIET_TICKS = 100


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A private folder (mode 0700) in the temporary directory, removed on the way out,
    however the way out is taken.

    Not `tempfile.TemporaryDirectory`: a Ctrl-C (`Signalled`, raised between two bytecodes)
    that lands after `mkdtemp` made the folder and before a `with` owns it leaves the folder
    behind. Here it is named first and made inside the `try` whose `finally` removes it.
    """
    path = Path(tempfile.gettempdir()) / f"guardd-replay-{secrets.token_hex(8)}"
    try:
        path.mkdir(mode=0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """The cyclic garbage collector runs a tenth as often as by default while a history
    is replayed, and as before afterwards.

    A day's records are a million short-lived objects (a dict and a tuple each, freed
    within a tick): at the default threshold (700 allocations) they start some 2,500
    young collections and 18 full ones, each full one walking every object of the
    process (the settings' models, the modules). At 10,000 a day of probes at 200 ms
    replays about 8 % faster (`python -m bench.replay`: 12.9 s -> 11.9 s on 2 cores); the
    records hold no cycles, so no more memory is kept meanwhile.
    """
    threshold = gc.get_threshold()
    gc.set_threshold(10_000, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


#: The name of the stream of operator actions among the sources' batches.
_OPERATOR: Final = "\x00operator"


class _NullLog:
    """A logger that says nothing: the decisions are the journal's events."""

    def __getattr__(self, _name: str) -> Any:
        return _nothing


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


# An external batch: (wall, order, signal name, payload); order keeps the merge stable.
_Batch = tuple[float, int, str, Any]


def _hole_s(window: float) -> float:
    """A stretch without a line (between two files, within one) longer than this may be
    said (seconds; also when many times longer than the lines came apart before it): a
    twelfth of the signal's window, 5 s at least (its rules judged that much less than
    they would have)."""
    return max(5.0, window / 12)


def _spans(report: SourceReport, end: float) -> None:
    """Count a batch of lines in the slot ending at `end` in `report`'s line span."""
    start = end - PULSE_S
    report.fill(start, end)
    if report.first_line is None or start < report.first_line:
        report.first_line = start
    if report.last_line is None or end > report.last_line:
        report.last_line = end


@dataclasses.dataclass(slots=True)
class _Schedule:
    """When a stream's next round (a color's probe, the front door) is due at the
    config's cadence, as the daemon's probe loops schedule it (`next_round`). Times are
    the history's clock (`Record.at`, seconds)."""

    #: The next round due (None: the next recorded round is taken).
    due: float | None = None
    #: The last round recorded (fed or not): the spacing of the history.
    recorded_at: float | None = None
    #: Where the stream's cadence starts: its first round fed. (The daemon's loops share
    #: one start, but a stream's rounds are recorded as they end, each stream's a probe's
    #: time after it was due: its own first round stands for that start.)
    epoch: float | None = None

    def takes(self, at: float) -> bool:
        """Whether the round recorded at `at` stands for one the config made: the one
        nearest the due time is; one more than half the history's spacing early is left
        for the next."""
        previous, self.recorded_at = self.recorded_at, at
        due = self.due
        return due is None or previous is None or at >= due - (at - previous) / 2

    def fed(self, at: float, cadence: float, step: float) -> None:
        """The round at `at` was fed: the next is due as `next_round` says, at `cadence`
        (s) on a grid of `step` (s, `probe.interval`), for a round due when it was due
        (the first: at `at`) that began and ended at `at`."""
        due, epoch = self.due, self.epoch
        if due is None or epoch is None:
            due = epoch = self.epoch = at
        self.due = next_round(due, at, at, cadence, (epoch, step))


class Simulation:
    """Replays the history in `directory` through a guard built from `settings`.

    `since` / `until`: wall-time bounds (seconds) of what is decided. Everything before
    `since` is replayed too, its decisions left out of the report (the caller's part): the
    guard's state at `since` (its windows, a rollback's QoS lock, a hold, the rollback
    budget) follows from all of it, and a replay begun a window before `since` decided
    there on a state the daemon never had. After `run()`: `events` (the journal the
    replayed guard wrote), `report` (what reading skipped) and `sources` (per signal).
    """

    #: Whether a probe round that needs nothing but feeding in takes the short way in
    #: `_run` (false: every record goes through `_step`; the tests compare the two).
    fast_probes = True

    def __init__(  # noqa: PLR0915 - a statement per attribute, each with what it holds
        self,
        settings: Settings,
        directory: Path,
        *,
        since: float | None,
        until: float | None,
        prometheus: dict[str, list[tuple[float, str, dict[str, Any]]]] | None = None,
        guard: str | None = None,
        repeats: bool = True,
    ) -> None:
        self.settings = settings
        #: Whose history is read (default: this config's instance; `--compare` reads the
        #: first config's for both).
        self.history_of = guard or settings.instance
        self.directory = directory
        self.since = since
        self.until = until
        self.clock = SimClock()
        self.report = ReadReport()
        self.sources: dict[str, SourceReport] = {}
        #: Per prometheus signal replayed from Prometheus' own history: (wall, color, data).
        self.prometheus = prometheus or {}
        #: The live journal's operator actions replayed at their time: (wall, `paused` or
        #: `resumed` event). Not recorded in the observations; a resume refills the
        #: rollback budget, which the replayed guard must know to decide as live did.
        self.operator: list[tuple[float, dict[str, Any]]] = []
        self.journal = MemoryJournal(settings.instance, self.clock.wall)
        self.state_file = MemoryStateFile()
        self.switcher = MemorySwitcher(wall=self.clock.wall)
        #: The QoS lock files, kept across the replayed restarts as on disk.
        self.locks = MemoryLocks()
        self.metrics = NullMetrics(settings.instance)
        self.guard: Guard | None = None
        self.signals: dict[str, Signal] = {}
        self.bad_samples: Counter[str] = Counter()
        #: Recorded samples replayed, per signal (`prometheus` and `scrape` signals).
        self.samples: Counter[str] = Counter()
        self.first_ts: float | None = None
        #: The earliest wall time of any record replayed, the warm-up's too.
        self.earliest_ts: float | None = None
        self.last_ts: float | None = None
        #: Records replayed before `since` (the warm-up: not in the period).
        self.warmup_records = 0
        #: The daemon runs with records in the period (the reader counts every `start` it
        #: reads, any time); `_in_period` says the current run has one.
        self.runs = 0
        self._in_period = False
        #: Records in a row stamped back before `since` after the period began.
        self._back = SteppedBack("--from", directory)
        #: The slowest probe interval a run of the history probed at (its `start`), if any
        #: said: a replayed guard probing faster sees rounds only that often.
        self.recorded_interval: float | None = None
        #: The probe interval the current run of the history probed at, if its `start` said.
        self._run_interval: float | None = None
        #: Each color's probe rounds at the config's cadence: a config probing slower
        #: than the history was recorded (`probe.interval`, or `fast_interval` while
        #: confirming a failure) is fed only the rounds it would have made (`_probe`).
        self._schedules: dict[Color, _Schedule] = {color: _Schedule() for color in COLORS}
        #: The same for the front door, asked at `probe.interval` (`_front_door_loop`).
        self._door = _Schedule()
        #: Probe rounds recorded but left out, a guard at the config's slower cadence
        #: having made none then; and the rounds fed to the guard.
        self.thinned = 0
        self.probes_fed = 0
        #: The live journal's pauses and resumes replayed (`operator`).
        self.operator_actions = 0
        #: An operator's moves to the color the replayed guard already served: (wall
        #: time, `switch`/`promote`/`rollback`, color).
        self.moves_without_effect: list[tuple[float, str, Color]] = []
        #: The current run records its operator actions (its `start` says so): they are
        #: replayed from its `operator` records, and the journal's copies are left out.
        self._run_records_operator = False
        #: Runs replayed that did not record them (their `start` older, or no `start`):
        #: their pauses and resumes are the journal's alone.
        self.runs_without_operator = 0
        self.ticks = 0
        self.skipped_ticks = 0
        #: Whether a tick shown to repeat the last one is counted rather than taken
        #: (`Guard.repeat_key`); false takes every tick (what the daemon does).
        self.repeats = repeats
        #: Ticks counted in `ticks` that were not taken, being repeats of the one before.
        self.repeated_ticks = 0
        # The guard's `repeat_key` just after its last tick taken, if that tick took no action.
        self._after: tuple[object, ...] | None = None
        # Whether, since `_after` was taken (or last found equal), the guard was only fed
        # probe rounds and moved on in time: then only the key's moving part can differ.
        self._only_probed = False
        #: Records left out, the served color unknown (a history that begins mid-run): how
        #: many, and the wall times of the first and last; None when there were none.
        self.headless: tuple[int, float, float] | None = None
        #: A history that begins mid-run, the color served told by a switch's `from`: the
        #: first record's wall time and the switch's (seconds).
        self.midrun: tuple[float, float] | None = None
        #: Stretches of a run without any record (records lost): (wall time after, seconds).
        self.gaps: list[tuple[float, float]] = []
        #: The wall time of each run's `start` record read.
        self.run_starts: list[float] = []
        #: Stretches the daemon said it was down: (its `stop`, the next `start`), wall times.
        self.downs: list[tuple[float, float]] = []
        #: Stretches of wall time a running daemon's records cover, `[first, last]`: a wall
        #: clock stepped back lives some times twice, once running (see `lived_at`).
        self.lived: list[list[float]] = []
        #: The live guard's own switches the history records: (wall, from, to, reason).
        self.live_rollbacks: list[tuple[float, Color | None, Color, str]] = []
        probe = settings.config.probe
        self._gap_s = max(_GAP_S, _GAP_ROUNDS * (probe.timeout + probe.interval))
        self._last_at: float | None = None
        self._in_gap = False
        # A run ended by its `stop` record (a clean shutdown): nothing is decided, and no
        # external batch fed, until the next run starts.
        self._down = False
        self._quiet = 0  # ticks since the last input
        self._events_seen = 0
        self._interval = settings.config.probe.interval
        self._verify = settings.config.switch.verify_url is not None
        self._started = False  # the run's first tick is done
        self._seen: set[Color] = set()  # colors probed in this run
        self._next_tick = math.inf
        self._pulse = math.inf
        self._live: Color | None = None  # the color the live run served
        self._lines_seen: dict[str, int] = {}
        self._lock_file: Path | None = None
        self._order = itertools.count()
        #: Each source's last batch handed over (its wall time): see `_step`.
        self._fed: dict[str, float] = {}
        #: The followers of the log_match files the history holds: read at every tick,
        #: as live, where a quiet log is read all the same and never goes stale.
        self._logs_read: list[FileFollower] = []

    # ---- building -------------------------------------------------------------------

    def _runtime(self) -> Runtime:
        assert self._lock_file is not None  # noqa: S101 - set by run()
        s = self.settings
        # guardd's QoS lock goes to a private folder: deploys are never blocked by a replay.
        gs = dataclasses.replace(guard_settings(s), lock_file=self._lock_file)
        return Runtime(
            settings=s,
            guard=gs,
            probe_identity=probe_identity(s.config),
            probers={},
            verifier=SwitchVerifier(self.switcher) if self._verify else None,  # type: ignore[arg-type]
            switcher=self.switcher,
            notifier=None,
            signals=self.signals,
        )

    async def _new_run(self, active: Color | None, *, moved_unseen: bool = False) -> None:
        """A daemon (re)start: a new guard that recovers as `Supervisor.run` does.

        `moved_unseen`: the run serves `active`, another color than the replayed guard
        served, after a run that ended without a `stop` record. The history lost how
        traffic moved (the live guard's own rollback, or an operator's switch): the new
        guard adopts it, journaled as an `external_switch` that says so, never as a switch
        made while the daemon was down (which the live daemon would journal)."""
        self._run_ends()
        self.runs_without_operator += not self._run_records_operator
        moved_from = None
        if self.guard is not None:
            if moved_unseen and active is not None:
                moved_from, self.guard.active = self.guard.active, active
            self.guard.save_state()
            # A daemon started again reads its logs from their end into fresh windows: the
            # lines of the run before never count in this one's.
            for sig in self.signals.values():
                restarted = getattr(sig, "restarted", None)
                if restarted is not None:
                    restarted()
        if active is not None:
            self.switcher.active = active
        guard = build_guard(
            self._runtime(),
            journal=self.journal,
            state_file=self.state_file,
            metrics=self.metrics,
            clock=self.clock,
            log=_NullLog(),
        )
        guard.qos.store = self.locks
        self._schedules = {color: _Schedule() for color in COLORS}
        self._door = _Schedule()
        if self._run_interval is not None and self._run_interval > self._interval:
            # The history holds a round only every recorded interval: a config probing
            # faster would judge every color stale between two of them (and alert, and
            # refuse rollbacks to it) for want of rounds that were never recorded, not
            # for anything the upstreams did. Staleness is judged on the recorded cadence.
            guard.machine.probe_interval = self._run_interval
        await guard.recover(guard.state_file.load())
        if moved_from is not None and moved_from != guard.active:
            guard.record(
                "external_switch",
                source=moved_from,
                target=guard.active,
                by="unknown",
                reason=(
                    f"the run that began here served {guard.active}; the records before it "
                    "were lost (the run before never said it stopped), and with them how "
                    "traffic moved: adopted"
                ),
            )
        guard.record("started", target=guard.active, reason="replayed run")
        self.guard = guard
        self._after = None
        self._only_probed = False
        self._started = False
        self._seen = set()
        self._next_tick = self._pulse = math.inf

    def build_signals(self) -> None:
        """Every `[signals.NAME]` on the simulated clock (`ConfigError` if one cannot be)."""
        for name in self.settings.config.signals:
            self.signals[name], _ = signal_of(self.settings, name, self.clock)

    # ---- ticking --------------------------------------------------------------------

    async def _tick(self, at: float) -> None:
        if not self._counted(at):
            await self._take(at)

    def _repeats(self) -> bool:
        """Whether a tick now would repeat the last one taken: the guard's `repeat_key` is
        the one taken just after it (`_after`), and that tick decided nothing.

        While the guard was only fed probe rounds since that key (or since one found equal
        to it), only the key's moving part can differ (`Guard.moving_key`): that is all
        that is compared then, about a third of the cost of a whole key.
        """
        after = self._after
        if after is None:
            return False
        guard = self.guard
        assert guard is not None  # noqa: S101
        if self._only_probed:
            return guard.moving_key() == after[0]
        if guard.repeat_key(self.switcher.active) != after:
            return False
        self._only_probed = True
        return True

    def _counted(self, at: float) -> bool:
        """A tick at `at` counted without being taken, if it would repeat the last one (it
        would decide nothing and change nothing); whether it was. Most ticks of a quiet day."""
        self.clock.advance(at)
        if not self._repeats():
            return False
        guard = self.guard
        assert guard is not None  # noqa: S101
        guard.repeat_tick()
        self.repeated_ticks += 1
        self.ticks += 1
        self._next_tick = self.clock.monotonic() + self._interval
        self._pulse = math.inf
        return True

    async def _take(self, at: float) -> None:
        """Take a decision tick at `at`."""
        guard = self.guard
        assert guard is not None  # noqa: S101
        self.clock.advance(at)
        now = self.clock.monotonic()
        for follower in self._logs_read:
            follower.read_at = now
        # No lock: the replay is one task, and nothing else can act on its guard meanwhile.
        decision = await guard.tick()
        self._taken(decision.actions, decision.blocked_by)
        self.ticks += 1
        self._next_tick = self.clock.monotonic() + self._interval
        self._pulse = math.inf

    def _taken(self, actions: tuple[object, ...], blocked_by: str | None) -> None:
        """Keep the guard's key just after a tick that took no action (else none)."""
        guard = self.guard
        assert guard is not None  # noqa: S101
        self._after = (
            guard.repeat_key(self.switcher.active)
            if self.repeats and not actions and blocked_by is None
            else None
        )
        self._only_probed = True

    async def _until(self, at: float) -> None:
        """Run every tick due before monotonic `at` (not at it).

        Through a long stretch without input (the history has a gap) the guard's ticks
        change nothing once it has settled: after `_QUIET_TICKS` ticks without input and
        without a decision, the next one is the last before `at`; `skipped_ticks` counts
        those not run.
        """
        if self._down:
            return  # no daemon: nothing ticks until the next run's first tick
        if self._in_gap:
            # Not ticked through: the guard saw its probes every interval, so a run without
            # any record for this long lost them; the next tick is at the next record.
            self._next_tick = max(self._next_tick, at)
            self._pulse = math.inf
            return
        while self._started:
            due = min(self._next_tick, self._pulse)
            if due >= at - _SAME_MOMENT:
                # A tick due at `at` itself waits for the input there: the daemon's decision
                # loop wakes once, whether for the probe, the pulse or its period.
                return
            if self._quiet >= _QUIET_TICKS and len(self.journal.events) == self._events_seen:
                last = due + self._interval * math.floor((at - due) / self._interval)
                self.skipped_ticks += int((last - due) / self._interval)
                due = last
            self._events_seen = len(self.journal.events)
            self._quiet += 1
            await self._tick(due)

    def _pulse_check(self) -> None:
        """New lines of a signal wake the decision loop at the next pulse (`_signal_pulse`)."""
        changed = False
        for name, sig in self.signals.items():
            lines = getattr(sig, "lines", None)
            n = (
                sum(v for v in lines.values() if isinstance(v, int))
                if isinstance(lines, dict)
                else 0
            )
            if n != self._lines_seen.get(name, 0):
                self._lines_seen[name] = n
                changed = True
        if changed and self._started:
            # The lines came in a `PULSE_S` slot that ends now: the daemon's pulse sees them
            # at its end and wakes the decision loop (run before the next input).
            self._pulse = min(self._pulse, self.clock.monotonic())

    # ---- records --------------------------------------------------------------------

    async def _record(self, rec: Record) -> None:
        self._quiet = 0
        if rec.kind != "probe":
            # Whatever else a record does to the guard may change any part of its key.
            self._only_probed = False
        if rec.kind == "context" and self.guard is None:
            # A day's file opened by a run going on: news only to a history that begins
            # here (the records before it, of the same run, were held until now). Otherwise
            # a record like any other that moves the clock, and does nothing more.
            self._live = color_of(rec.doc.get("active"))
        if rec.kind == "start":
            self.run_starts.append(rec.ts)
            stopped, self._down = self._down, False
            if stopped:
                self.downs[-1] = (self.downs[-1][0], rec.ts)
            self._run_records_operator = rec.doc.get("operator_actions") is True
            self.clock.set(rec.at, rec.ts)
            given = color_of(rec.doc.get("active"))
            self._damaged_start(rec.doc, given)
            interval = rec.doc.get("probe_interval_s")
            self._run_interval = None
            if (
                isinstance(interval, int | float)
                and not isinstance(interval, bool)
                and 0 < interval <= 86_400  # (NaN is neither)
            ):
                self._run_interval = float(interval)
                self.recorded_interval = max(self.recorded_interval or 0.0, interval)
            # The sim keeps its own color across a restart, unless the live one changed
            # while the daemon was down (someone moved traffic): that is adopted.
            moved = self.guard is None or (given is not None and given != self._live)
            # The run before never said it stopped (a crash; its last records lost): who
            # moved traffic before this run began is not in the history.
            unseen = moved and self.guard is not None and given is not None and not stopped
            self._live = given
            await self._new_run(given if moved else None, moved_unseen=unseen)
            return
        if self._down:
            # After its run's `stop`, the run wrote nothing more (damage, or records
            # spliced in): the daemon was down, nothing is decided until the next `start`.
            self.report.skipped["record after its run's stop record"] += 1
            return
        if self.guard is None:
            await self._new_run(self._live)
        at = rec.at
        if self._in_gap or (
            self._started and min(self._next_tick, self._pulse) < at - _SAME_MOMENT
        ):
            await self._until(at)  # (otherwise it would return at once: no tick due)
        self.clock.set(at, rec.ts)
        if rec.kind == "stop":
            self._down = True
            self.downs.append((rec.ts, math.inf))
            self._next_tick = self._pulse = math.inf
            return
        if rec.kind == "probe":
            if self._probe(rec):
                await self._tick(at)
        elif rec.kind == "front_door":
            await self._front_door(rec)
        elif rec.kind == "sample":
            self._sample(rec)
        elif rec.kind == "switch":
            await self._switch(rec)
        elif rec.kind == "operator" and rec.doc.get("event") in ("paused", "resumed"):
            # On the monotonic clock, where the daemon took it (the journal's wall time
            # may be on a clock stepped since).
            await self._operator_action(rec.doc, at)

    def _damaged_start(self, doc: dict[str, Any], active: Color | None) -> None:
        """Count what a `start` record says that guardd never writes: a color that is
        none of the two (its run is replayed, the color the sim serves kept), or a
        format this guardd does not know (read as its own)."""
        if active is None and doc.get("active") is not None:
            self.report.skipped["start record naming no color (its run replayed)"] += 1
        if doc.get("format", FORMAT) != FORMAT:
            self.report.skipped[f"start record of a format other than {FORMAT} (read as it)"] += 1

    def _probe(self, rec: Record) -> bool:
        """Feed a probe record to the guard; whether a tick is due at it (run by the caller:
        a coroutine less for each of a day's million records)."""
        guard = self.guard
        assert guard is not None  # noqa: S101
        doc = rec.doc
        color = doc.get("color")  # `color_of`, without its call: once a record
        if color not in COLORS:
            color = None
        result = probe_result(doc)
        if color is None or result is None:
            self.report.skipped[why_no_probe(doc)] += 1
            return False
        schedule = self._schedules[color]
        if not schedule.takes(rec.at):
            self.thinned += 1
            return False
        self.probes_fed += 1
        wake = guard.observe(color, result)
        schedule.fed(rec.at, guard.cadence(color), guard.s.probe_interval)
        if not self._started:
            self._seen.add(color)
            if self._seen >= set(COLORS):
                self._started = True
                return True
            return False
        return wake

    async def _front_door(self, rec: Record) -> None:
        guard = self.guard
        assert guard is not None  # noqa: S101
        # As the probes (`_probe`): a config probing slower than the history was recorded
        # hears the front door only as often as it would have asked it.
        if not self._door.takes(rec.at):
            self.thinned += 1
            return
        self.probes_fed += 1
        self._door.fed(rec.at, guard.s.probe_interval, guard.s.probe_interval)
        # Evidence only while the replay serves the color the live run served: the
        # front door answered for that one.
        if not self._verify or self._live is None or guard.active != self._live:
            return
        ok = rec.doc.get("ok") is True
        error = rec.doc.get("error")
        result = ProbeResult(
            Outcome.OK if ok else Outcome.HTTP_OTHER,
            0.0,
            error if isinstance(error, str) else None,
        )
        if guard.observe_front_door(result) and self._started:
            await self._tick(rec.at)

    def _sample(self, rec: Record) -> None:
        name = rec.doc.get("signal")
        if not isinstance(name, str) or name not in self.signals or name in self.prometheus:
            return
        apply = getattr(self.signals[name], "apply_sample", None)
        color = color_of(rec.doc.get("color"))
        data = rec.doc.get("data")
        if apply is None or color is None or not isinstance(data, dict):
            self.bad_samples[name] += 1
            return
        try:
            apply(color, data, rec.at)
        except ValueError:
            self.bad_samples[name] += 1
        else:
            self.samples[name] += 1
        self._pulse_check()

    async def _switch(self, rec: Record) -> None:
        guard = self.guard
        assert guard is not None  # noqa: S101
        target = color_of(rec.doc.get("to"))
        by = rec.doc.get("by")
        if target is None or not isinstance(by, str | None):
            # guardd records a switch to a color, by someone: damage, not a move.
            self.report.skipped["switch record without a color or by whom"] += 1
            return
        self._live = target
        if by == "guardd" and len(self.live_rollbacks) < _MAX_HELD:
            # (What the journal should hold too: a journal cut short or edited lacks it.)
            source = color_of(rec.doc.get("from"))
            reason = rec.doc.get("reason")
            self.live_rollbacks.append((rec.ts, source, target, str(reason or "")))
        if by == "guardd" or fleet_decision(rec.doc):
            return  # the replayed config decides its own rollbacks
        if by == "external":
            # The daemon adopted it at a tick and recorded it then: the replayed guard
            # adopts it at this moment too (its tick reads the switcher), never a tick
            # later, which would count its windows from a probe round late.
            self.switcher.active = target
        else:
            kind = {"promote": "promote", "rollback_completed": "rollback"}.get(
                str(rec.doc.get("event")), "switch"
            )
            if guard.active == target:
                # The replayed config already serves it (it held, or rolled back where the
                # live one did not): no move, and nothing journaled; said in the notes.
                self.moves_without_effect.append((rec.ts, kind, target))
            else:
                await self._operator_move(rec, target, kind, by)
        if self._started:
            await self._tick(rec.at)

    async def _operator_move(self, rec: Record, target: Color, kind: str, by: str | None) -> None:
        """An operator's move to `target`, made as `guardctl switch` / `promote` /
        `rollback` makes it."""
        guard = self.guard
        assert guard is not None  # noqa: S101
        reason = str(rec.doc.get("reason") or "switched by an operator")
        if guard.own_lock is not None:
            # Live, no lock stood in the way (or it was forced); this config's lock
            # would have: the move is made as recorded, and said to need --force.
            reason += (
                " (the replayed config held its QoS lock then: guardctl would have "
                "refused this move without --force)"
            )
        with contextlib.suppress(OperationRefused):
            await guard.move_traffic(target, kind=kind, by=str(by or "operator"), reason=reason)

    # ---- the external sources ---------------------------------------------------------

    def _access_log(self, name: str, sig: AccessLogSignal) -> Iterator[_Batch]:
        report = self.sources[name]
        if sig.spec.kind != "file":
            report.why = "a syslog socket keeps no history: nothing to replay"
        elif not (files := rotated_files(Path(sig.spec.path), report)):
            report.why = f"no file at {sig.spec.path} (nor rotated beside it)"
        if report.why is not None:
            # Its rules are inconclusive, and the guard says why, as live for a dead source.
            sig.problem = f"cannot be replayed: {report.why}"
            return
        report.replayed = "from its files"
        time_of = msec_reader(sig.spec.field_name("msec"))
        hole_s = _hole_s(sig.spec.window_s)
        lines = without_overlap(
            files, lambda path: read_lines(path, sig._split, report), report, time_of, hole_s
        )
        for end, batch in slots(lines, time_of, report, hole_s):
            yield end, next(self._order), name, batch

    def _log_match(self, name: str, sig: LogMatchSignal) -> Iterator[_Batch]:
        report = self.sources[name]
        per_color: list[Iterator[_Batch]] = []
        for color, path in sig.spec.paths.items():
            files = rotated_files(Path(path), report)
            if not files:
                report.problems.append(f"{color}: no file at {path} (nor rotated beside it)")
                continue
            if not has_timestamps(files[0], report):
                # Only this color is inconclusive: a timed color's lines are replayed.
                why = (
                    f"the lines of {files[0]} carry no timestamp guardd can read, so when they "
                    f"were written is unknown; its rules are inconclusive on {color}"
                )
                report.why = why if report.why is None else f"{report.why}; {why}"
                sig.followers[color].problem = "cannot be replayed: its lines have no timestamp"
                continue
            per_color.append(self._log_batches(name, sig, color, files))
            self._logs_read.append(sig.followers[color])
        if per_color:
            report.replayed = "from its files, by each line's own timestamp"
        yield from heapq.merge(*per_color)

    def _log_batches(
        self, name: str, sig: LogMatchSignal, color: str, files: list[Path]
    ) -> Iterator[_Batch]:
        report = self.sources[name]
        split = sig.followers[color].split
        hole_s = _hole_s(sig.spec.window_s)
        lines = without_overlap(
            files, lambda path: read_lines(path, split, report), report, line_time, hole_s
        )
        for end, batch in slots(lines, line_time, report, hole_s):
            yield end, next(self._order), name, (color, batch)

    def _prometheus_points(self, name: str) -> Iterator[_Batch]:
        for wall, color, data in self.prometheus.get(name, []):
            yield wall, next(self._order), name, (color, data)

    def _operator_actions(self) -> Iterator[_Batch]:
        for wall, event in sorted(self.operator, key=lambda pair: pair[0]):
            yield wall, next(self._order), _OPERATOR, event

    def _externals(self) -> Iterator[_Batch]:
        streams: list[Iterator[_Batch]] = [self._operator_actions()]
        for name, sig in self.signals.items():
            if isinstance(sig, AccessLogSignal):
                self.sources[name] = SourceReport("access_log")
                streams.append(self._access_log(name, sig))
            elif isinstance(sig, LogMatchSignal):
                self.sources[name] = SourceReport("log_match")
                streams.append(self._log_match(name, sig))
            elif name in self.prometheus:
                streams.append(self._prometheus_points(name))
            else:
                kind = str(getattr(self.settings.config.signals[name], "kind", "samples"))
                self.sources[name] = SourceReport(kind, replayed="from recorded samples")
        return heapq.merge(*streams)

    async def _external(self, batch: _Batch, upto: float) -> None:
        """Hand one batch to its signal at its own time (never past monotonic `upto`)."""
        wall, _, name, payload = batch
        at = min(max(self.clock.to_mono(wall), self.clock.monotonic()), upto)
        await self._until(at)
        self._quiet = 0
        self._only_probed = False
        self.clock.advance(at)
        if name == _OPERATOR:
            if not self._run_records_operator:  # (else from its `operator` record)
                await self._operator_action(payload, at)
            return
        sig = self.signals[name]
        if isinstance(sig, AccessLogSignal | LogMatchSignal):
            report = self.sources[name]
            _spans(report, wall)  # (the lines replayed: what the rules saw)
            if (now := self.clock.wall()) - wall > AHEAD_S:
                # Found after later lines: the rules judged their time without them.
                n = len(payload[1] if isinstance(payload, tuple) else payload)
                report.fell_behind(wall - PULSE_S, wall, now, n)
        if isinstance(sig, AccessLogSignal):
            sig.ingest(payload)
        elif isinstance(sig, LogMatchSignal):
            color, lines = payload
            sig.ingest(color, lines)  # (read at every tick: `_logs_read`)
        else:
            color, data = payload
            sig.apply_sample(color, data, at)  # type: ignore[attr-defined]
        self._pulse_check()

    async def _operator_action(self, event: dict[str, Any], at: float) -> None:
        """An operator's `pause` or `resume` at `at`, as `guardctl` makes it (a resume
        ends a hold and refills the rollback budget), then the tick it wakes."""
        guard = self.guard
        assert guard is not None  # noqa: S101
        by = str(event.get("by") or "operator")
        reason = event.get("reason") if isinstance(event.get("reason"), str) else None
        if event.get("event") == "paused":
            guard.pause(reason, by=by)
        else:
            guard.resume(reason, by=by)
        self.operator_actions += 1
        if self._started:
            # guardctl wakes the decision loop: a hold resumed while its color still
            # fails is a hold again at once, as live.
            await self._tick(at)

    def _outside(self, batch: _Batch, *, at_end: bool = False) -> None:
        """Count a batch not replayed: outside the history (before it, after it, while the
        daemon was down), or, left `at_end` of the history though stamped within it, out
        of order: a batch is held only behind one stamped below what its source fed (a
        log concatenated newest first, lines copied), which the history ended waiting for
        (as written, they came after later lines)."""
        wall, _, name, payload = batch
        report = self.sources.get(name)
        if report is None:
            return
        n = len(payload[1] if isinstance(payload, tuple) else payload)
        first = self.first_ts
        if at_end and first is not None and first <= wall <= self.clock.wall():
            report.disordered += n
            report.fell_behind(wall - PULSE_S, wall, math.inf, n)
            report.fill(wall - PULSE_S, wall)
        else:
            report.outside += n
            if first is None or wall < first:
                last = report.before_history
                report.before_history = wall if last is None else max(last, wall)

    # ---- the run ----------------------------------------------------------------------

    async def run(self) -> None:
        """Replay the whole history (raises `HistoryUnreadable` when there is none)."""
        with scratch_folder() as lock_dir, _fewer_collections():
            self._lock_file = lock_dir / "qos.lock"
            await self._run()

    async def _run(self) -> None:
        records = read_history(self.directory, self.report, guard=self.history_of, until=self.until)
        externals = self._externals()
        pending = next(externals, None)
        held: deque[Record] = deque()
        gap_s = self._gap_s
        for rec in records:
            at, ts, kind, _ = rec
            last_at = self._last_at
            if (
                kind == "probe"
                and self.fast_probes
                and self.guard is not None
                and not self._down
                and not held
                and last_at is not None
                and at - last_at <= gap_s
                # (Not at a wall clock stepped back: see `_step`.)
                and (pending is None or pending[0] > max(ts, self.clock.wall_at(at)))
                and not (self._started and min(self._next_tick, self._pulse) < at - _SAME_MOMENT)
            ):
                # Nearly every record of a day: a probe round in a running guard, with no
                # gap before it, no external batch and no tick due before it. What `_step`
                # and `_record` would do for it, without their two coroutines and their
                # checks of what cannot be (the tick itself still goes through `_counted`
                # and `_take`, as any other).
                self._place(ts)
                self._last_at = at
                self._quiet = 0
                self.clock.set(at, ts)
                if self._probe(rec) and not self._counted(at):
                    await self._take(at)
                continue
            if self.guard is None and self._live is None:
                # History that begins mid-run: which color was served is told by the first
                # `start` or `context` record, or the first switch (its `from`); the records
                # before it wait for it (the newest `_MAX_HELD`), and are never replayed on
                # a guess (fail closed). Only a switch's `from` says the color of the records
                # before it; a `start` says its own run's, a `context` the color as of its
                # time (a switch before it may be among what was lost): the records held
                # until then are left out.
                if rec.kind == "switch":
                    self._live = color_of(rec.doc.get("from"))
                    if self._live is not None and held:
                        self.midrun = (held[0].ts, rec.ts)
                elif rec.kind in ("start", "context"):
                    while held:
                        self._headless(held.popleft())
                if self._live is None and rec.kind not in ("start", "context"):
                    if len(held) == _MAX_HELD:
                        self._headless(held.popleft())
                    held.append(rec)
                    continue
            # (Placed once stepped: a `start` record is its own run's.)
            while held:
                old = held.popleft()
                pending = await self._step(old, pending, externals)
                self._place(old.ts)
            pending = await self._step(rec, pending, externals)
            self._place(rec.ts)
        for old in held:
            self._headless(old)
        if self.midrun is not None:
            first, told = self.midrun
            self.report.problems.append(
                f"the history begins mid-run, without a start record: the color served from "
                f"{rfc3339(first)} was taken from the first switch's `from`, at {rfc3339(told)}"
            )
        if self.headless:
            n, first, last = self.headless
            self.report.problems.append(
                f"the history begins mid-run, without a start record: which color was served "
                f"is unknown from {rfc3339(first)} to {rfc3339(last)}; the {n} record(s) of that "
                "time are not replayed"
            )
        pending = await self._last_ticks(pending, externals)
        self._run_ends()
        while pending is not None:
            self._outside(pending, at_end=True)
            pending = next(externals, None)

    async def _last_ticks(
        self, pending: _Batch | None, externals: Iterator[_Batch]
    ) -> _Batch | None:
        """The ticks after the last record read; the batch of `externals` not fed yet."""
        if self.guard is None or not self._started:
            return pending
        end = self.clock.monotonic() + 2 * _SAME_MOMENT
        beyond = self.report.beyond_until
        if self.until is not None and beyond is not None:
            # The history goes on past `--to`: the daemon ran up to it, so the ticks (and
            # the log lines) between the last record before it and it are the period's
            # too, not only those up to that record; never past the next record, whose
            # time the daemon's own clock gives (a wall clock stepped forward across `--to`
            # skipped the time between, which the daemon never ticked through).
            end = max(end, min(self.clock.to_mono(self.until) + 2 * _SAME_MOMENT, beyond))
            while pending is not None and pending[0] <= self.until:
                await self._external(pending, end)
                pending = next(externals, None)
        await self._until(end)
        return pending

    def _run_ends(self) -> None:
        """The current run (if any) ends: counted in `runs` if it had a record in the
        period."""
        self.runs += self._in_period
        self._in_period = False

    def _headless(self, rec: Record) -> None:
        """Leave out a record of a history that begins mid-run, taken before anything
        said which color was served (counted in `headless` and the report's skipped)."""
        self.report.skipped["record before the served color was known"] += 1
        self.report.records -= 1
        n, first, last = self.headless or (0, rec.ts, rec.ts)
        self.headless = (n + 1, min(first, rec.ts), max(last, rec.ts))

    def _place(self, ts: float) -> None:
        """Count a record of wall time `ts` replayed: in the warm-up before `since`, or in
        the period, whose earliest and latest times it may move (the latest record is not
        the latest time when the wall clock was stepped back meanwhile)."""
        since = self.since
        if since is not None and ts < since:
            last = self.last_ts
            if self.first_ts is not None and last is not None and last - ts > CLOCK_STEP_S:
                # Back before `--from` after the period began: a damaged record, or a wall
                # clock stepped back (records on and on).
                self._back.back(ts, since, last)
            self.warmup_records += 1
        else:
            self._back.clear()
            self._in_period = True
            first = self.first_ts
            if first is None or ts < first:
                self.first_ts = ts
        last = self.last_ts
        if last is None or ts > last:
            self.last_ts = ts
        if self.earliest_ts is None or ts < self.earliest_ts:
            self.earliest_ts = ts
        if not self._down and self.guard is not None:
            lived = self.lived
            if lived and lived[-1][0] <= ts <= lived[-1][1] + self._gap_s:
                lived[-1][1] = max(lived[-1][1], ts)
            elif len(lived) < _MAX_LIVED:  # (beyond: fewer times known lived, fail closed)
                lived.append([ts, ts])

    def lived_at(self, ts: float) -> bool:
        """Whether a running daemon's records cover wall time `ts`."""
        return any(lo <= ts <= hi for lo, hi in self.lived)

    async def _step(
        self, rec: Record, pending: _Batch | None, externals: Iterator[_Batch]
    ) -> _Batch | None:
        # A run's `start` after such a stretch too (its last records lost: a crash, a
        # corrupt member), unless the run before it said it stopped.
        if (
            self._last_at is not None
            and not (rec.kind == "start" and self._down)
            and rec.at - self._last_at > self._gap_s
        ):
            self.gaps.append((rec.ts, rec.at - self._last_at))
            self._in_gap = True
            # After it, no tick until each color has a probe again, as at a run's start: the
            # colors probed after the other would otherwise look stale (no recent probe),
            # which is reading the lost records as probes that stopped.
            self._started = False
            self._seen = set()
        self._last_at = rec.at
        # A run that ended without its `stop` (killed, crashed) was down from its last
        # record to this `start`: no more decided then than after a clean stop (how long
        # it lived past its last record is unknown; fail closed).
        died = rec.kind == "start" and not self._down and self.guard is not None
        last_wall = self.clock.wall()
        # The sources' batches written before this record go first, at their own time.
        # A host's wall clock stepped back steps the records and the log lines alike, at
        # one moment: a batch more than `AHEAD_S` below the last one fed from its source is
        # after that step, due by the stepped clock once the records are on it too (until
        # then, as far as the records tell, at the old clock's latest time); at the record
        # that steps, the batches before the source's step are due by the old clock's time
        # (else they and every batch after them would wait as long as the step).
        old_clock = self.clock.wall_at(rec.at) if self.guard is not None else rec.ts
        stepped = old_clock - rec.ts > AHEAD_S
        after_step: set[str] = set()
        while pending is not None:
            wall, _, name, _ = pending
            fed = self._fed.get(name, wall)
            if wall < fed - AHEAD_S:
                # Due once the records step too (at this record, or stepped already: the
                # records below what the source fed), or pass it (lines written late).
                if not (stepped or rec.ts > fed or rec.ts < fed - AHEAD_S):
                    break
                after_step.add(name)
            # (By the old clock, a slot begun before the step: its lines were written
            # before it, though the slot ends after the old clock's last time.)
            old = stepped and wall - PULSE_S <= old_clock and name not in after_step
            if not (wall <= rec.ts or old):
                break
            self._fed[name] = wall
            earliest = rec.ts if self.earliest_ts is None else min(self.earliest_ts, rec.ts)
            if (
                self.guard is None
                or self._down
                or (died and pending[0] > last_wall)
                # Stamped before any record (and not on a clock stepped back to there,
                # which the records would show): before the history, not "late".
                or wall < earliest - AHEAD_S
            ):
                # (Stopped: the daemon started again reads its logs from their end.)
                self._outside(pending)
            elif stepped and name in after_step:
                # Written on the stepped clock, which the record stepping it is on: read
                # by that clock (else its requests look as old as the step, `late`).
                with self.clock.stepped(rec.at, rec.ts):
                    await self._external(pending, rec.at)
            else:
                await self._external(pending, rec.at)
            pending = next(externals, None)
        await self._record(rec)
        self._in_gap = False
        return pending
