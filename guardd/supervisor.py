"""The supervisor: builds the guard from a config and owns its task group.

Start-up (recover, first probe round, READY), the main loop (probe loops, decision
tick, watchdog, control socket, notifications, signals) and graceful shutdown (finish
or undo a switch in flight, write state, STOPPING) all live here, in the manner of
uvicorn's server.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import signal
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.abc import TaskStatus

from guardd import config as config_mod
from guardd._version import __version__
from guardd.clock import Clock, SystemClock
from guardd.commands import RetryPolicy
from guardd.config import GuardConfig, Settings, group_problem, not_switchable
from guardd.core.cadence import last_point_by, next_round
from guardd.core.machine import GuardMachine
from guardd.core.types import COLORS, GUARDD, TRAFFIC_MOVES, Color, Outcome
from guardd.exceptions import (
    AlreadyRunning,
    ConfigError,
    ConfigProblem,
    GuarddError,
    SwitchLockError,
    UnsafePath,
)
from guardd.faults import FaultPoints
from guardd.fsutil import (
    hold_instance_lock,
    hold_switch_lock,
    lock_beside,
    release_switch_lock,
)
from guardd.guard import Guard, GuardSettings
from guardd.journal import Journal
from guardd.logs import get_logger
from guardd.metrics import GuardMetrics, MetricsServer
from guardd.observations import Recorder
from guardd.probes.http import HttpProber, ProbeResult, ProbeSpec
from guardd.secrets import redact
from guardd.signals import Signal
from guardd.signals import build as build_signal
from guardd.statefile import StateFile
from guardd.switchers import Switcher
from guardd.systemd import SystemdNotifier
from guardd.timestamps import rfc3339

if TYPE_CHECKING:
    import httpx  # a probe transport injected by tests; the daemon never loads httpx for it

# A probe loop that has not finished a round for this long past its deadline is wedged.
_STUCK_MARGIN = 5.0
# How often new traffic may wake the decision loop (s).
_SIGNAL_PULSE_S = 0.25
# Distinct unexpected errors remembered (to log each traceback once); more are only counted.
_MAX_LOOP_ERRORS_SEEN = 256
# How long a record waits at most before it is written to `observations/` (s); the
# shortest time between two batches (s), so that the writer thread is not woken at the
# end of every round at fast intervals (a round at 1 s may end up to a tenth of a second
# earlier than the last and still hand one over);
# and how long the last write at shutdown may take before it is abandoned (s).
_RECORD_EVERY_S = 1.0
_RECORD_GAP_S = 0.9
_RECORD_LAST_S = 5.0


def cannot(settings: Settings, key: str, what: str, error: OSError | str) -> ConfigProblem:
    """`file: key: cannot <what>: <why>; <what to do>`, one line, for a path guardd needs."""
    why = error if isinstance(error, str) else (error.strerror or str(error))
    return ConfigProblem(
        str(settings.source),
        key,
        f"cannot {what}: {why}; run guardd as the guardd user (as guardd@.service does), "
        f"or set {key} to a path this user may write",
    )


def startup_problems(settings: Settings) -> list[ConfigProblem]:
    """What stops this user from running this config: `state.dir`, the control socket's
    folder, the QoS lock file's folder (each created when missing).

    Checked before anything starts, so that a wrong user or path is one line, not a traceback.
    Each folder is tried with a real file, so that read-only mounts, ACLs and capabilities
    count as they will for guardd itself.
    """
    problems: list[ConfigProblem] = []

    def folder(key: str, path: Path, doing: str, mode: int = 0o777) -> bool:
        # Made when missing, then tried with a real file; a problem is one line for `key`.
        try:
            path.mkdir(parents=True, exist_ok=True, mode=mode)
        except OSError as e:
            problems.append(cannot(settings, key, f"create {path}", e))
            return False
        if error := _try_write(path):
            problems.append(cannot(settings, key, doing, error))
            return False
        return True

    state_dir = settings.state_dir
    folder("state.dir", state_dir, f"write {state_dir}", 0o750)
    sock = settings.control_socket
    if folder("control.socket", sock.parent, f"bind {sock}"):
        if sock.is_dir() or (sock.exists() and not stat.S_ISSOCK(sock.lstat().st_mode)):
            why = "something that is not a socket is in the way"
            problems.append(cannot(settings, "control.socket", f"bind {sock}", why))
        elif _listened_on(sock):
            # Another guardd (on another state directory) answers there: starting would
            # probe and decide beside it until the bind, after the first tick, failed.
            why = f"cannot bind {sock}: another process listens on it (a guardd already running?)"
            problems.append(ConfigProblem(str(settings.source), "control.socket", why))
    # The lock file's folder: a lock guardd cannot write there would be taken in its
    # memory alone (deploys never see it), and its absence read as someone's `rm`.
    lock = settings.lock_file
    folder("qos.lock_file", lock.parent, f"write in {lock.parent}")
    # The socket's groups are looked up as it is bound, after the first probe round: a
    # group this host lacks is said here, in one line, as check-config says it.
    control = settings.config.control
    problems += [
        ConfigProblem(str(settings.source), f"control.{key}", lacking)
        for key in ("group", "admin_group")
        if (lacking := group_problem(getattr(control, key)))
    ]
    return problems


def _listened_on(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path`."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except OSError:
        return False
    from guardd.control.server import connect_answer  # noqa: PLC0415 - as ControlServer

    return connect_answer(path) in (0, errno.EAGAIN)


def _try_write(folder: Path) -> OSError | None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e


def guard_settings(settings: Settings) -> GuardSettings:
    """The running guard's view of a validated config."""
    c = settings.config
    return GuardSettings(
        instance=settings.instance,
        policy=c.policy_spec(),
        probe_interval=c.probe.interval,
        confirm_interval=c.probe.confirm_interval,
        switch_timeout=c.switch.timeout,
        verify_url=c.switch.verify_url,
        verify_successes=c.switch.verify_successes,
        verify_header=c.switch.verify_header,
        lock_file=settings.lock_file,
        qos_window=c.qos.window,
        qos_max_error_ratio=c.qos.max_error_ratio,
        qos_min_health_ratio=c.qos.min_health_ratio,
    )


def probe_identity(c: GuardConfig) -> dict[Color, str]:
    """What each color's probes look at, as a digest: state.json may keep it, a URL may not.

    A URL can carry a credential, so only a SHA-256 of the URLs and quorum is stored.
    """
    return {
        color: hashlib.sha256(
            json.dumps([c.upstreams[color].all_urls, c.upstreams[color].quorum]).encode()
        ).hexdigest()[:16]
        for color in COLORS
    }


def probe_spec(c: GuardConfig) -> ProbeSpec:
    """How probes behave under this config."""
    p = c.probe
    return ProbeSpec(
        timeout=p.timeout,
        expect_status=p.expect_status,
        expect_json=p.expect_json,
        headers=p.headers,
        max_body_bytes=p.max_body_bytes,
        follow_redirects=p.follow_redirects,
        verify_tls=p.verify_tls,
        ca_file=p.ca_file,
        keepalive=p.keepalive,
    )


