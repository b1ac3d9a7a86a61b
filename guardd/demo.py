"""`guardd demo`: a real rollback from green to blue, start to finish, in under a minute.

Everything is real and local: two HTTP upstreams and a webhook receiver in threads, a
private nginx when one is on PATH (else the state-file switcher), and `guardd run` as a
subprocess that the demo watches through its control socket and journal, as an operator
would. All of it lives in one temporary directory and is stopped and removed on the way
out, also on Ctrl-C, SIGTERM and errors.

The failure shown depends on what can see it. Behind nginx, a load generator sends real
requests through it, nginx logs them in guardd's log_format, and green's `/api` starts
failing while its `/healthz` stays UP: only the traffic rule over the access log can catch
that. With the state-file switcher (no nginx, no access log) green answers 503 to
everything and the probes catch it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO, TypeVar

import guardd
from guardd._demo.nginx import Nginx, NginxFailed, find_nginx, terminate
from guardd._demo.servers import Receiver, Upstream
from guardd._demo.traffic import Traffic
from guardd._demo.view import Frame, View, clean
from guardd.control.client import call
from guardd.exceptions import ControlError

__all__ = ["run_demo"]

T = TypeVar("T")
S = TypeVar("S", Upstream, Receiver)

INSTANCE: Final = "demo"
THRESHOLD: Final = 3
QOS_WINDOW: Final = "10s"
STEADY_S: Final = 3.0
TICK_S: Final = 0.1
# Proof that nginx serves blue: this many fresh connections in a row answered by blue.
# One could still reach an old worker draining after the reload; a handful cannot.
FRONT_DOOR_STREAK: Final = 5
WEBHOOK_ENV: Final = "GUARDD_DEMO_WEBHOOK_URL"
# The traffic scene: requests per second through nginx, and the rule that judges them.
TRAFFIC_RATE: Final = 50.0
TRAFFIC_SIGNAL: Final = "traffic"
TRAFFIC_RULE: Final = f"{TRAFFIC_SIGNAL}.error_ratio"
TRAFFIC_ABOVE: Final = 0.05
TRAFFIC_MIN_SAMPLES: Final = 50
TRAFFIC_WINDOW: Final = "10s"
EXIT_INTERRUPTED: Final = 130
# sockaddr_un holds 108 bytes: a long $TMPDIR would not fit the control socket's path.
_MAX_SOCKET_PATH: Final = 100
# Journal events narrated as they are appended.
_NARRATED: Final = frozenset(
    {
        "started",
        "rollback_started",
        "rollback_completed",
        "rollback_failed",
        "qos_locked",
        "qos_extended",
        "qos_released",
        "hold",
        "alert",
    }
)
_STATUS_MEANING: Final = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}


class DemoFailed(Exception):
    """The demo could not show what it promised; the message says why."""


def run_demo(*, seconds: float = 45.0, stream: TextIO | None = None) -> int:
    """Run the demo for at most `seconds`; 0 when green was rolled back to blue as expected."""
    demo = _Demo(max(seconds, 1.0), stream or sys.stdout)
    restore = _trap_signals()
    try:
        return demo.run()
    except KeyboardInterrupt:
        demo.view.say("")
        demo.view.say(demo.view.bad("interrupted") + ": stopping everything the demo started")
        return EXIT_INTERRUPTED
    except DemoFailed as e:
        demo.view.say(demo.view.bad(f"✗ {e}"))
        demo.show_log_tail()
        return 1
    except Exception as e:  # noqa: BLE001 - a newcomer gets one clear line, not a traceback
        demo.view.say(demo.view.bad(f"✗ the demo broke: {type(e).__name__}: {e}"))
        demo.show_log_tail()
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave nginx behind; every step
        # of the cleanup is bounded, so ignoring signals for its duration is safe.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):
                signal.signal(signum, signal.SIG_IGN)
        try:
            demo.cleanup()
        finally:
            restore()
            if demo.view.gone and demo.view.stream is sys.stdout:
                # The reader left (`| head`): let the interpreter's last flush hit /dev/null.
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _trap_signals() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP interrupt the demo like Ctrl-C; return the undo."""
    saved: dict[int, Any] = {}

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for signum, handler in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, interrupt),
        (signal.SIGHUP, interrupt),
    ):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            saved[signum] = signal.signal(signum, handler)

    def restore() -> None:
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    return restore


