"""Test helpers for guardd and for people who test their guardd set-up.

Everything here is a real guardd part or a stand-in that keeps a real part's contract,
so that a test drives the guard's own code paths without nginx, sockets or sleeps:

- `ManualClock`: both clocks of `guardd.clock.Clock`, moved only by `advance`.
- `MemorySwitcher`: a `guardd.switchers.Switcher` held in memory. It passes the same
  steps as a real switcher (nginx's by default), records each one, and can be told to
  fail a step or to crash after one.
- `MockProber`: a real `guardd.probes.http.HttpProber` whose transport is an
  `httpx.MockTransport`; the test sets the answer (`answer(status=503, body=...)`).
- `FedSignal`: a signal whose `Reading`s the test feeds by hand.
- `build_guard`: a `guardd.guard.Guard` assembled from these on real files (journal,
  state.json, QoS lock file) under one directory, returned as a `GuardRig`.

Time only moves when the test moves it: a probe round advances the `ManualClock` by the
probe interval, so minutes of guard time take milliseconds. The module imports neither
pytest nor anything of the daemon's that would import it back; guardd never imports it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import anyio
import httpx
from anyio.abc import TaskStatus
from structlog.testing import CapturingLogger

from guardd.clock import Clock
from guardd.core.machine import Decision, GuardMachine
from guardd.core.policy import PolicySpec
from guardd.core.signals import KIND_STATS, Reading
from guardd.exceptions import CommandFailed, SwitchError, SwitchRejected
from guardd.guard import Guard, GuardSettings
from guardd.journal import Journal
from guardd.metrics import GuardMetrics
from guardd.probes.http import HttpProber, ProbeResult, ProbeSpec, Quorum
from guardd.statefile import StateFile
from guardd.switchers import (
    COLORS,
    COMMAND_STEPS,
    NGINX_STEPS,
    STATE_FILE_STEPS,
    STEP_LINK_WRITTEN,
    STEP_RAN,
    STEP_RELOADED,
    STEP_RENAMED,
    STEP_TESTED,
    STEP_WRITTEN,
    Color,
    StepHook,
    is_color,
    switch_error_for,
)

__all__ = [
    "DEFAULT_POLICY",
    "FedSignal",
    "GuardRig",
    "Handler",
    "ManualClock",
    "MemorySwitcher",
    "MockProber",
    "SimulatedCrash",
    "SwitchOp",
    "SwitchStep",
    "SwitchTarget",
    "build_guard",
    "feed_round",
    "guard_settings",
]


# ---- time ------------------------------------------------------------------------------


class ManualClock:
    """A `guardd.clock.Clock` that moves only when told to.

    `mono` (the monotonic clock, seconds) and `wall_s` (seconds since the epoch) start at
    arbitrary but realistic values; `advance` moves both by the same amount, `step_wall`
    moves the wall clock alone, as an NTP step or a changed time zone file would.
    """

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.mono = monotonic
        self.wall_s = wall

    def monotonic(self) -> float:
        """The monotonic time, in seconds."""
        return self.mono

    def wall(self) -> float:
        """The wall-clock time, in seconds since the epoch."""
        return self.wall_s

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by *seconds*; raises `ValueError` if negative."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock never goes back (advance({seconds!r}))")
        self.mono += seconds
        self.wall_s += seconds

    def step_wall(self, seconds: float) -> None:
        """Move the wall clock alone by *seconds* (either way); the monotonic one stays."""
        self.wall_s += seconds


# ---- switching -------------------------------------------------------------------------

# The step at which each kind of switcher changes what its target names.
_MOVES: Final = frozenset({STEP_RENAMED, STEP_WRITTEN, STEP_RAN})
_KNOWN_STEPS: Final = frozenset({STEP_LINK_WRITTEN, *_MOVES, STEP_TESTED, STEP_RELOADED})
# Only named in the message of a `TimeoutError` planted with `fail`: nothing here waits.
_TIMEOUT: Final = 5.0

SwitchOp = Literal["switch", "restore", "reapply", "recover", "undo"]
"""The operations a `MemorySwitcher` records steps for; ``undo`` puts a failed one back."""


class SimulatedCrash(BaseException):
    """Raised by `MemorySwitcher.crash_after`: guardd dies at that step.

    A `BaseException`, so that nothing in guardd catches it: whatever the journal, the
    state file and the switch target hold at that moment is what a restart finds.
    """


@dataclass(slots=True)
class SwitchTarget:
    """What a switcher keeps on disk, which survives a restart.

    `named` is the color the switch target names (nginx: the link; None: neither);
    `running` the color the service runs (what the last reload loaded). While a switch
    is under way, or after a crash cut one short, `switching` is true, `before` holds
    the color named before it and `to` the color it goes to.
    """

    named: Color | None
    running: Color | None
    switching: bool = False
    before: Color | None = None
    to: Color | None = None

    def to_json(self) -> dict[str, Any]:
        """The target as a JSON object."""
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, text: str) -> SwitchTarget:
        """Read `to_json`'s output, or a bare color name (then running is that color too).

        Anything else names neither color, as a garbled target does for a real switcher.
        """
        text = text.strip()
        try:
            doc = json.loads(text) if text.startswith("{") else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            color = text if is_color(text) else None
            return cls(color, color)

        def pick(key: str) -> Color | None:
            value = doc.get(key)
            return value if is_color(value) else None

        return cls(
            pick("named"), pick("running"), bool(doc.get("switching")), pick("before"), pick("to")
        )


@dataclass(frozen=True, slots=True)
class SwitchStep:
    """One step a `MemorySwitcher` went through.

    `op` is the operation (``switch``, ``restore``, ``reapply``, ``recover``, or ``undo``
    for what a failed switch or restore puts back); `step` a step name of
    `guardd.switchers` (``link_written``, ``renamed``, ``tested``, ``reloaded``,
    ``written``, ``ran``); `named` the color the target names once the step is done.
    """

    op: SwitchOp
    step: str
    named: Color | None


@dataclass(slots=True)
class _Failure:
    step: str
    op: SwitchOp | None
    error: BaseException | None
    times: int


@dataclass(slots=True)
class _Progress:
    moved: bool = False
    reload_attempted: bool = False


class MemorySwitcher:
    """A `guardd.switchers.Switcher` whose switch target is held in memory.

    It goes through *steps* (`guardd.switchers.NGINX_STEPS` by default; also
    `STATE_FILE_STEPS` or `COMMAND_STEPS`) as the real switcher of that kind does, appends
    a `SwitchStep` to `steps_taken` after each and awaits *on_step* with the step's name,
    as the daemon's fault points do. Like the real ones:

    - `switch` and `restore` mark the switch in flight (`SwitchTarget.switching`), move
      the target at ``renamed``/``written``/``ran``, have it tested at ``tested`` (a
      color in `rejected` fails as `SwitchRejected`) and reloaded at ``reloaded``; on a
      failure they put the previous target back (reloading if a reload was tried) and
      raise a `SwitchError` whose `step` is ``switch``, ``test`` or ``reload``;
    - `read_active` names the color named before a switch in flight, until it commits;
    - `reapply` tests and reloads what the target names, changing nothing;
    - `recover` settles a switch a crash cut short: nginx's kind (``tested`` among the
      steps) tests the target, puts the previous one back if it is rejected, and
      reloads; a state file's reloads; a command's runs the switch again.

    Without a reload step the service follows the target as soon as it moves. Given
    *path*, the `SwitchTarget` lives in that file instead, as JSON: read at every call,
    written after every change. A copy of a directory is then a copy of the target too,
    and writing a bare color name into the file (e.g. ``blue``) is an external switch.
    """

    def __init__(
        self,
        active: Color | None = "green",
        *,
        steps: Sequence[str] = NGINX_STEPS,
        on_step: StepHook | None = None,
        target: SwitchTarget | None = None,
        path: Path | None = None,
    ) -> None:
        unknown = [s for s in steps if s not in _KNOWN_STEPS]
        moves = [s for s in steps if s in _MOVES]
        if unknown or len(moves) != 1:
            raise ValueError(
                f"steps must be the steps of one kind of switcher (e.g. NGINX_STEPS), "
                f"with exactly one of {sorted(_MOVES)}; got {list(steps)}"
            )
        self.steps = tuple(steps)
        self.on_step = on_step
        self.path = path
        if target is None and path is not None and path.exists():
            target = SwitchTarget.parse(path.read_text())
        self._target = target if target is not None else SwitchTarget(active, active)
        self.rejected: set[Color] = set()
        self.steps_taken: list[SwitchStep] = []
        self.reapplied = 0
        self._failures: list[_Failure] = []
        self._crash: tuple[str, SwitchOp | None] | None = None
        self._save()

    @property
    def target(self) -> SwitchTarget:
        """The switch target as it stands (a copy; change it through the switcher)."""
        self._load()
        return dataclasses.replace(self._target)

    def fail(
        self,
        step: str,
        *,
        op: SwitchOp | None = None,
        error: BaseException | None = None,
        times: int = 1,
    ) -> None:
        """Make *step* fail the next *times* times it is reached (by *op* only, if given).

        The step does not happen. *error* is raised as a real switcher would raise it
        (a `TimeoutError` becomes `CommandFailed`, an `OSError` a `SwitchError`); by
        default a ``tested`` step is rejected, a ``reloaded`` one fails as a command,
        any other as a `SwitchError`. A failure with ``op="undo"`` makes the undo of a
        failed switch fail at that step: the error then carries a note, as for real.
        """
        if step not in self.steps:
            raise ValueError(f"{step!r} is not one of this switcher's steps {self.steps}")
        self._failures.append(_Failure(step, op, error, times))

    def crash_after(self, step: str, *, op: SwitchOp | None = None) -> None:
        """Raise `SimulatedCrash` right after *step* is done next (by *op* only, if given)."""
        if step not in self.steps:
            raise ValueError(f"{step!r} is not one of this switcher's steps {self.steps}")
        self._crash = (step, op)

    def restarted(self) -> MemorySwitcher:
        """A new switcher on this one's target, as a restarted daemon builds one.

        What a process keeps in memory (planned failures, a planned crash, the steps
        taken) is not carried over; the target and the colors the test command rejects are.
        """
        twin = MemorySwitcher(
            steps=self.steps, on_step=self.on_step, target=self.target, path=self.path
        )
        twin.rejected = set(self.rejected)
        return twin

    # ---- the Switcher protocol -------------------------------------------------------------

    async def read_active(self) -> Color | None:
        """The color the target names; while a switch is in flight, the one named before."""
        self._load()
        t = self._target
        return t.before if t.switching else t.named

    async def switch(self, to: Color) -> None:
        """Move the target to *to* step by step; on failure put it back and raise."""
        self._load()
        if self._target.switching:
            await self.recover()  # as nginx's does: settle a crash nobody recovered from
        await self._move(to, "switch")

    async def restore(self, previous: Color) -> None:
        """Put *previous* back in force with the same steps as a switch."""
        self._load()
        if self._target.switching:
            await self.recover()
        await self._move(previous, "restore")

    async def reapply(self) -> None:
        """Test what the target names and reload the service onto it."""
        self._load()
        if self._target.switching:
            await self.recover()
        current = "test"
        try:
            if STEP_TESTED in self.steps:
                await self._test("reapply")
            if STEP_RELOADED in self.steps:
                current = "reload"
                self._check("reapply", STEP_RELOADED)
                self._target.running = self._target.named
                await self._done("reapply", STEP_RELOADED)
        except Exception as exc:
            error = switch_error_for(exc, "re-applying the switch target", _TIMEOUT, current)
            if error is exc:
                raise
            raise error from exc
        self.reapplied += 1

    async def recover(self) -> None:
        """Finish or undo a switch a crash interrupted (see the class); else test only."""
        self._load()
        t = self._target
        if STEP_RAN in self.steps:
            if t.switching and t.to is not None:
                to, t.switching = t.to, False
                t.named = t.before
                await self._move(to, "recover")
            return
        if STEP_TESTED in self.steps:
            rejected = t.named in self.rejected
            if rejected and t.switching and t.before != t.named:
                t.named = t.before
                self._save()
                self.steps_taken.append(SwitchStep("recover", self._move_step, t.named))
            try:
                await self._test("recover")
            except SwitchRejected:
                # Neither target is accepted: the record has done its job, as with nginx.
                t.switching, t.before, t.to = False, None, None
                self._save()
                raise
        if t.switching and STEP_RELOADED in self.steps:
            self._check("recover", STEP_RELOADED)
            t.running = t.named
            await self._done("recover", STEP_RELOADED)
        elif STEP_RELOADED not in self.steps:
            t.running = t.named
        t.switching, t.before, t.to = False, None, None
        self._save()

    # ---- the steps -----------------------------------------------------------------------

    @property
    def _move_step(self) -> str:
        return next(s for s in self.steps if s in _MOVES)

    async def _move(self, to: Color, op: SwitchOp) -> None:
        t = self._target
        before = t.named
        t.switching, t.before, t.to = True, before, to
        self._save()
        progress = _Progress()
        current = "switch"
        try:
            for step in self.steps:
                if step == STEP_TESTED:
                    current = "test"
                    await self._test(op)
                    continue
                if step == STEP_RELOADED:
                    current = "reload"
                    progress.reload_attempted = True
                self._check(op, step)
                if step in _MOVES:
                    t.named = to
                    progress.moved = True
                    if STEP_RELOADED not in self.steps:
                        t.running = to
                elif step == STEP_RELOADED:
                    t.running = t.named
                await self._done(op, step)
        except SimulatedCrash:
            raise  # a crash undoes nothing
        except Exception as exc:
            problem = await self._undo(before, progress)
            error = switch_error_for(exc, f"{op} to {to}", _TIMEOUT, current)
            if problem is not None:
                error.add_note(problem)
            if error is exc:
                raise
            raise error from exc
        t.switching, t.before, t.to = False, None, None
        self._save()

    async def _undo(self, before: Color | None, progress: _Progress) -> str | None:
        """Put the target named before back; why it could not be, or None."""
        t = self._target
        try:
            if progress.moved:
                self._check("undo", self._move_step)
                t.named = before
                if STEP_RELOADED not in self.steps:
                    t.running = before
                self._save()
                self.steps_taken.append(SwitchStep("undo", self._move_step, t.named))
            if progress.reload_attempted:
                self._check("undo", STEP_RELOADED)
                t.running = t.named
                self.steps_taken.append(SwitchStep("undo", STEP_RELOADED, t.named))
        except Exception as exc:  # noqa: BLE001 - the undo's failure becomes a note
            # The switch stays marked in flight, so that `recover` settles it, as for real.
            self._save()
            return f"the undo failed: {exc}; recover() will finish it"
        t.switching, t.before, t.to = False, None, None
        self._save()
        return None

    async def _test(self, op: SwitchOp) -> None:
        """The ``tested`` step: the hook hears of it whatever the verdict, as with nginx."""
        self._check(op, STEP_TESTED)
        named = self._target.named
        await self._done(op, STEP_TESTED)
        if named in self.rejected:
            raise SwitchRejected(f"the test command rejected the target naming {named}")

    def _check(self, op: SwitchOp, step: str) -> None:
        """Raise the failure planned for *step* under *op*, if any."""
        for planned in self._failures:
            if planned.step == step and planned.op in (None, op) and planned.times > 0:
                planned.times -= 1
                raise planned.error or _default_error(step)
        problem = self._failure_for(op, step)
        if problem is not None:
            raise problem

    def _failure_for(self, op: SwitchOp, step: str) -> BaseException | None:
        """A hook for subclasses: an error to raise at *step* of *op*, or None."""
        del op, step
        return None

    async def _done(self, op: SwitchOp, step: str) -> None:
        self._save()
        self.steps_taken.append(SwitchStep(op, step, self._target.named))
        if self.on_step is not None:
            await self.on_step(step)
        crash = self._crash
        if crash is not None and crash[0] == step and crash[1] in (None, op):
            self._crash = None
            raise SimulatedCrash(f"crashed after {step} ({op})")

    def _load(self) -> None:
        if self.path is not None and self.path.exists():
            self._target = SwitchTarget.parse(self.path.read_text())

    def _save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self._target.to_json()))


def _default_error(step: str) -> BaseException:
    if step == STEP_TESTED:
        return SwitchRejected("the test command failed: [emerg] planted by the test")
    if step == STEP_RELOADED:
        return CommandFailed("reload failed: exit 1 (planted by the test)")
    return SwitchError(f"{step} failed (planted by the test)")


# ---- probing ---------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
"""What answers a `MockProber`'s requests: a request in, a response (or a raise) out."""