def retry_policy(c: GuardConfig) -> RetryPolicy:
    """The `[retry]` section as the command runner and notifier take it."""
    return RetryPolicy(
        attempts=c.retry.attempts, base_delay=c.retry.base_delay, max_delay=c.retry.max_delay
    )


def build_verifier(
    c: GuardConfig, transport: httpx.AsyncBaseTransport | None = None
) -> HttpProber | None:
    """The front-door prober of `switch.verify_url` (None when unset), at start and on reload.

    Fresh connections only: a kept-alive one would be served by an old nginx worker.
    """
    if not c.switch.verify_url:
        return None
    spec = probe_spec(c)
    return HttpProber(
        [c.switch.verify_url],
        replace(spec, headers={**spec.headers, "Connection": "close"}),
        transport=transport,
        named_by=c.switch.verify_header,
    )


# Keys a reload cannot apply to a running guard: the journal, the socket and the names
# that metrics and the journal carry were opened and bound at start.
RESTART_ONLY = (
    "instance",
    "state.dir",
    "control.socket",
    "control.mode",
    "control.group",
    "control.admin_group",
    "state.keep_observations",
    # A lock held at the old path would be dropped without a trace, and a deploy gate
    # reading the new one would find none: the lock moves with a restart (which puts a
    # lock guardd holds back at the new path).
    "qos.lock_file",
)


def changed_keys(old: GuardConfig, new: GuardConfig) -> list[str]:
    """The dotted keys whose values differ (a list such as `notify` counts as one key)."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict) and prefix not in ("probe.expect_json", "probe.headers"):
            out: dict[str, Any] = {}
            for k, v in value.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out
        return {prefix: value}

    # Python mode keeps SecretStr objects, which compare by value and never print it.
    a, b = flat(old.model_dump(), ""), flat(new.model_dump(), "")
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def switch_target(c: GuardConfig) -> tuple[str, Path] | None:
    """The key and path of what the switcher rewrites (nginx: the active link; state-file:
    the file); None for `kind = "command"`, whose target is the command's own."""
    if c.switch.kind == "nginx" and c.switch.active_link is not None:
        return "switch.active_link", c.switch.active_link
    if c.switch.kind == "state-file" and c.switch.path is not None:
        return "switch.path", c.switch.path
    return None


def switch_ends(c: GuardConfig) -> list[Path]:
    """Where the chain of `switch_target(c)` ends: nginx's targets of the colors (the link
    is followed through aliases to them, `fsutil.link_end`); none for a state file."""
    return list((c.switch.targets or {}).values()) if c.switch.kind == "nginx" else []


def build_switcher(settings: Settings, on_step: Callable[[str], Awaitable[None]]) -> Switcher:
    """The switcher `switch.kind` names."""
    s = settings.config.switch
    retry = retry_policy(settings.config)
    if s.kind == "nginx":
        from guardd.switchers.nginx import NginxSwitcher  # noqa: PLC0415 - one kind per daemon

        assert s.active_link is not None  # noqa: S101 - validated by SwitchConfig
        assert s.targets is not None  # noqa: S101
        return NginxSwitcher(
            active_link=s.active_link,
            targets=s.targets,
            test_command=s.test_command,
            reload_command=s.effective_reload_command or [],
            timeout=s.timeout,
            retry=retry,
            on_step=on_step,
        )
    if s.kind == "state-file":
        from guardd.switchers.state_file import StateFileSwitcher  # noqa: PLC0415

        assert s.path is not None  # noqa: S101 - validated
        return StateFileSwitcher(
            path=s.path,
            reload_command=s.effective_reload_command,
            timeout=s.timeout,
            retry=retry,
            on_step=on_step,
        )
    from guardd.switchers.command import CommandSwitcher  # noqa: PLC0415

    assert s.command is not None  # noqa: S101 - validated
    return CommandSwitcher(
        command=s.command,
        instance=settings.instance,
        timeout=s.timeout,
        retry=retry,
        state_path=settings.state_dir / "command-switch.json",
        on_step=on_step,
    )


@dataclass(slots=True)
class Runtime:
    """Everything a config builds for the running guard.

    Built whole by `Supervisor.build_runtime` at start and on each reload, and put in
    force by `Supervisor.install`; parts whose config did not change are carried over
    from the previous runtime (the same objects), so that a reload keeps their state.
    """

    settings: Settings
    guard: GuardSettings
    probe_identity: dict[Color, str]
    probers: dict[Color, HttpProber]
    verifier: HttpProber | None
    switcher: Switcher
    notifier: Any  # guardd.notify's notifier; None when `notify` is empty
    # The adapters of `[signals.NAME]`, by name (the probe is not among them).
    signals: dict[str, Signal] = field(default_factory=dict)


def signal_of(settings: Settings, name: str, clock: Clock) -> tuple[Signal, list[str]]:
    """The adapter of `[signals.NAME]` on `clock`, and what it warns about.

    Raises `ConfigError` (`signals.NAME.key: reason`) when it cannot be built.
    """
    c = settings.config
    try:
        return build_signal(
            name,
            c.signals[name],
            window_s=c.policy.window,
            targets=c.switch.targets if c.switch.kind == "nginx" else None,
            probe_urls={color: _urls(c, color) for color in COLORS},
            clock=clock,
            instance=settings.instance,
        )
    except ValueError as e:
        key, _, reason = str(e).partition(": ")
        raise ConfigError(
            [ConfigProblem(str(settings.source), f"signals.{name}.{key}", reason)]
        ) from None


def build_guard(
    runtime: Runtime,
    *,
    journal: Journal,
    state_file: StateFile,
    metrics: GuardMetrics,
    clock: Clock,
    log: Any,
    notify: Callable[[dict[str, Any]], None] = lambda _e: None,
    faults: FaultPoints | None = None,
) -> Guard:
    """The guard `runtime` describes, on these edges, its budget read back from `journal`.

    The daemon gives it the files in state.dir; `guardd replay` gives it edges in memory,
    so that both decide with the very same guard.
    """
    machine = GuardMachine(runtime.guard.policy, runtime.guard.probe_interval)
    machine.probe_identity = runtime.probe_identity
    guard = Guard(
        runtime.guard,
        machine=machine,
        switcher=runtime.switcher,
        journal=journal,
        state_file=state_file,
        metrics=metrics,
        verifier=runtime.verifier,
        clock=clock,
        log=log,
        notify=notify,
        faults=faults,
    )
    guard.signals = dict(runtime.signals)
    guard.load_history()
    return guard