class _Journal:
    """Reads `events.jsonl` as guardd appends to it, a whole line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0

    def poll(self) -> list[dict[str, Any]]:
        """The events appended since the last poll."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete, newline, _ = chunk.rpartition(b"\n")
        if not newline:
            return []
        self._offset += len(complete) + 1
        new = []
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    new.append(event)
        self.events += new
        return new

    def find(self, name: str) -> dict[str, Any] | None:
        """The last event called `name` seen so far."""
        return next((e for e in reversed(self.events) if e.get("event") == name), None)


@dataclass(frozen=True)
class _Lab:
    """Everything the demo started, once it all runs."""

    tmp: Path
    blue: Upstream
    green: Upstream
    receiver: Receiver
    nginx: Nginx | None  # None: the state-file switcher moves traffic
    state_file: Path
    config: Path
    socket: Path
    lock_file: Path
    journal: _Journal
    guardd: subprocess.Popen[bytes]
    traffic: Traffic | None  # None: no nginx, no access log, the probe scene


@dataclass(frozen=True)
class _Outcome:
    """What the demo saw after the rollback, checked at the end."""

    serving_blue: bool
    lock_seen: bool
    notified: bool
    # The traffic scene: the rule that rolled back (it must be the traffic rule) and the
    # real requests it judged; None in the probe scene.
    rule: str | None = None
    requests: int | None = None