class MockProber(HttpProber):
    """A real `HttpProber` talking to an `httpx.MockTransport` instead of the network.

    Every request goes through the prober's own code (status rules, bounded bodies,
    `expect_json`, quorum, error wording); only the transport is in memory. It answers
    ``200 ok`` until told otherwise; `requests` keeps each request it was sent.
    """

    def __init__(
        self,
        urls: Sequence[str] = ("http://upstream.test/health",),
        spec: ProbeSpec | None = None,
        *,
        quorum: Quorum = "all",
    ) -> None:
        self.requests: list[httpx.Request] = []
        self._handler: Handler = _fixed(httpx.Response(200, content=b"ok"))
        super().__init__(
            urls, spec or ProbeSpec(), quorum=quorum, transport=httpx.MockTransport(self._handle)
        )

    def answer(
        self,
        status: int = 200,
        body: bytes | str = b"",
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer every request from now on with *status* and *body* (or *json*, encoded)."""
        if json is not None:
            response = httpx.Response(status, json=json, headers=headers)
        else:
            content = body.encode() if isinstance(body, str) else body
            response = httpx.Response(status, content=content, headers=headers)
        self._handler = _fixed(response)

    def refuse(self) -> None:
        """Refuse every connection from now on (``connection refused``, `connect_error`)."""

        def refused(request: httpx.Request) -> httpx.Response:
            cause = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request) from cause

        self._handler = refused

    def time_out(self) -> None:
        """Let every request time out from now on (outcome `timeout`), without waiting."""

        def late(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("timed out", request=request)

        self._handler = late

    def handle_with(self, handler: Handler) -> None:
        """Answer with *handler* from now on: per URL, in sequence, or raising httpx errors."""
        self._handler = handler

    def forward_to(
        self, upstreams: Mapping[Color, MockProber], serving: Callable[[], Color | None]
    ) -> None:
        """Answer as the upstream `serving()` names would, as nginx's front door does.

        Each request is answered by the handler of ``upstreams[serving()]`` at that
        moment (it is recorded here, not there); ``502`` when `serving()` is None.
        """

        async def forward(request: httpx.Request) -> httpx.Response:
            color = serving()
            if color is None:
                return httpx.Response(502, content=b"no upstream")
            return await upstreams[color]._respond(request)

        self._handler = forward

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self._respond(request)

    async def _respond(self, request: httpx.Request) -> httpx.Response:
        response = self._handler(request)
        if not isinstance(response, httpx.Response):
            response = await response
        if response.is_stream_consumed:
            # httpx reads a body given as bytes at once; the prober streams every body
            # (bounded), so it gets one to stream, as from the network.
            response = httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_Body(response.content),
                request=request,
            )
        return response


class _Body(httpx.AsyncByteStream):
    """A body sent in chunks, as a socket would deliver it."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for at in range(0, len(self._data), 16384):
            yield self._data[at : at + 16384]


def _fixed(template: httpx.Response) -> Handler:
    status, headers, content = template.status_code, template.headers, template.content

    def handler(request: httpx.Request) -> httpx.Response:
        # A fresh response each time: a response's stream can be read only once.
        return httpx.Response(status, headers=headers, stream=_Body(content), request=request)

    return handler


# ---- signals ---------------------------------------------------------------------------


class FedSignal:
    """A signal whose readings the test sets, per color and moment.

    `feed` stores a `Reading` for a color as of monotonic time *now* (its `last_at`);
    `reading(color, now)` returns the newest one fed at or before *now*, or None when
    none was: a signal that has said nothing cannot vouch for a color. When *kind* is
    one of `guardd.core.signals.KIND_STATS`, `feed` refuses statistics that kind does
    not yield (`ValueError`), so that a typo fails the test rather than passing it.
    """

    def __init__(
        self, name: str = "fed", *, kind: str = "access_log", window_s: float = 60.0
    ) -> None:
        self.name = name
        self.kind = kind
        self.window_s = window_s
        #: Set it to make the guard see a signal that cannot read its source.
        self.problem: str | None = None
        self._fed: dict[str, list[tuple[float, Reading]]] = {c: [] for c in COLORS}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """What the daemon runs: nothing to follow; readings come from `feed`."""
        task_status.started()
        await anyio.sleep_forever()

    def status(self) -> dict[str, Any]:
        """What `status --json` shows of the signal."""
        return {"kind": self.kind, "state": "fed by hand", "problem": self.problem}

    def feed(
        self,
        color: Color,
        *,
        samples: int,
        stats: Mapping[str, float | None],
        now: float,
        detail: Mapping[str, Any] | None = None,
        window_s: float | None = None,
    ) -> Reading:
        """Set what the signal says of *color* from monotonic *now* (s) on; returns it.

        *samples* counts the observations in the window; *stats* maps statistic names
        to values (ratios 0..1, latencies in ms, rates per second) or None.
        """
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}")
        allowed = KIND_STATS.get(self.kind)
        if allowed is not None and not set(stats) <= allowed:
            raise ValueError(
                f"a {self.kind} signal yields no {sorted(set(stats) - allowed)}; "
                f"it yields {sorted(allowed)}"
            )
        reading = Reading(
            samples=samples,
            window_s=self.window_s if window_s is None else window_s,
            stats=dict(stats),
            last_at=now,
            detail=dict(detail or {}),
        )
        fed = self._fed[color]
        fed.append((now, reading))
        fed.sort(key=lambda pair: pair[0])
        return reading

    def clear(self, color: Color | None = None) -> None:
        """Forget what was fed for *color* (every color when None)."""
        for c in COLORS if color is None else (color,):
            self._fed[c].clear()

    def reading(self, color: str, now: float) -> Reading | None:
        """The newest reading of *color* fed at or before monotonic *now*, or None."""
        latest = None
        for at, reading in self._fed.get(color, []):
            if at > now:
                break
            latest = reading
        return latest