class Supervisor:
    """Runs one guard until SIGTERM/SIGINT; reloads on SIGHUP."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        sd: SystemdNotifier | None = None,
        faults: FaultPoints | None = None,
        probe_transport: httpx.AsyncBaseTransport | None = None,
        instance_arg: str | None = None,
    ) -> None:
        self.settings = settings
        # The config this process started with: what a reload cannot change until the
        # next start is told apart from it.
        self._started_config = settings.config
        self.clock = clock or SystemClock()
        self.sd = sd or SystemdNotifier()
        self.faults = faults or FaultPoints()
        self.probe_transport = probe_transport
        self.instance_arg = instance_arg
        self.log = get_logger()
        self.metrics = GuardMetrics(settings.instance, __version__)
        self.runtime: Runtime | None = None
        self.guard: Guard | None = None
        self.notifier: Any = None
        self.metrics_server: MetricsServer | None = None
        self._wake = anyio.Event()
        # Recording (`_record`, `_after_tick`, `_recording_loop`): the monotonic time (s)
        # before which no batch is handed to the writer; the latest the decision loop will
        # tick next (inf before it waits); the timer for records no tick takes in time.
        self._record_not_before = -math.inf
        self._next_tick_by = math.inf
        self._record_timer = anyio.Event()
        # The writer's failure episodes (begun, ended) as last logged.
        self._write_episodes = (0, 0)
        self._first_round: dict[Color, anyio.Event] = {c: anyio.Event() for c in COLORS}
        self._front_door_answered = anyio.Event()
        # Set when a reload puts another front-door prober in force (or none).
        self._verifier_changed = anyio.Event()
        self._probe_started: dict[Color, float | None] = dict.fromkeys(COLORS)
        # Where the probe loops' shared cadence starts (monotonic s; `next_round`): set as
        # they start, so that their rounds fall due together.
        self._cadence_epoch = 0.0
        self._exit_code = 0
        self._tg: anyio.abc.TaskGroup | None = None
        # The running signal adapters' cancel scopes, by the adapter's id.
        self._signal_scopes: dict[int, anyio.CancelScope] = {}
        self._pulsing = False
        # Set by a file signal as it counts new lines (`_lines_counted`); the pulse waits on it.
        self._lines_seen = anyio.Event()
        self._notifier_task: tuple[anyio.CancelScope, anyio.Event] | None = None
        self._loop_errors_seen: set[tuple[str, str, str]] = set()
        # The switch targets' locks held (`hold_switch_lock`: the lock file and its fd), by
        # target: the one in force, and while a reload is built, the one it moves to.
        self._switch_locks: dict[Path, tuple[Path, int]] = {}
        # Why the lock of the target in force could not be taken again, once it was lost
        # (`keep_switch_lock`); None while it is held.
        self._switch_lock_lost: str | None = None
        #: What guardd observed, kept for replay (`state.keep_observations`); None when
        #: recording is off or before start.
        self.recorder: Recorder | None = None

    # ---- start-up ----------------------------------------------------------------------

    @property
    def probers(self) -> dict[Color, HttpProber]:
        """Each color's prober in the runtime in force (none before start)."""
        return self.runtime.probers if self.runtime is not None else {}

    def build_runtime(self, settings: Settings, previous: Runtime | None = None) -> Runtime:
        """Build what `settings` asks for, reusing the parts of `previous` it leaves as they were.

        Raises `ConfigError` when a notification sink cannot be built (its URL does not
        resolve): the notifier is built first, so that nothing else is built for nothing.
        Raises `SwitchLockError` when the switch target's lock, taken next, cannot be held
        (`_hold_switch_target`).
        Probers whose URLs and probe settings are unchanged are kept (and with them the
        color's connections), as are the front-door verifier, the switcher and the
        notifier whose sections (and `retry`) are unchanged.
        """
        c = settings.config
        old = previous.settings.config if previous is not None else None

        def kept(*parts: Callable[[GuardConfig], object]) -> bool:
            # Whether every part is configured as in the previous runtime.
            return old is not None and all(part(old) == part(c) for part in parts)

        def retry(g: GuardConfig) -> object:
            return g.retry

        if (
            previous is not None
            and kept(lambda g: g.notify, retry)
            and _same_sinks(previous.notifier, settings)
        ):
            notifier = previous.notifier
        else:
            notifier = self._build_notifier(settings)
        self._hold_switch_target(settings)
        spec = probe_spec(c)
        probers: dict[Color, HttpProber] = {}
        for color in COLORS:
            urls = functools.partial(_urls, color=color)
            if previous is not None and kept(probe_spec, urls):
                probers[color] = previous.probers[color]
            else:
                probers[color] = HttpProber(
                    c.upstreams[color].all_urls,
                    spec,
                    quorum=c.upstreams[color].quorum,
                    transport=self.probe_transport,
                )
        if previous is not None and kept(
            probe_spec, lambda g: (g.switch.verify_url, g.switch.verify_header)
        ):
            verifier = previous.verifier
        else:
            verifier = build_verifier(c, self.probe_transport)
        if previous is not None and kept(lambda g: g.switch, retry):
            switcher = previous.switcher
        else:
            switcher = build_switcher(settings, self._on_switch_step)
        signals: dict[str, Signal] = {}
        for name in c.signals:

            def inputs(g: GuardConfig, name: str = name) -> object:
                # What a signal is built from: its table, and where addresses come from.
                return (
                    g.signals.get(name), g.policy.window, g.switch.targets,
                    [_urls(g, color) for color in COLORS],
                )  # fmt: skip

            if previous is not None and name in previous.signals and kept(inputs):
                signals[name] = previous.signals[name]
                continue
            signals[name], problems = signal_of(settings, name, self.clock)
            for problem in problems:
                self.log.warning("signal_addresses", signal=name, problem=problem)
            adapter: Any = signals[name]
            if hasattr(adapter, "on_sample"):
                # A polled signal's samples are recorded: a replay cannot poll the past.
                adapter.on_sample = functools.partial(self._record, "sample", name)
            if hasattr(adapter, "on_counted"):
                # A file signal's new lines wake a tick (`_signal_pulse`).
                adapter.on_counted = self._lines_counted
        return Runtime(
            settings=settings,
            guard=guard_settings(settings),
            probe_identity=probe_identity(c),
            probers=probers,
            verifier=verifier,
            switcher=switcher,
            notifier=notifier,
            signals=signals,
        )

    def _hold_switch_target(self, settings: Settings) -> None:
        """Lock the switch target `settings` names, unless this process holds its lock
        already (under this spelling of its path or another).

        Raises `SwitchLockError` (`<file>: switch.active_link: another guardd (pid N)
        switches ...`) when another process holds it, or when the lock cannot be taken (a
        directory or a symlink planted at its path, a read-only folder): a guard that
        cannot tell whether another switches its target does not switch it.
        """
        target = switch_target(settings.config)
        if target is None or target[1] in self._switch_locks:
            return
        key, path = target
        ends = switch_ends(settings.config)
        if why := not_switchable(path, ends):
            # (Checked at every start, host checks or not: guardd would switch a file
            # nginx never reads, or refuse to write the state file at its first switch.)
            raise SwitchLockError(str(ConfigProblem(str(settings.source), key, why)))
        lock = lock_beside(path)  # (not an alias: the target is its own chain's end)
        with contextlib.suppress(OSError):
            st = os.lstat(lock)
            for held in self._switch_locks.values():
                if os.path.samestat(st, os.fstat(held[1])):
                    self._switch_locks[path] = held
                    return
        try:
            self._switch_locks[path] = hold_switch_lock(path, ends)
        except AlreadyRunning as e:
            why = (
                f"{e}; two guards of one target undo each other's switches: give each "
                "instance its own"
            )
        except (OSError, UnsafePath) as e:
            what = str(e) if isinstance(e, UnsafePath) else f"{lock}: {_why(e)}"
            why = (
                f"cannot take the lock beside it: {what}; guardd switches it only while it "
                "holds that lock"
            )
        else:
            return
        raise SwitchLockError(str(ConfigProblem(str(settings.source), key, why)))

    def keep_switch_lock(self) -> str | None:
        """None while this process holds the lock of the switch target in force (or there
        is none); else why it may not switch that target now. Asked at every tick and
        before every change of the target (`Guard.may_switch`): a switch, its undo, a
        re-apply.

        The target and its lock are looked at afresh each time, as at start:
        - A target that became unswitchable (an alias put in place of the link, a second
          name linked to it, a state file replaced by a symlink) is refused while it is.
        - A lock whose file was removed or replaced (an `rm`, a cleaner of old files), or
          whose path now leads elsewhere (a folder on the way flipped to another, as a
          `current` release link is), locks nothing a second guardd would look at: that
          one would start beside this one. The lock is taken again at once, where the
          target's is now. When that fails (another process took it first, something
          planted there), guardd changes nothing until it holds it again: a rollback then
          fails at its switch, and guardd holds.
        Each new cause is logged (`switch_lock_lost`, an error) and journaled (an
        `alert`), and an end to it too (`switch_lock_taken_again`).
        """
        target = switch_target(self.settings.config)
        held = self._switch_locks.get(target[1]) if target is not None else None
        if target is None or held is None:
            return None  # (no target, or not locked yet: the start takes it)
        path = target[1]
        ends = switch_ends(self.settings.config)
        if why := not_switchable(path, ends):
            return self._switch_lock_problem(path, why)
        # Not an alias: the target's lock is beside the target itself (`switch_lock_path`).
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(lock_beside(path)), os.fstat(held[1])):
                return self._switch_lock_problem(path, None)
        try:
            new = hold_switch_lock(path, ends)
        except (AlreadyRunning, OSError, UnsafePath) as e:
            why = str(e) if isinstance(e, GuarddError) else f"{held[0]}: {_why(e)}"
            return self._switch_lock_problem(path, f"its lock cannot be held: {why}")
        for spelling, lock_held in list(self._switch_locks.items()):
            if lock_held == held:
                self._switch_locks[spelling] = new
        # (Removed only if its path still leads to the file it locked: a lock moved away
        # from a folder that stayed.)
        release_switch_lock(*held)
        self.log.warning(
            "switch_lock_taken_again",
            lock=str(new[0]),
            reason="its file was removed or replaced, or its path leads elsewhere now",
        )
        return self._switch_lock_problem(path, None)

    def _switch_lock_problem(self, path: Path, why: str | None) -> str | None:
        """Note `why` guardd may not switch `path` (None: it may), saying so once per cause;
        what `keep_switch_lock` returns."""
        refusal = None if why is None else f"guardd does not switch {path} now: {why}"
        if why == self._switch_lock_lost:
            return refusal
        was, self._switch_lock_lost = self._switch_lock_lost, why
        if refusal is None:
            reason = f"guardd may switch {path} again (it was: {was})"
            self.log.info("switch_lock_held_again", target=str(path))
        else:
            reason = f"{refusal}; until it may, a rollback fails"
            self.log.error("switch_lock_lost", target=str(path), error=why)
        if self.guard is not None:
            self.guard.record("alert", by=GUARDD, reason=reason[:900])
        return refusal

    def _release_switch_locks(self, keep: Settings | None) -> None:
        """Let go of every switch target's lock but the one `keep` names (all: None)."""
        target = switch_target(keep.config) if keep is not None else None
        kept = self._switch_locks.get(target[1]) if target is not None else None
        for path in [p for p in self._switch_locks if target is None or p != target[1]]:
            held = self._switch_locks.pop(path)
            # (One lock may be held under two spellings of its target's path.)
            if held != kept and held not in self._switch_locks.values():
                release_switch_lock(*held)

    async def install(self, runtime: Runtime) -> frozenset[Color]:
        """Put `runtime` in force, and close what the one it replaces had and it does not reuse.

        At start (no runtime in force yet) the guard is then built from it; on a reload the
        running guard is reconfigured, and the caller holds the guard's lock. Returns the
        colors whose probe history is kept: those whose probe URLs did not change.
        """
        previous, self.runtime = self.runtime, runtime
        self.settings = runtime.settings
        self._release_switch_locks(keep=runtime.settings)
        if previous is None:
            keep = frozenset(COLORS)
        else:
            old, new = previous.settings.config, runtime.settings.config
            keep = frozenset(
                c for c in COLORS if old.upstreams[c].all_urls == new.upstreams[c].all_urls
            )
            for color, prober in previous.probers.items():
                if runtime.probers[color] is not prober:
                    await prober.aclose()
        guard = self.guard
        if guard is not None:
            guard.reconfigure(
                runtime.guard,
                switcher=runtime.switcher,
                verifier=runtime.verifier,
                probe_identity=runtime.probe_identity,
                keep=keep,
                signals=runtime.signals,
            )
        old_signals = previous.signals if previous is not None else {}
        for name, adapter in old_signals.items():
            if runtime.signals.get(name) is not adapter:
                scope = self._signal_scopes.pop(id(adapter), None)
                if scope is not None:
                    scope.cancel()
        if self._tg is not None:
            await self._start_signals(self._tg, runtime)
        stale = previous.verifier if previous is not None else None
        if stale is not None and stale is not runtime.verifier:
            await stale.aclose()
        if previous is not None and previous.verifier is not runtime.verifier:
            self._verifier_changed.set()
        if previous is None or runtime.notifier is not previous.notifier:
            await self._swap_notifier(runtime.notifier)
        return keep

    def _build(self, runtime: Runtime) -> Guard:
        s = runtime.settings
        state_dir = s.state_dir  # made, and locked, by `run` before anything is built
        journal = Journal(state_dir / "events.jsonl", s.instance, self.clock.wall)
        journal.open()
        if journal.skipped_lines:
            self.log.warning(
                "journal_lines_skipped", count=journal.skipped_lines, path=str(journal.path)
            )
        guard = build_guard(
            runtime,
            journal=journal,
            state_file=StateFile(state_dir / "state.json"),
            metrics=self.metrics,
            clock=self.clock,
            log=self.log,
            notify=self._notify,
            faults=self.faults,
        )
        guard.switch_refused = self.keep_switch_lock
        if s.config.fleet is not None:
            from guardd.fleet.coordinator import Fleet  # noqa: PLC0415 - only in a fleet

            guard.fleet = Fleet(
                s.config.fleet,
                instance=s.instance,
                state_dir=state_dir,
                switch_timeout=runtime.guard.switch_timeout,
            )
            guard.fleet.guard = guard
        return guard

    async def _on_switch_step(self, step: str) -> None:
        await self.faults.reach(f"after_{step}")

    def _notify(self, event: dict[str, Any]) -> None:
        if event.get("event") in TRAFFIC_MOVES:  # (recorded as `switch`)
            self._record(
                "switch",
                event.get("from"),
                event.get("to"),
                by=event.get("by"),
                reason=event.get("reason"),
                event=event.get("event"),
                severity=event.get("severity"),
            )
        elif event.get("event") in ("paused", "resumed"):
            self._record("operator", event["event"], by=event.get("by"), reason=event.get("reason"))
        if self.notifier is not None:
            self.notifier.submit(event)

    # ---- recording what was observed (guardd.observations) ----------------------------

    def _start_recording(self, guard: Guard) -> None:
        """Begin recording (unless `state.keep_observations` is 0): the `start` record."""
        guard.recording = self.recording_status
        keep = self.settings.config.state.keep_observations
        if keep <= 0:
            return
        self.recorder = Recorder(
            self.settings.state_dir / "observations",
            self.settings.instance,
            keep_s=keep,
            wall=self.clock.wall,
            monotonic=self.clock.monotonic,
        )
        try:
            self.recorder.start_writer()
        except RuntimeError as e:  # no thread to be had (a pids limit): guard unrecorded
            self.recorder = None
            self.loop_failed("recording", e)
            return
        self._record("start", active=guard.active, probe_interval_s=guard.s.probe_interval)

    def _record(self, what: str, *args: Any, **fields: Any) -> None:
        """Hand one observation to the recorder (no I/O); a bug here never stops guarding."""
        recorder = self.recorder
        if recorder is None:
            return
        try:
            getattr(recorder, what)(*args, **fields)
        except Exception as e:  # noqa: BLE001 - recording is never fatal
            self.loop_failed("recording", e)
            return
        # The end of the next tick hands it to the writer, unless that tick may come more
        # than a second from now (a long interval, a signal's sample between ticks, a tick
        # under way, which may act for seconds): then the timer does.
        if not self._record_timer.is_set() and (
            self._next_tick_by > self.clock.monotonic() + _RECORD_EVERY_S
        ):
            self._record_timer.set()

    def _after_tick(self, period: float) -> None:
        """After a tick (the round's records all in): hand the records to the writer thread
        if `_RECORD_GAP_S` has passed since the last batch; else, if the next tick, at most
        `period` (s) away, would come after the oldest of them is due, set the timer."""
        recorder = self.recorder
        if recorder is None:
            return
        self._writer_news(recorder)
        oldest = recorder.oldest
        if oldest is None:
            return
        now = self.clock.monotonic()
        if now >= self._record_not_before:
            self._submit_records(recorder, now)
        elif not self._record_timer.is_set() and now + period > oldest + _RECORD_EVERY_S:
            self._record_timer.set()

    def _submit_records(self, recorder: Recorder, now: float) -> None:
        """Hand the pending records to the writer thread (no I/O, no wait)."""
        try:
            self.faults.fail_now("raise_in_recording")
            recorder.submit()
        except Exception as e:  # noqa: BLE001 - a bug holds the records, never the guard
            self.loop_failed("recording", e)
        # After a failed write, a second between batches (the writer tries again alone).
        failing = recorder.last_error is not None
        self._record_not_before = now + (_RECORD_EVERY_S if failing else _RECORD_GAP_S)

    def _writer_news(self, recorder: Recorder) -> None:
        """Report what the writer thread saw since last asked (after every tick, and each
        batch the timer hands over): each failure episode once, however short (the writer
        counts them), and each bug."""
        while recorder.bugs:
            self.loop_failed("recording", recorder.bugs.popleft())
        episodes = (recorder.failures, recorder.recoveries)
        if episodes != self._write_episodes:
            if episodes[0] != self._write_episodes[0]:
                self.log.warning("observations_write_failed", error=recorder.failure_error)
            if episodes[1] != self._write_episodes[1]:
                self.log.info("observations_write_recovered")
            self._write_episodes = episodes

    async def _recording_loop(self) -> None:
        """The timer of records no tick hands to the writer in time (`_record`,
        `_after_tick`): once set, it writes them when the oldest has waited
        `_RECORD_EVERY_S` (never within `_RECORD_GAP_S` of the last batch), until none is
        left. Unset, it sleeps: a guard with nothing to record is not woken for it, and one
        whose ticks take its records in time never wakes it."""
        recorder = self.recorder
        assert recorder is not None  # noqa: S101 - started only with a recorder
        while True:
            await self._record_timer.wait()
            while (oldest := recorder.oldest) is not None:
                now = self.clock.monotonic()
                due = max(oldest + _RECORD_EVERY_S, self._record_not_before)
                if self._next_tick_by < due:
                    break  # a tick comes first: it takes them, or sets the timer again
                if now < due:
                    await anyio.sleep(due - now)
                else:
                    self._submit_records(recorder, now)
                    self._writer_news(recorder)
            self._record_timer = anyio.Event()

    async def _stop_recording(self) -> None:
        """The last write, and the end of the gzip member; abandoned past `_RECORD_LAST_S`."""
        recorder = self.recorder
        if recorder is None:
            return
        self._record("stop")
        with anyio.move_on_after(_RECORD_LAST_S):
            await recorder.aclose()
        if not recorder.closed:
            self.log.warning("observations_write_abandoned", after_s=_RECORD_LAST_S)

    def recording_status(self) -> dict[str, Any]:
        """Status' `recording` object: whether recording is on, where, and how it goes."""
        r = self.recorder
        if r is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "dir": str(r.directory),
            "keep_s": r.keep_s,
            "written": r.written,
            "pending": r.pending,
            "dropped": r.dropped,
            "errors": r.errors,
            "last_error": r.last_error,
        }

    def _build_notifier(self, settings: Settings | None = None) -> Any:
        settings = settings or self.settings
        c = settings.config
        if not c.notify:
            return None
        from guardd.notify import build_notifier  # noqa: PLC0415 - only when configured

        return build_notifier(settings, retry_policy(c), self.metrics, self.log)

    async def _run_notifier(
        self, notifier: Any, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `notifier` in its own scope, so that a reload can stop it and start another."""
        done = anyio.Event()
        with anyio.CancelScope() as scope:
            self._notifier_task = (scope, done)
            try:
                await notifier.run(task_status=task_status)
            finally:
                done.set()

    async def _swap_notifier(self, new: Any) -> None:
        """Stop the running notifier (its unsent events stay in the outbox), start `new`."""
        # Events from here on go to the new one, which holds them until it runs.
        self.notifier = new
        if self._notifier_task is not None:
            scope, done = self._notifier_task
            self._notifier_task = None
            scope.cancel()
            await done.wait()
        if new is not None and self._tg is not None:
            # The new one reads the outbox only now, once the old one has finished writing.
            # (At start there is no task group yet: `run` starts it after the first tick.)
            await self._tg.start(self._run_notifier, new)

    def _start_metrics(self, listen: str | None = None) -> str | None:
        """Serve /metrics on `listen` (default: the config's); why it could not, or None."""
        listen = self.settings.config.metrics.listen if listen is None else listen
        if not listen:
            return None
        try:
            server = MetricsServer(listen, self.metrics.registry)
            server.start()
        except (OSError, ValueError) as e:
            # Metrics are not the decision path: guard on, and say so loudly.
            self.log.error("metrics_listen_failed", listen=listen, error=str(e))
            return str(e)
        self.metrics_server = server
        self.log.info("metrics_listening", listen=listen, port=server.port)
        return None

    # ---- the main loop -----------------------------------------------------------------

    async def run(self) -> int:
        """Guard until stopped; the process exit code."""
        state_dir = self.settings.state_dir
        try:
            # Before anything is read or written: a second guardd on the same state (a
            # `guardd run` typed beside the unit) would recover, journal, probe and decide
            # beside the first, and could switch nginx under it.
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            lock_fd = hold_instance_lock(state_dir)
        except (GuarddError, OSError) as e:
            why = str(e) if isinstance(e, GuarddError) else f"cannot lock {state_dir}: {_why(e)}"
            self.log.error("startup_failed", error=why)
            return 1
        try:
            return await self._run()
        finally:
            self._release_switch_locks(keep=None)
            os.close(lock_fd)

    def _startup_error(self, e: GuarddError | OSError) -> str:
        """What a start that failed with `e` says: `<file>: <key>: ...` for a file it could
        not write."""
        if not isinstance(e, OSError) or e.filename is None:
            return str(e)
        # A file beside the switch target (the switcher's new or old link) is in that key's
        # folder; anything else written at start is state.dir's.
        target = switch_target(self.settings.config)
        key = "state.dir"
        if target is not None and Path(e.filename).parent == target[1].parent:
            key = target[0]
        return str(cannot(self.settings, key, f"write {e.filename}", e))

    async def _run(self) -> int:
        try:
            runtime = self.build_runtime(self.settings)
            await self.install(runtime)
            guard = self.guard = self._build(runtime)
            saved = guard.state_file.load()
            await guard.recover(saved)
            if guard.state_file.unreadable is not None:
                guard.hold_for_lost_state(guard.state_file.unreadable)
        except ConfigError as e:
            for problem in e.problems:
                self.log.error("config_invalid", problem=str(problem))
            return 2
        except (GuarddError, OSError) as e:
            self.log.error("startup_failed", error=self._startup_error(e))
            await self._close_probers()
            return 1
        self._start_metrics()
        self._start_recording(guard)
        guard.record(
            "started",
            target=guard.active,
            reason=f"guardd {__version__} guarding {self.settings.instance}",
        )
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._signals, tg.cancel_scope)
                if self.recorder is not None:
                    tg.start_soon(self._recording_loop)
                if guard.fleet is not None:
                    tg.start_soon(guard.fleet.run)
                await self._start_signals(tg, runtime)
                self._cadence_epoch = self.clock.monotonic()
                for color in COLORS:
                    tg.start_soon(self._probe_loop, color)
                # Always running: a reload may set `switch.verify_url` later.
                tg.start_soon(self._front_door_loop)
                # The first decision may weigh the front door: wait for its answer too.
                await self._front_door_answered.wait()
                for event in self._first_round.values():
                    await event.wait()
                async with guard.lock:
                    await guard.tick()
                if self.notifier is not None:
                    await tg.start(self._run_notifier, self.notifier)
                if not await self._start_control(tg):
                    tg.cancel_scope.cancel()
                    return self._exit_code
                tg.start_soon(self._decision_loop)
                if self.sd.watchdog_interval:
                    tg.start_soon(self._watchdog_loop, self.sd.watchdog_interval)
                self.sd.status(guard.status_line())
                self.sd.ready()
                self.log.info("ready", active=guard.active, state=guard.state.value)
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        return self._exit_code

    async def _start_control(self, tg: anyio.abc.TaskGroup) -> bool:
        """Serve the control socket; False (logged, exit code 1) when it cannot be bound."""
        from guardd.control.server import ControlServer  # noqa: PLC0415
        from guardd.operator import handle  # noqa: PLC0415

        c = self.settings.config.control
        guard = self.guard
        assert guard is not None  # noqa: S101

        async def handler(cmd: str, args: dict[str, Any], caller: Any) -> dict[str, Any]:
            result = await handle(guard, cmd, args, caller.by(), waiting=caller.waiting)
            if cmd not in ("status", "history", "qos_status", "fleet_status"):
                self._wake.set()
                self.sd.status(guard.status_line())
            return result

        path = self.settings.control_socket
        server = ControlServer(
            path, handler, mode=int(c.mode, 8), group=c.group, admin_group=c.admin_group
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            await tg.start(server.serve)
        except (OSError, GuarddError, LookupError) as e:  # LookupError: a group gone since
            # Without the socket no operator can act: stop, in one line, not a traceback.
            problem = cannot(self.settings, "control.socket", f"bind {path}", _why(e))
            self.log.error("startup_failed", error=str(problem))
            self._exit_code = 1
            return False
        return True

    async def _shutdown(self) -> None:
        self.sd.stopping()
        guard = self.guard
        if guard is not None:
            if not guard.journal.recent or guard.journal.recent[-1].get("event") != "stopped":
                guard.record("stopped", target=guard.active, reason="shutting down")
            guard.save_state()
            if guard.fleet is not None:
                await guard.fleet.farewell()  # (it may journal: before the journal closes)
            guard.journal.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        await self._stop_recording()
        await self._close_probers()
        self.log.info("stopped")

    async def _close_probers(self) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        for prober in runtime.probers.values():
            await prober.aclose()
        if runtime.verifier is not None:
            await runtime.verifier.aclose()

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                self.log.info("stopping", signal=signal.Signals(signum).name)
                self.sd.stopping()
                guard = self.guard
                if guard is not None:
                    # Under the lock: a switch in flight finishes (or is undone) first, and
                    # `stopped` reaches the outbox before the notifier is cancelled.
                    with anyio.move_on_after(guard.switch_limit() + 5):
                        async with guard.lock:
                            guard.record(
                                "stopped",
                                target=guard.active,
                                reason=f"{signal.Signals(signum).name} received",
                            )
                scope.cancel()
                return

    async def _probe_loop(self, color: Color) -> None:
        guard = self.guard
        assert guard is not None  # noqa: S101
        due = self._cadence_epoch
        while True:
            await self.faults.reach(f"probe_{color}")
            started = self.clock.monotonic()
            self._probe_started[color] = started
            result = await self._guarded_probe(f"probe_{color}", self.probers[color])
            self._probe_started[color] = None
            if result is not None:
                self._record_probe(color, result)
            if result is not None and guard.observe(color, result):
                self._wake.set()
            self._first_round[color].set()
            due = await self._next_round(due, started, guard.cadence(color))

    def _record_probe(self, color: Color, result: ProbeResult) -> None:
        self._record(
            "probe", color, result.outcome.value, result.latency_s, result.error, result.status
        )

    async def _front_door_loop(self) -> None:
        """Probe `switch.verify_url` at the probe cadence, so the front door is evidence.

        The verifier is looked up each round: a reload may set, change or remove
        `switch.verify_url`, and the answers of an old front door say nothing of a new one.
        """
        guard = self.guard
        assert guard is not None  # noqa: S101
        last: HttpProber | None = None
        due = self._cadence_epoch
        while True:
            started = self.clock.monotonic()
            verifier = guard.verifier
            if verifier is not last:
                if last is not None:
                    guard.machine.front_door.restart()
                last = verifier
            if verifier is None:
                self._front_door_answered.set()
                # Nothing to probe until a reload sets `switch.verify_url`: wait for that
                # rather than wake every interval to look (an idle wake-up of each of many
                # instances on a host).
                await self._verifier_changed.wait()
                self._verifier_changed = anyio.Event()
                due = self.clock.monotonic()
                continue

            def replaced(current: HttpProber = verifier) -> bool:
                # A reload replaced (and closed) it mid-probe: not a bug, and no answer.
                return guard.verifier is not current

            # The verifier sends `Connection: close`: every answer comes on a fresh
            # connection, from the workers nginx runs now.
            result = await self._guarded_probe(
                "front_door", verifier, " the front door", replaced=replaced
            )
            if result is None:
                continue
            # An answer naming another color than the target's fails here (with
            # switch.verify_header): nginx serves something else than guardd switched to.
            result = guard.front_door_answer(result, guard.active)
            self._record("front_door", result.ok, result.error)
            if guard.observe_front_door(result):
                self._wake.set()
            self._front_door_answered.set()
            due = await self._next_round(due, started, guard.s.probe_interval)

    @property
    def _grid(self) -> tuple[float, float]:
        """The probe loops' shared cadence, `(epoch, step)` in monotonic s: see `next_round`."""
        return (self._cadence_epoch, self.settings.config.probe.interval)

    async def _next_round(self, due: float, started: float, interval: float) -> float:
        """Sleep until the next round of a probe loop is due, and return when that is.

        `due` is when the round just ended was due and `started` when it began (monotonic
        s); `interval` is the loop's cadence now (s). See `next_round`.
        """
        now = self.clock.monotonic()
        due = next_round(due, started, now, interval, self._grid)
        await anyio.sleep(max(0.0, due - now))
        return due

    async def _guarded_probe(
        self,
        loop: str,
        prober: HttpProber,
        subject: str = "",
        *,
        replaced: Callable[[], bool] | None = None,
    ) -> ProbeResult | None:
        """One probe round of `loop` (`probe_<color>`, `front_door`) that cannot stop the daemon.

        Probers turn whatever an upstream sends into an outcome; an exception here is a
        bug in guardd. It is logged (with its traceback, once), counted, journaled as an
        `alert`, and the round counts as failed (`probe_error`): guardd cannot vouch for
        what it could not probe. The loop goes on. None when `replaced` says the prober
        was swapped out meanwhile: its exception then says nothing.
        """
        started = self.clock.monotonic()
        try:
            await self.faults.fail(f"raise_in_{loop}")
            return await prober.probe()
        except Exception as e:  # noqa: BLE001 - the guarantee: one loop's bug never ends guardd
            if replaced is not None and replaced():
                return None
            what = self.loop_failed(loop, e)
            return ProbeResult(
                Outcome.PROBE_ERROR,
                self.clock.monotonic() - started,
                f"guardd could not probe{subject}: {what}",
            )

    def loop_failed(self, loop: str, error: Exception) -> str:
        """Account for an unexpected exception in `loop`; a one-line description of it."""
        what = redact(f"{type(error).__name__}: {error}")[:300]
        self.metrics.loop_error(loop)
        seen = (loop, type(error).__name__, what)
        if seen in self._loop_errors_seen:
            return what
        if len(self._loop_errors_seen) < _MAX_LOOP_ERRORS_SEEN:
            self._loop_errors_seen.add(seen)
        self.log.error("loop_error", loop=loop, error=what, exc_info=error)
        if self.guard is not None:
            self.guard.record(
                "alert",
                reason=f"unexpected error in the {loop} loop, which goes on: {what}",
                loop=loop,
            )
        return what

    async def _start_signals(self, tg: anyio.abc.TaskGroup, runtime: Runtime) -> None:
        """Start the runtime's signal adapters not running yet (and the pulse, once)."""
        for adapter in runtime.signals.values():
            if id(adapter) not in self._signal_scopes:
                await tg.start(self._run_signal, adapter)
        if runtime.signals and not self._pulsing:
            self._pulsing = True
            tg.start_soon(self._signal_pulse)

    async def _run_signal(self, adapter: Signal, *, task_status: TaskStatus[None]) -> None:
        """Run one signal adapter until a reload replaces it or guardd stops.

        An adapter that fails is logged, counted and started again a second later: a
        signal is evidence, never a reason for the guard to stop guarding. Its rules are
        inconclusive meanwhile (its window ages; a `stale_after` alerts).
        """
        with anyio.CancelScope() as scope:
            self._signal_scopes[id(adapter)] = scope
            task_status.started()
            try:
                while True:
                    try:
                        await adapter.run()
                    except Exception as e:  # noqa: BLE001 - evidence, never fatal
                        self.log.error("signal_failed", signal=adapter.name, error=_why(e))
                        self.metrics.loop_error(f"signal_{adapter.name}")
                    await anyio.sleep(1.0)
            finally:
                self._signal_scopes.pop(id(adapter), None)

    def _lines_counted(self) -> None:
        """A file signal counted new lines (called by the adapter, on the event loop)."""
        self._lines_seen.set()

    async def _signal_pulse(self) -> None:
        """Wake the decision loop as soon as a file signal counted new lines, not a probe
        later, and at most once every `_SIGNAL_PULSE_S`.

        Woken by the lines themselves, a rule over real requests acts as its tail reads
        them (its poll, 0.2 s on a quiet log), without a tick per log line under a flood,
        and a guard whose logs are quiet never wakes for them.
        """
        last = -math.inf
        while True:
            await self._lines_seen.wait()
            wait = last + _SIGNAL_PULSE_S - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
            # Lines counted from here on wake the next pulse; those before are in this tick.
            self._lines_seen = anyio.Event()
            last = anyio.current_time()
            self._wake.set()

    async def _decision_loop(self) -> None:
        guard = self.guard
        assert guard is not None  # noqa: S101
        while True:
            period = self.settings.config.probe.interval
            if self.sd.watchdog_interval:
                period = min(period, self.sd.watchdog_interval / 2)
            self._next_tick_by = self.clock.monotonic() + period
            with anyio.move_on_after(period):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self.faults.reach("stall_tick")
            if guard.lock.locked():
                # An operator's switch holds it, for seconds maybe: see below.
                self._next_tick_by = math.inf
            async with guard.lock:
                # Unknown while it ticks: a tick that acts (a switch, its verification)
                # takes seconds, and a record made meanwhile must not wait for it to end.
                # (Set once the lock is held: taking it yields even when it is free, and
                # the rounds' records then are this tick's.)
                self._next_tick_by = math.inf
                # (The switch lock taken again at once if its file went: before a second
                # guardd takes it.)
                guard.may_switch()
                await guard.tick()
            self.sd.status(guard.status_line())
            self._after_tick(period)

    def probes_stuck(self) -> bool:
        """Whether a probe loop is wedged past its own deadline."""
        now = self.clock.monotonic()
        limit = self.settings.config.probe.timeout + _STUCK_MARGIN
        return any(t is not None and now - t > limit for t in self._probe_started.values())

    def _switching_in_time(self, guard: Guard) -> bool:
        started = guard.switch_started if guard.rolling_back else None
        limit = guard.switch_limit() + _STUCK_MARGIN
        return started is not None and self.clock.monotonic() - started <= limit

    async def _watchdog_loop(self, every: float) -> None:
        guard = self.guard
        assert guard is not None  # noqa: S101
        seen = -1
        while True:
            if guard.ticks != seen and not self.probes_stuck():
                self.sd.watchdog()
                seen = guard.ticks
            elif self._switching_in_time(guard):
                # The tick waits on a switch that is still within switch.timeout: that is
                # progress, and killing guardd mid-switch would only add a restart to it.
                self.sd.watchdog()
            elif guard.ticks == seen:
                self.log.warning("watchdog_withheld", reason="the decision tick has not advanced")
            # At the last probe round before `every` is up, in the wake-up that round
            # costs anyway; `every` itself if the rounds are further apart than half of it.
            now = self.clock.monotonic()
            at = last_point_by(now + every, self._grid)
            await anyio.sleep((at if at > now + every / 2 else now + every) - now)

    # ---- reload ------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: validate the file again; apply it, or keep the old config and say why.

        Every section is applied except `RESTART_ONLY`; those keep their running values
        until the next start, and `config_reloaded` names them in `restart_required`.
        """
        guard = self.guard
        assert guard is not None  # noqa: S101
        self.sd.reloading()
        old = self.settings
        try:
            # With the host's checks, as `check-config` makes them: a config that names an
            # nginx target that is not there would only fail at the next rollback. (A start
            # skips them: with no previous config to keep, guarding on probes beats none.)
            # In a worker thread: they read files and resolve names as nginx would, which
            # must not stall the probes and decisions meanwhile.
            loaded = await anyio.to_thread.run_sync(
                functools.partial(
                    config_mod.load,
                    self.settings.source,
                    instance=self.instance_arg,
                    host_checks=True,
                )
            )
            changed = changed_keys(old.config, loaded.config)
            if self.instance_arg is not None and "instance" in changed:
                changed.remove("instance")  # --instance wins over the file: nothing changes
            restart_required = [k for k in changed if _restart_only(k)]
            # What is opened at start stays as it is, so that state.dir (the journal, the
            # outbox) and the socket are not half moved by the parts that follow them.
            new = Settings(
                loaded.config.model_copy(
                    update={
                        "instance": old.config.instance,
                        "state": old.config.state,
                        "control": old.config.control,
                        "qos": loaded.config.qos.model_copy(
                            update={"lock_file": old.config.qos.lock_file}
                        ),
                    }
                ),
                source=loaded.source,
                instance=old.instance,
                warnings=loaded.warnings,
            )
            # Built before anything is applied: a sink whose URL cannot be resolved now
            # rejects the whole reload, as an invalid file does.
            runtime = self.build_runtime(new, self.runtime)
            before = self.runtime.notifier if self.runtime is not None else None
            if runtime.notifier is not before and "notify" not in changed:
                changed.append("notify")  # the same keys, resolved to a rotated URL
        except (ConfigError, SwitchLockError) as e:
            self._release_switch_locks(keep=old)
            problems = [str(p) for p in e.problems] if isinstance(e, ConfigError) else [str(e)]
            for problem in problems:
                self.log.error("config_invalid", problem=problem)
            said = "; ".join(problems)[:900]
            guard.record(
                "alert", reason=f"reload rejected, still running the previous config: {said}"
            )
            # Until a reload is taken, `status` says so: the journal's alert scrolls away.
            guard.reload_rejected = (
                f"config: the reload at {rfc3339(self.clock.wall())} was rejected, and guardd "
                f"still runs the config it had: {said}"
            )
            self.sd.status(guard.status_line())
            self.sd.ready()
            return
        for warning in new.warnings:
            self.log.warning("config_warning", problem=str(warning))
        async with guard.lock:
            keep = await self.install(runtime)
            if old.config.metrics != new.config.metrics:
                served = self.metrics_server is not None
                if self.metrics_server is not None:
                    self.metrics_server.close()
                    self.metrics_server = None
                why = self._start_metrics()
                if why is not None and served:
                    # Scraped until now: keep serving where Prometheus looks, and say so.
                    self._start_metrics(old.config.metrics.listen)
                    guard.record(
                        "alert",
                        reason=f"metrics.listen {new.config.metrics.listen} cannot be served "
                        f"({why}); /metrics stays on {old.config.metrics.listen}",
                    )
            guard.reload_rejected = None
            guard.restart_pending = [
                k for k in changed_keys(self._started_config, loaded.config) if _restart_only(k)
            ]
            guard.record(
                "config_reloaded",
                reason="configuration reloaded"
                + (
                    f"; the changes to {', '.join(restart_required)} take effect at the "
                    "next restart"
                    if restart_required
                    else ""
                ),
                kept_history=sorted(keep),
                changed=changed,
                restart_required=restart_required,
            )
        self.sd.status(guard.status_line())
        self.sd.ready()


def _restart_only(key: str) -> bool:
    """Whether a reload leaves changed `key` (dotted) as it was until the next start:
    `RESTART_ONLY`, and every `[fleet]` key (its client, lease and node name are the
    running process's: a new `[fleet]` is joined at the next start)."""
    return key in RESTART_ONLY or key.split(".", 1)[0] == "fleet"


def _same_sinks(notifier: Any, settings: Settings) -> bool:
    """Whether `notifier` sends where `settings`' `[[notify]]` resolve to now.

    `url_env` and `url_file` name the same variable or file after a credential is rotated
    (systemd's `LoadCredential`, then a reload): the config alone does not tell. Resolving
    them also checks them, as at start: raises `ConfigError` when one cannot be resolved.
    """
    if notifier is None:
        return True
    from guardd.notify import sinks_from_config  # noqa: PLC0415 - only when configured

    source = str(settings.source)
    resolved = sinks_from_config(settings.config.notify, environ=os.environ, source=source)
    return bool(tuple(resolved) == notifier.sinks)


def _urls(c: GuardConfig, color: Color) -> list[str]:
    return c.upstreams[color].all_urls


def _why(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)