class _Demo:
    """One run of the demo; `cleanup` undoes whatever `run` got to start."""

    def __init__(self, seconds: float, stream: TextIO) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.view = View(stream)
        self.log_path: Path | None = None
        self.last_status: dict[str, Any] | None = None
        # Undo steps, run last-in first-out: guardd stops before nginx, the workspace goes last.
        self._undo: list[tuple[str, Callable[[], str | None]]] = []
        self._guardd: subprocess.Popen[bytes] | None = None
        self._traffic = False  # the traffic scene is on (set once nginx and guardd run)

    # -- the story -------------------------------------------------------------------------

    def run(self) -> int:
        """Set the scene, break green, watch guardd roll back, and check the result."""
        v = self.view
        v.say(
            v.bold("guardd demo") + ": a real rollback from green to blue "
            f"(at most {self.seconds:g}s, Ctrl-C stops it)"
        )
        lab = self._setup()
        v.say("")
        # A tight --seconds shortens the calm before the failure, not the failure's story.
        steady = min(STEADY_S, max(0.5, self._left() / 4))
        how = "live table below" if v.live else "a line a second and on every change"
        v.say(
            f"Watching steady state for {round(steady, 1):g}s: green serves, blue stands by "
            f"({how}):"
        )
        calm_until = min(time.monotonic() + steady, self.deadline)
        self._watch(lab, lambda: time.monotonic() >= calm_until or None, "steady state")

        injected = self._break_api(lab) if lab.traffic is not None else self._break_green(lab)
        completed = self._watch(lab, lambda: self._rollback_done(lab), "the rollback")
        v.say("")
        took = _since(completed.get("ts"), injected)
        v.say(
            v.good("✓ guardd rolled back green -> blue")
            + (f", {took:.1f}s after green began to fail" if took is not None else "")
        )
        rule, requests = self._show_traffic_rule(lab) if lab.traffic is not None else (None, None)
        outcome = _Outcome(
            serving_blue=self._check_serving_blue(lab),
            lock_seen=self._show_lock(lab),
            notified=self._show_notification(lab),
            rule=rule,
            requests=requests,
        )
        if lab.traffic is not None:
            self._show_traffic(lab.traffic)
        self._refresh(lab)
        v.close()
        self._final_status(lab)
        return self._verdict(outcome)

    def _break_green(self, lab: _Lab) -> float:
        """The probe scene: green fails every request; when it began (wall clock)."""
        lab.green.failing.set()
        injected = time.time()
        v = self.view
        v.say("")
        v.say(
            v.bad("▶ Injecting a failure: green now answers 503 to every request")
            + f" (P0 after {THRESHOLD} failed probes in a row)"
        )
        return injected

    def _break_api(self, lab: _Lab) -> float:
        """The traffic scene: green's /api fails, its /healthz does not; when it began."""
        lab.green.api_failing.set()
        injected = time.time()
        v = self.view
        errors, period = Upstream.API_ERRORS, Upstream.API_PERIOD
        v.say("")
        v.say(
            v.bad(
                f"▶ Injecting a failure only real traffic shows: green's /api now answers 500 "
                f"to {errors} requests in {period}"
            )
        )
        v.say(
            '  green\'s /healthz still answers 200 {"status":"UP"}: every probe keeps '
            "passing, and no probe rule will fire"
        )
        v.say(
            f"  P0 when rule {TRAFFIC_RULE} sees 5xx in >= {TRAFFIC_ABOVE:.0%} of at least "
            f"{TRAFFIC_MIN_SAMPLES} requests in nginx's access log ({TRAFFIC_WINDOW} window)"
        )
        return injected

    def _show_traffic_rule(self, lab: _Lab) -> tuple[str | None, int | None]:
        """Which rule rolled back, over how many real requests, and what the probes said."""
        v = self.view
        started = lab.journal.find("rollback_started") or {}
        evidence = started.get("evidence")
        evidence = evidence if isinstance(evidence, dict) else {}
        rule, samples, value = (evidence.get(k) for k in ("rule", "samples", "value"))
        rule = rule if isinstance(rule, str) else None
        requests = samples if isinstance(samples, int) else None
        ratio = f"{value:.1%}" if isinstance(value, int | float) else "?"
        v.say(
            f"  by rule {clean(rule or '?')}: {ratio} of {requests} real requests nginx logged "
            f"for green answered 5xx (threshold {TRAFFIC_ABOVE:.0%})"
        )
        upstreams = (self.last_status or {}).get("upstreams")
        green = upstreams.get("green") if isinstance(upstreams, dict) else None
        if isinstance(green, dict):
            healthy = "healthy" if green.get("healthy") else "NOT healthy"
            v.say(
                f"  green's probes meanwhile: {healthy}, {green.get('consecutive_failures')} "
                "failed in a row: a guard watching /healthz alone would not have moved"
            )
        return rule, requests

    def _show_traffic(self, traffic: Traffic) -> None:
        """What the load generator got, by color and status, once blue has answered it."""
        v = self.view
        self._until(
            lambda: any(c == "blue" for c, _ in traffic.counts()),
            "traffic to reach blue",
            required=False,
            poll=TICK_S,
        )
        v.say(f"✓ traffic: {_traffic_text(traffic)}")

    def _setup(self) -> _Lab:
        v = self.view
        tmp = self._workspace()
        v.say(f"  workspace  {tmp}/ (removed at the end)")
        blue = self._started(Upstream("blue"), "upstreams stopped")
        green = self._started(Upstream("green"), None)
        receiver = self._started(Receiver(secrets.token_hex(8)), "webhook stopped")
        v.say(f'  blue       {blue.url}   answers 200 {{"status":"UP"}}')
        v.say(f'  green      {green.url}   answers 200 {{"status":"UP"}}')
        state_file = tmp / "deploy-state.json"
        nginx = self._start_nginx(tmp, blue, green)
        if nginx is None:
            state_file.write_text(json.dumps({"app": "demo", "activeColor": "green"}) + "\n")
            v.say(f"  switch     {state_file}   activeColor: green")
        v.say(
            f"  webhook    http://127.0.0.1:{receiver.port}/hooks/…   "
            "a local receiver standing in for Slack"
        )
        config = tmp / f"{INSTANCE}.toml"
        lab_socket = tmp / f"{INSTANCE}.sock"
        lock_file = tmp / f"{INSTANCE}.qos.lock"
        journal = _Journal(tmp / "state" / "events.jsonl")
        config.write_text(
            _config(
                blue=blue,
                green=green,
                nginx=nginx,
                state_file=state_file,
                lock_file=lock_file,
                control_socket=lab_socket,
                state_dir=journal.path.parent,
            )
        )
        guardd_process = self._start_guardd(tmp, config, receiver.url)
        traffic = None
        if nginx is not None:
            self._traffic = True
            traffic = self._start_traffic(nginx.port)
            v.say(
                f"  traffic    GET http://127.0.0.1:{nginx.port}/api/orders at "
                f"{TRAFFIC_RATE:g} req/s, logged by nginx to {nginx.traffic_log}"
            )
        return _Lab(
            tmp=tmp,
            blue=blue,
            green=green,
            receiver=receiver,
            nginx=nginx,
            state_file=state_file,
            config=config,
            socket=lab_socket,
            lock_file=lock_file,
            journal=journal,
            guardd=guardd_process,
            traffic=traffic,
        )

    def _workspace(self) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix="guardd-demo-"))
        if len(str(tmp / f"{INSTANCE}.sock")) > _MAX_SOCKET_PATH:
            tmp.rmdir()
            # mkdtemp makes a private 0700 directory; /tmp only for a short socket path.
            tmp = Path(tempfile.mkdtemp(prefix="guardd-demo-", dir="/tmp"))  # nosec B108

        def remove() -> str:
            shutil.rmtree(tmp, ignore_errors=True)
            return f"removed {tmp}"

        self._undo.append(("workspace", remove))
        return tmp

    def _started(self, server: S, note: str | None) -> S:
        """Start `server` and have cleanup close it; `note` is how the summary says so."""

        def close() -> str | None:
            server.close()
            return note

        self._undo.append((note or "a server", close))
        return server.start()

    def _start_nginx(self, tmp: Path, blue: Upstream, green: Upstream) -> Nginx | None:
        """A private nginx in front of the colors, or None (and why) for the state file."""
        v = self.view
        binary = find_nginx()
        if binary is None:
            hint = (
                " (there is /usr/sbin/nginx: put /usr/sbin on PATH to use it)"
                if Path("/usr/sbin/nginx").exists()
                else ""
            )
            v.say(
                f"  nginx      nginx not found on PATH{hint}: using the state-file switcher "
                "(deploy-state.json) instead of a real nginx"
            )
            return None
        nginx = Nginx(
            binary,
            tmp / "nginx",
            {"blue": blue.port, "green": green.port},
            active="green",
            traffic_log=True,
        )

        def stop() -> str | None:
            running = nginx.process is not None
            nginx.stop()
            return "nginx stopped" if running else None

        self._undo.append(("nginx", stop))  # before start(): a Ctrl-C inside it is covered
        try:
            nginx.start()
        except (NginxFailed, OSError) as e:
            nginx.stop()
            why = clean(" ".join(str(e).split()))[:200]
            v.say(
                f"  nginx      nginx did not start ({why}): using the state-file switcher "
                "(deploy-state.json) instead"
            )
            return None
        v.say(
            f"  nginx      {nginx.front_url}   private {nginx.version()} "
            f"(master pid {nginx.master_pid}), "
            f"{nginx.active_link.name} -> {nginx.targets['green'].name}"
        )
        return nginx

    def _start_traffic(self, port: int) -> Traffic:
        traffic = Traffic(port, TRAFFIC_RATE)

        def stop() -> str:
            traffic.stop()
            return "traffic stopped"

        self._undo.append(("traffic", stop))
        return traffic.start()

    def _start_guardd(self, tmp: Path, config: Path, webhook_url: str) -> subprocess.Popen[bytes]:
        v = self.view
        notify_path = tmp / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._undo.append(("notify socket", notify.close))
        notify.bind(str(notify_path))
        notify.settimeout(TICK_S)
        env = _child_env()
        env[WEBHOOK_ENV] = webhook_url
        env["NOTIFY_SOCKET"] = str(notify_path)
        self.log_path = tmp / "guardd.log"
        v.say(f"  guardd     guardd run --config {config}")
        v.say(f"             log: {self.log_path}")
        with self.log_path.open("wb") as log:
            # Its own session: the demo, not the terminal's Ctrl-C, decides when it stops.
            process = subprocess.Popen(
                [sys.executable, "-m", "guardd.cli", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._guardd = process

        def stop_guardd() -> str:
            # SIGTERM lets guardd finish or undo a switch in flight; 15 s is plenty here.
            return f"guardd stopped ({_exit_text(terminate(process, ((signal.SIGTERM, 15.0),)))})"

        self._undo.append(("guardd", stop_guardd))

        def ready() -> bool:
            self._check_alive()
            try:
                message = notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                return False
            return "READY=1" in message.splitlines()

        self._until(ready, "guardd to be ready")
        v.say(
            v.good("✓ guardd is ready") + f" (pid {process.pid}, READY=1 after its first "
            "probe round): green is active, blue is the rollback target"
        )
        return process

    def _rollback_done(self, lab: _Lab) -> dict[str, Any] | None:
        """The journal's `rollback_completed` green -> blue, once there."""
        done = lab.journal.find("rollback_completed")
        if done is not None:
            if done.get("from") == "green" and done.get("to") == "blue":
                return done
            raise DemoFailed(
                f"guardd rolled back {clean(done.get('from'))} -> "
                f"{clean(done.get('to'))}, not green -> blue"
            )
        for name in ("rollback_failed", "hold"):
            if (bad := lab.journal.find(name)) is not None:
                raise DemoFailed(f"guardd journaled {name}: {clean(bad.get('reason'))}")
        return None

    def _check_serving_blue(self, lab: _Lab) -> bool:
        v = self.view
        if lab.nginx is None:
            active = _state_file_color(lab.state_file)
            if active != "blue":
                v.say(v.bad("✗ deploy-state.json still says ") + f"activeColor: {active}")
                return False
            v.say(v.good("✓ deploy-state.json now says activeColor: blue") + f" ({lab.state_file})")
            return True
        nginx = lab.nginx
        answers: list[str] = []

        def streak() -> bool:
            answer = nginx.front_door()
            answers.append(_answer(answer))
            if answer != (200, "blue"):
                answers.clear()
            return len(answers) >= FRONT_DOOR_STREAK

        if not self._until(streak, "nginx to serve blue", required=False, poll=0.02):
            v.say(v.bad("✗ nginx does not serve blue only") + f": last answers {answers}")
            return False
        v.say(
            v.good("✓ nginx now serves blue") + f": {FRONT_DOOR_STREAK} fresh connections "
            f"to {nginx.front_url} all answered {answers[-1]}"
        )
        v.say(f"  {nginx.active_link.name} -> {nginx.active_link.readlink().name}")
        return True

    def _show_lock(self, lab: _Lab) -> bool:
        v = self.view
        if not self._until(lab.lock_file.exists, "the QoS lock file", required=False):
            v.say(v.bad("✗ no QoS lock file appeared at ") + str(lab.lock_file))
            return False
        v.say(
            v.good("✓ QoS lock taken") + ": deploys are blocked until blue meets its SLOs "
            f"for a {QOS_WINDOW} guard window"
        )
        v.say(f"  {lab.lock_file}:")
        with contextlib.suppress(OSError):
            text = lab.lock_file.read_text(errors="replace").strip()
            try:
                shown = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except ValueError:
                shown = text or "(empty)"
            for line in shown.splitlines():
                v.say("    " + clean(line))
        return True

    def _show_notification(self, lab: _Lab) -> bool:
        v = self.view
        body = self._until(
            lambda: lab.receiver.wait("rollback_completed", TICK_S), "the webhook", required=False
        )
        if body is None:
            v.say(v.bad("✗ the webhook got no rollback_completed notification in time"))
            return False
        v.say(
            v.good("✓ the webhook received the notification") + " (a generic webhook gets "
            "the journal event; Slack and Discord get a message):"
        )
        for line in json.dumps(_shorten(body), indent=2, ensure_ascii=False).splitlines():
            v.say("    " + clean(line))
        return True

    def _final_status(self, lab: _Lab) -> None:
        v = self.view
        argv = [*_guardctl(), "--socket", str(lab.socket), "--config", str(lab.config), "status"]
        v.say("")
        v.say(v.bold(f"$ guardctl --socket {lab.socket} status"))
        try:
            # guardctl writes to the terminal itself, colors and all, as an operator sees it.
            fileno = v.stream.fileno()
        except (OSError, ValueError):
            fileno = None
        timeout = max(5.0, self._left())
        if fileno is not None:
            code = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fileno,
                env=_child_env(),
                timeout=timeout,
                check=False,
            ).returncode
        else:  # a stream without a descriptor: relay what guardctl says
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=_child_env(),
                timeout=timeout,
                check=False,
            )
            v.say(done.stdout.rstrip())
            code = done.returncode
        meaning = _STATUS_MEANING.get(code, "?")
        if code == 1 and lab.lock_file.exists():
            meaning += ", as it should be while the QoS lock is held"
        v.say(v.dim(f"(guardctl status exited {code}: {meaning})"))

    def _verdict(self, outcome: _Outcome) -> int:
        v = self.view
        v.say("")
        traffic_ok = outcome.rule == TRAFFIC_RULE or (outcome.rule is None and not self._traffic)
        if outcome.serving_blue and outcome.lock_seen and traffic_ok:
            told = " and notified the webhook" if outcome.notified else ""
            if self._traffic:
                v.say(
                    v.good("✓ demo passed") + ": green's /api failed while its /healthz stayed "
                    f"UP; rule {outcome.rule} rolled back to blue on {outcome.requests} real "
                    f"requests, journaled why, took the QoS lock{told}."
                )
            else:
                v.say(
                    v.good("✓ demo passed") + ": green failed, guardd moved traffic back to "
                    f"blue, journaled why, took the QoS lock{told}."
                )
            v.say("  Next: README.md, config/example.toml, `guardctl --help`.")
            return 0
        missing = [
            what
            for what, ok in (
                ("traffic on blue", outcome.serving_blue),
                ("the QoS lock", outcome.lock_seen),
                (f"the traffic rule {TRAFFIC_RULE} (rule {outcome.rule} fired)", traffic_ok),
            )
            if not ok
        ]
        v.say(
            v.bad("✗ demo failed")
            + ": the rollback was journaled, but without "
            + " and ".join(missing)
        )
        self.show_log_tail()
        return 1

    # -- watching --------------------------------------------------------------------------

    def _watch(self, lab: _Lab, done: Callable[[], T | None], what: str) -> T:
        """Refresh the live view every tick until `done()` returns something."""
        while True:
            self._refresh(lab)
            result = done()
            if result is not None:
                return result
            if self._left() <= 0:
                raise DemoFailed(self._why_not(what))
            time.sleep(TICK_S)

    def _until(
        self, done: Callable[[], T], what: str, *, required: bool = True, poll: float = 0.0
    ) -> T | None:
        """Poll `done()` until truthy; at the deadline fail, or return None if not `required`."""
        while True:
            result = done()
            if result:
                return result
            if self._left() <= 0:
                if required:
                    raise DemoFailed(self._why_not(what))
                return None
            if poll:
                time.sleep(poll)

    def _refresh(self, lab: _Lab) -> None:
        """One look at guardd: status over the control socket, the journal, the traffic."""
        self._check_alive()
        status: dict[str, Any] | None
        try:
            status = call(lab.socket, "status", timeout=1.0)
        except ControlError:
            status = None
        self.last_status = status or self.last_status
        for event in lab.journal.poll():
            self._narrate(event)
        if lab.nginx is not None:
            serving = "nginx -> " + _answer(lab.nginx.front_door(timeout=1.0))
        else:
            serving = f"deploy-state.json says {_state_file_color(lab.state_file)}"
        load = "" if lab.traffic is None else _traffic_text(lab.traffic, short=True)
        self.view.update(Frame(status, serving, THRESHOLD, load))

    def _narrate(self, event: dict[str, Any]) -> None:
        name = str(event.get("event"))
        if name not in _NARRATED:
            return
        source, target = event.get("from"), event.get("to")
        if source and target:
            move = f" {source} -> {target}"
        elif name == "started":
            move = f" (active {source or target or 'unknown'})"
        else:
            move = ""
        severity = f" [{event['severity']}]" if event.get("severity") else ""
        text = f"  journal: {name}{move}{severity}"
        evidence = event.get("evidence")
        if name == "rollback_started" and isinstance(evidence, dict):
            text += (
                f" rule {evidence.get('rule')}: value {evidence.get('value')} >= "
                f"threshold {evidence.get('threshold')} over {evidence.get('samples')} samples"
            )
        elif name.startswith("qos_") and event.get("until"):
            text += f" until {event['until']}"
        elif name == "rollback_completed" and event.get("duration_ms") is not None:
            text += f" (switched in {event['duration_ms']}ms)"
        elif name != "started" and event.get("reason"):
            text += f": {event['reason']}"
        v = self.view
        v.say(v.bad(clean(text)) if name in ("rollback_failed", "hold") else clean(text))

    def _check_alive(self) -> None:
        if self._guardd is not None and self._guardd.poll() is not None:
            raise DemoFailed(f"guardd exited with status {self._guardd.returncode}")

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _why_not(self, what: str) -> str:
        why = f"gave up waiting for {what}: the demo's {self.seconds:g}s (--seconds) were up"
        status = self.last_status
        if status is not None:
            upstreams = status.get("upstreams")
            green = upstreams.get("green") if isinstance(upstreams, dict) else None
            fails = green.get("consecutive_failures") if isinstance(green, dict) else None
            why += (
                f"; guardd is {status.get('state')}, active {status.get('active')}, "
                f"green failed {fails} of {THRESHOLD} probes in a row"
            )
            if self._traffic:
                why += f", {_rule_text(status, TRAFFIC_RULE)}"
            last = status.get("last_event")
            if isinstance(last, dict):
                why += f", last event {last.get('event')}"
        return clean(why)

    def show_log_tail(self, lines: int = 12) -> None:
        """The end of guardd's log, since the workspace holding it is about to go."""
        if self.log_path is None or not self.log_path.exists():
            return
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            self.view.say(self.view.dim(f"last lines of {self.log_path}:"))
            for line in tail:
                self.view.say(self.view.dim("  " + clean(line)[:300]))

    # -- the way out -----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Undo everything `run` started, newest first; safe to call at any point."""
        self.view.close()
        said: list[str] = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                note = undo()
            except Exception as e:  # noqa: BLE001 - one failed step must not skip the rest
                note = f"{what} FAILED to stop ({type(e).__name__}: {e})"
            if note:
                said.append(note)
        self._guardd = None
        if said:
            self.view.say(self.view.dim("cleaned up: " + ", ".join(said)))