# ---- a whole guard ---------------------------------------------------------------------

DEFAULT_POLICY: Final = PolicySpec(
    rollback_to="previous",
    consecutive_failures=3,
    window=30.0,
    min_samples=3,
    p1_sustain=5.0,
    max_rollbacks=3,
    budget_window=3600.0,
)
"""The policy `build_guard` uses unless given one: short windows, for quick tests."""


def guard_settings(
    root: Path,
    policy: PolicySpec = DEFAULT_POLICY,
    *,
    instance: str = "test",
    interval: float = 1.0,
    switch_timeout: float = 5.0,
    verify_url: str | None = None,
    verify_successes: int = 1,
    qos_window: float = 10.0,
    qos_max_error_ratio: float = 0.01,
    qos_min_health_ratio: float = 0.99,
) -> GuardSettings:
    """`GuardSettings` for a guard whose files live under *root* (seconds, ratios 0..1).

    The probe interval and the confirm interval are both *interval*; the QoS lock file
    is ``root/run/<instance>.qos.lock``.
    """
    return GuardSettings(
        instance=instance,
        policy=policy,
        probe_interval=interval,
        confirm_interval=interval,
        switch_timeout=switch_timeout,
        verify_url=verify_url,
        verify_successes=verify_successes,
        lock_file=root / "run" / f"{instance}.qos.lock",
        qos_window=qos_window,
        qos_max_error_ratio=qos_max_error_ratio,
        qos_min_health_ratio=qos_min_health_ratio,
    )