def _config(
    *,
    blue: Upstream,
    green: Upstream,
    nginx: Nginx | None,
    state_file: Path,
    lock_file: Path,
    control_socket: Path,
    state_dir: Path,
) -> str:
    """The demo's guardd config: fast probes, P0 after three failures, a short guard window."""
    lines = [
        "# written by `guardd demo`; see config/example.toml for every key",
        f"instance = {_s(INSTANCE)}",
        "",
        "[upstreams.blue]",
        f"url = {_s(blue.url)}",
        "[upstreams.green]",
        f"url = {_s(green.url)}",
        "",
        "[probe]",
        'interval = "200ms"',
        'fast_interval = "100ms"',
        'timeout = "1s"',
        'expect_json = { status = "UP" }',
        "",
        "[policy]",
        'rollback_to = "blue"',
        f"consecutive_failures = {THRESHOLD}",
        'window = "30s"',
        "min_samples = 5",
        "",
        "[switch]",
        'timeout = "10s"',
    ]
    if nginx is not None:
        lines += [
            'kind = "nginx"',
            f"active_link = {_s(str(nginx.active_link))}",
            f"test_command = {_argv(nginx.test_command)}",
            f"reload_command = {_argv(nginx.reload_command)}",
            f"verify_url = {_s(nginx.front_url)}",
            "verify_successes = 3",
            "[switch.targets]",
            *(f"{color} = {_s(str(path))}" for color, path in nginx.targets.items()),
        ]
    else:
        lines += ['kind = "state-file"', f"path = {_s(str(state_file))}"]
    if nginx is not None and nginx.traffic_log is not None:
        # The requests nginx logs, attributed to a color by the server lines of
        # switch.targets; the rule rolls back on 5xx in real traffic, whatever the probes say.
        lines += [
            "",
            f"[signals.{TRAFFIC_SIGNAL}]",
            'kind = "access_log"',
            f"source = {_s('file:' + str(nginx.traffic_log))}",
            f"window = {_s(TRAFFIC_WINDOW)}",
            "",
            "[[rules]]",
            f"signal = {_s(TRAFFIC_SIGNAL)}",
            'stat = "error_ratio"',
            f"above = {TRAFFIC_ABOVE}",
            'severity = "P0"',
            f"min_samples = {TRAFFIC_MIN_SAMPLES}",
        ]
    lines += [
        "",
        "[qos]",
        f"lock_file = {_s(str(lock_file))}",
        f"window = {_s(QOS_WINDOW)}",
        "",
        "[retry]",
        "attempts = 3",
        'base_delay = "100ms"',
        'max_delay = "1s"',
        "",
        "[metrics]",
        'listen = ""',
        "",
        "[control]",
        f"socket = {_s(str(control_socket))}",
        'mode = "0600"',
        "",
        "[state]",
        f"dir = {_s(str(state_dir))}",
        "",
        "[[notify]]",
        'kind = "webhook"',
        f"url_env = {_s(WEBHOOK_ENV)}",
        'events = ["rollback", "hold"]',
    ]
    return "\n".join(lines) + "\n"


def _rule_text(status: dict[str, Any], name: str) -> str:
    """`rule R on green: inconclusive (12 of 50 samples)`, from `status`'s `rules`."""
    rules = status.get("rules")
    row = (
        next(
            (r for r in rules if isinstance(r, dict) and r.get("rule") == name),
            None,
        )
        if isinstance(rules, list)
        else None
    )
    green = row.get("green") if isinstance(row, dict) else None
    if not isinstance(green, dict):
        return f"rule {name} not judged on green yet"
    why = f" ({green['why']})" if green.get("why") else ""
    return f"rule {name} on green: {green.get('state')}{why}, value {green.get('value')}"


def _traffic_text(traffic: Traffic, *, short: bool = False) -> str:
    """`N requests: green 200 x 120, green 500 x 12, blue 200 x 40` (short: per color only)."""
    counts = traffic.counts()
    total = sum(counts.values())
    if short:
        errors = sum(n for (_, status), n in counts.items() if status >= 500 or status == 0)
        return f"/api {total} sent, {errors} failed"
    parts = [
        f"{clean(color)} {status or 'no answer'} x {n}"
        for (color, status), n in sorted(counts.items(), key=lambda kv: (kv[0][0] != "green", kv))
    ]
    return f"{total} requests through nginx: " + ", ".join(parts)