async def feed_round(
    guard: Guard,
    clock: ManualClock,
    blue: ProbeResult,
    green: ProbeResult,
    front: ProbeResult | None = None,
) -> Decision:
    """One probe round given as results, then a decision tick, as the daemon runs them.

    Advances *clock* by the probe interval, feeds each color's result (and the front
    door's, when given) to the guard, and ticks under the guard's lock.
    """
    clock.advance(guard.s.probe_interval)
    guard.observe("blue", blue)
    guard.observe("green", green)
    if front is not None:
        guard.observe_front_door(front)
    async with guard.lock:
        return await guard.tick()


@dataclass(slots=True)
class GuardRig:
    """A `Guard` with its stand-ins, as `build_guard` assembles it.

    `probers` are the colors' upstreams and `front_door` the `switch.verify_url` prober
    (None when the guard has no front door); set their answers, then `probe_round`.
    `log` is the guard's logger (structlog's `CapturingLogger` unless one was given): its
    `calls` list each `CapturedCall(method_name, args, kwargs)`, e.g. ``("warning",
    ("hold",), {...})``.
    """

    guard: Guard
    clock: ManualClock
    switcher: MemorySwitcher
    probers: dict[Color, MockProber]
    front_door: MockProber | None
    log: Any
    root: Path
    rebuild: Callable[[MemorySwitcher], GuardRig] = field(repr=False)
    #: The guard's signals besides the probe, by name: feed them by hand.
    signals: dict[str, FedSignal] = field(default_factory=dict)

    async def start(self) -> GuardRig:
        """What the daemon does at start: settle the switch target and adopt state.json."""
        await self.guard.recover(self.guard.state_file.load())
        return self

    async def tick(self) -> Decision:
        """One decision tick, under the guard's lock, at the clock's current time."""
        async with self.guard.lock:
            return await self.guard.tick()

    async def probe_round(self) -> Decision:
        """Advance the clock one probe interval, probe each color (and the front door)
        through its `MockProber`, feed the results in, and tick.

        Every round is one `probe.interval` long: the faster cadence the daemon uses to
        confirm a failure (`probe.fast_interval`) is not modelled.
        """
        self.clock.advance(self.guard.s.probe_interval)
        for color in COLORS:
            self.guard.observe(color, await self.probers[color].probe())
        if self.front_door is not None:
            self.guard.observe_front_door(await self.front_door.probe())
        return await self.tick()

    async def probe_rounds(self, n: int) -> list[Decision]:
        """*n* `probe_round`s; their decisions, in order."""
        return [await self.probe_round() for _ in range(n)]

    async def feed(
        self, blue: ProbeResult, green: ProbeResult, front: ProbeResult | None = None
    ) -> Decision:
        """`feed_round` on this guard: results given directly, no HTTP."""
        return await feed_round(self.guard, self.clock, blue, green, front)

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The journal as written on disk, oldest first; only events *names* if given."""
        return [e for e in self.guard.journal.read() if not names or e.get("event") in names]

    def restart(self) -> GuardRig:
        """A new guard on the same files, clock and upstreams, as after a crash or stop.

        The switcher is `MemorySwitcher.restarted`; a front door `build_guard` made
        forwards to what that switcher runs. Call `start` on the result.
        """
        self.guard.journal.close()
        return self.rebuild(self.switcher.restarted())

    async def aclose(self) -> None:
        """Close the probers' clients and the journal."""
        for prober in [*self.probers.values(), self.front_door]:
            if prober is not None:
                await prober.aclose()
        self.guard.journal.close()

    async def __aenter__(self) -> GuardRig:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def build_guard(
    root: Path,
    *,
    config: Path | None = None,
    policy: PolicySpec | None = None,
    active: Color | None = "green",
    front_door: bool = False,
    clock: ManualClock | None = None,
    switcher: MemorySwitcher | None = None,
    probers: Mapping[Color, MockProber] | None = None,
    verifier: HttpProber | None = None,
    log: Any = None,
    signals: Mapping[str, FedSignal] | None = None,
    **settings: Any,
) -> GuardRig:
    """Assemble a `Guard` under *root* (journal and state.json in ``root/state``, the QoS
    lock in ``root/run``) from the stand-ins above; start it with `GuardRig.start`.

    With *config* (a guardd TOML file, validated as ``guardd check-config`` does, without
    the host checks), the guard runs that file's policy, intervals, switch timeout,
    verification and QoS window, and each color's `MockProber` that file's URLs, quorum
    and probe expectations (``expect_status``, ``expect_json``, ...); a front door is
    watched when it sets ``switch.verify_url``, and the switcher passes the steps of its
    ``switch.kind``. Its files still live under *root*.
    Without one, *policy* (default `DEFAULT_POLICY`) and the remaining keywords go to
    `guard_settings` (``instance``, ``interval``, ``qos_window``, ...).

    *active* is the color the new `MemorySwitcher` names (ignored with *switcher*). With
    *front_door*, a `MockProber` on ``http://front.test/`` watches the front door and
    verifies each switch; it answers as the color the switcher runs answers
    (`MockProber.forward_to`) until told otherwise. *verifier* puts any other prober
    there. The rollback budget is read back from the journal, as at a daemon's start.
    *signals* are the guard's signals besides the probe (`FedSignal`s, by name); with
    *config*, each `[signals.NAME]` it declares gets one of its kind unless given, so
    that its `[[rules]]` read what the test feeds.

    Raises `guardd.exceptions.ConfigError` for an invalid *config*, and `ValueError`
    for *config* together with *policy* or settings keywords.
    """
    clock = clock or ManualClock()
    # Typed as the protocol guardd reads time through, so that mypy holds the two together.
    time_source: Clock = clock
    log = log if log is not None else CapturingLogger()
    identity: dict[Color, str] = {}
    steps: tuple[str, ...] = NGINX_STEPS
    if config is not None:
        if policy is not None or settings:
            raise ValueError("a config file sets the policy and settings; pass one or the other")
        s, made, identity, steps, declared = _from_config(
            config, root, probers is None, verifier is None
        )
        fed = {name: FedSignal(name, kind=kind) for name, kind in declared.items()}
        signals = {**fed, **(signals or {})}
    else:
        s = guard_settings(root, policy or DEFAULT_POLICY, **settings)
        made = {}
        if probers is None:
            made = {c: MockProber([f"http://{c}.test/health"]) for c in COLORS}
        if verifier is None and front_door:
            made["front"] = MockProber(["http://front.test/"])
    colors: dict[Color, MockProber] = (
        dict(probers) if probers is not None else {c: made[c] for c in COLORS}
    )
    switcher = switcher or MemorySwitcher(active, steps=steps)
    front = made.get("front")
    if front is not None:
        # The front door serves whatever the switcher runs now, as nginx does.
        front.forward_to(colors, lambda: switcher.target.running)
    verifier = verifier or front
    (root / "run").mkdir(parents=True, exist_ok=True)
    journal = Journal(root / "state" / "events.jsonl", s.instance, time_source.wall)
    journal.open()
    machine = GuardMachine(s.policy, s.probe_interval)
    if identity:
        machine.probe_identity = identity
    guard = Guard(
        s,
        machine=machine,
        switcher=switcher,
        journal=journal,
        state_file=StateFile(root / "state" / "state.json"),
        metrics=GuardMetrics(s.instance, "0"),
        verifier=verifier,
        clock=time_source,
        log=log,
    )
    chosen = dict(signals or {})
    guard.signals = dict(chosen)
    guard.load_history()

    def again(twin: MemorySwitcher) -> GuardRig:
        rig = build_guard(
            root,
            config=config,
            policy=policy,
            clock=clock,
            switcher=twin,
            probers=colors,
            verifier=verifier,
            log=log,
            signals=chosen,
            **settings,
        )
        if front is not None:
            # The same front door, now in front of what the restarted switcher runs.
            front.forward_to(colors, lambda: twin.target.running)
        return rig

    door = verifier if isinstance(verifier, MockProber) else None
    return GuardRig(guard, clock, switcher, colors, door, log, root, again, chosen)


def _from_config(
    path: Path, root: Path, probers: bool, front_door: bool
) -> tuple[GuardSettings, dict[str, MockProber], dict[Color, str], tuple[str, ...], dict[str, str]]:
    """What the daemon would build from the config at *path*, with its files under *root*:
    its settings, the probers asked for (by color, and ``front``), the probes' identity,
    the steps its kind of switcher passes, and its signals' kinds by name."""
    # Only here: a guard built without a config file needs none of the daemon's wiring.
    from guardd.config import load  # noqa: PLC0415
    from guardd.supervisor import guard_settings as daemon_settings  # noqa: PLC0415
    from guardd.supervisor import probe_identity, probe_spec  # noqa: PLC0415

    loaded = load(path)
    c = loaded.config
    s = dataclasses.replace(
        daemon_settings(loaded), lock_file=root / "run" / f"{loaded.instance}.qos.lock"
    )
    spec = probe_spec(c)
    made: dict[str, MockProber] = {}
    if probers:
        for color in COLORS:
            up = c.upstreams[color]
            made[color] = MockProber(up.all_urls, spec, quorum=up.quorum)
    if front_door and c.switch.verify_url:
        # As the daemon's: fresh connections only, so every answer comes from what runs now.
        fresh = dataclasses.replace(spec, headers={**spec.headers, "Connection": "close"})
        made["front"] = MockProber([c.switch.verify_url], fresh)
    if c.switch.kind == "nginx":
        steps: tuple[str, ...] = NGINX_STEPS
    elif c.switch.kind == "state-file":
        steps = STATE_FILE_STEPS if c.switch.effective_reload_command else (STEP_WRITTEN,)
    else:
        steps = COMMAND_STEPS
    kinds: dict[str, str] = {name: table.kind for name, table in c.signals.items()}
    return s, made, probe_identity(c), steps, kinds