def _exit_text(code: int) -> str:
    """`exit 0`, or the signal that ended a process still starting up."""
    if code >= 0:
        return f"exit {code}"
    with contextlib.suppress(ValueError):
        return f"by {signal.Signals(-code).name}"
    return f"signal {-code}"


def _guardctl() -> list[str]:
    """The real guardctl beside this interpreter, or the same entry point through it."""
    script = Path(sys.executable).with_name("guardctl")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from guardd.ctl import main; sys.exit(main())"]


def _child_env() -> dict[str, str]:
    """The environment for guardd and guardctl: the user's, minus what would bend the demo."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GUARDD_", "WATCHDOG_", "LISTEN_"))
        and k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")
    }
    # Wherever the demo was imported from, guardd and guardctl import the same code.
    root = str(Path(guardd.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _s(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


def _argv(argv: list[str]) -> str:
    return "[" + ", ".join(_s(a) for a in argv) + "]"


def _answer(answer: tuple[int, str | None] | None) -> str:
    if answer is None:
        return "no answer"
    status, color = answer
    return f"{clean(color or '?')} ({status})"


def _state_file_color(path: Path) -> str:
    try:
        return clean(json.loads(path.read_text()).get("activeColor"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _since(ts: object, start: float) -> float | None:
    """Seconds from the wall-clock `start` to the RFC 3339 `ts`."""
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp() - start
    except ValueError:
        return None


def _shorten(value: Any, depth: int = 0) -> Any:
    """`value` cut down for the screen: long strings clipped, nested objects summarized."""
    if isinstance(value, str):
        return value if len(value) <= 72 else value[:71] + "…"
    if isinstance(value, dict):
        keep = 12 if depth == 0 else 5
        items = list(value.items())
        out = {str(k): _shorten(v, depth + 1) for k, v in items[:keep]}
        if len(items) > keep:
            out["…"] = f"{len(items) - keep} more"
        return out
    if isinstance(value, list):
        return [_shorten(v, depth + 1) for v in value[:5]] + (["…"] if len(value) > 5 else [])
    return value
