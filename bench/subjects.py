"""The processes under measurement: guardd, the shell guard, monit, blackbox_exporter.

Each starts as a real process with its own files in a temp dir, the way an operator
would run it, and is stopped by pid. Nothing here measures: it only starts, waits
for readiness and stops.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.nginx import Front, free_port
from bench.notify import NotifyHub

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HEALTH_GUARD = HERE / "shell" / "health_guard.sh"
NGINX_SWITCH = HERE / "shell" / "nginx_switch.sh"
# What systemd's guardd@.service sets (WatchdogSec=10s): the watchdog loop runs as in production.
WATCHDOG_USEC = "10000000"


@dataclass
class Install:
    """Where the guardd under measurement lives: its `guardd`, `guardctl` and `python`."""

    bin: Path
    kind: str
    packages: list[str] = field(default_factory=list)

    @property
    def guardd(self) -> Path:
        """The daemon's entry point."""
        return self.bin / "guardd"

    @property
    def guardctl(self) -> Path:
        """The operator tool's entry point."""
        return self.bin / "guardctl"

    @property
    def python(self) -> Path:
        """The interpreter guardd runs on."""
        return self.bin / "python"


# The development venv until `bench.tools.runtime_install` provides a production-like one.
INSTALL = Install(Path(sys.executable).parent, "the development venv")


def toml_value(value: Any) -> str:
    """A Python value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int | None:
    """Signal one process we started, then wait for it (killing it after 20 s)."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Guardd:
    """One `guardd run` with its own config, state dir, control socket and lock file."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        upstreams: Mapping[str, Sequence[str]],
        interval: float,
        switch: Mapping[str, Any],
        fast_interval: float | None = None,
        quorum: str = "all",
        failures: int = 3,
        user_agent: str = "guardd-bench",
        metrics: bool = True,
        policy: Mapping[str, Any] | None = None,
        extra_toml: str = "",
        qos_window: str = "5m",
        probe: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = self.root / f"{name}.toml"
        self.state_dir = self.root / "state"
        self.socket = self.root / "run" / f"{name}.sock"
        self.lock_file = self.root / "run" / f"{name}.qos.lock"
        self.log_path = self.root / "guardd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # The build to run (`bench.ab`: two side by side); None: `INSTALL`'s.
        self.install: Install | None = None
        sections: dict[str, dict[str, Any]] = {
            "probe": {
                "interval": interval,
                "fast_interval": fast_interval if fast_interval is not None else interval,
                "timeout": 2.0,
                "expect_json": {"status": "UP"},
                "headers": {"User-Agent": user_agent},
                **(probe or {}),
            },
            "policy": {
                "rollback_to": "blue",
                "consecutive_failures": failures,
                "max_rollbacks": 1000,
                **(policy or {}),
            },
            "switch": dict(switch),
            "qos": {"lock_file": str(self.lock_file), "window": qos_window},
            "retry": {"attempts": 3, "base_delay": "50ms", "max_delay": "200ms"},
            "metrics": {"listen": "127.0.0.1:0" if metrics else ""},
            "control": {"socket": str(self.socket), "mode": "0660"},
            "state": {"dir": str(self.state_dir)},
        }
        lines = [f"instance = {toml_value(name)}", ""]
        for color, urls in upstreams.items():
            lines.append(f"[upstreams.{color}]")
            if len(urls) == 1:
                lines.append(f"url = {toml_value(urls[0])}")
            else:
                lines += [f"urls = {toml_value(list(urls))}", f"quorum = {toml_value(quorum)}"]
        for section, body in sections.items():
            targets = body.pop("targets", None)
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items() if v is not None]
            if targets:
                lines.append(f"[{section}.targets]")
                lines += [f"{c} = {toml_value(p)}" for c, p in targets.items()]
        # Tables written last: `[signals.NAME]` and `[[rules]]` end the file.
        self.config_path.write_text("\n".join(lines) + "\n" + extra_toml)

    @staticmethod
    def nginx_switch(
        front: Front, *, verify_successes: int = 3, link: Path | None = None
    ) -> dict[str, Any]:
        """A `[switch]` table for an nginx front, verified through it.

        `link`: an active link of the guard's own, made now pointing where the front's
        does, for a guard beside the one that switches the front (one guardd per link: the
        second would refuse to start). The front's nginx never reads it.
        """
        active = front.active_link
        if link is not None:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(front.active_link.resolve())
            active = link
        return {
            "kind": "nginx",
            "active_link": str(active),
            "test_command": front.test_command,
            "reload_command": front.reload_command,
            "timeout": "10s",
            "verify_url": front.url,
            "verify_successes": verify_successes,
            "targets": {c: str(p) for c, p in front.targets.items()},
        }

    @staticmethod
    def state_file_switch(path: Path, active: str) -> dict[str, Any]:
        """A `[switch]` table for the state-file switcher, with the file written now."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"activeColor": active}) + "\n")
        return {"kind": "state-file", "path": str(path), "timeout": "10s"}

    @property
    def installed(self) -> Install:
        """The build this daemon runs from."""
        return self.install or INSTALL

    def start(
        self, hub: NotifyHub, *, fresh: bool = True, env: Mapping[str, str] | None = None
    ) -> Guardd:
        """Start the daemon (without waiting for READY); `env` adds variables to ours."""
        if fresh and self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.lock_file.unlink(missing_ok=True)
        variables = {
            **os.environ,
            "NOTIFY_SOCKET": str(hub.path),
            "WATCHDOG_USEC": WATCHDOG_USEC,
            **(env or {}),
        }
        variables.pop("WATCHDOG_PID", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.installed.guardd), "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=variables,
                cwd=self.root,
            )
        return self

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, hub: NotifyHub, timeout: float = 90.0) -> float:
        """Wait for READY=1; raises with the log tail if the daemon died or never said it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return hub.wait_ready(self.pid, timeout=0.5)
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"guardd {self.name} exited {self.proc.returncode}:\n{self.log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"guardd {self.name}: no READY within {timeout:g}s\n{self.log_tail()}"
                    ) from None

    def log_tail(self, lines: int = 20) -> str:
        """The end of the daemon's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def events(self) -> list[dict[str, Any]]:
        """The journal."""
        path = self.state_dir / "events.jsonl"
        out = []
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def stop(self) -> int | None:
        """SIGTERM and wait."""
        code = stop_process(self.proc)
        self.proc = None
        return code


class ShellGuard:
    """`health_guard.sh INTERVAL URL`, optionally switching a front on failure."""

    def __init__(
        self,
        root: Path,
        *,
        interval: float,
        url: str,
        front: Front | None = None,
        failures: int = 3,
        user_agent: str = "health_guard.sh",
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FAILURES": str(failures),
            "USER_AGENT": user_agent,
            "NGINX": front.binary if front else "nginx",
        }
        if front is not None:
            self.env["SWITCH_COMMAND"] = " ".join(
                [
                    str(NGINX_SWITCH),
                    str(front.active_link),
                    str(front.targets["blue"]),
                    "--",
                    *front.args,
                ]
            )
        self.argv = ["bash", str(HEALTH_GUARD), f"{interval:g}", url]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ShellGuard:
        """Start the loop."""
        with (self.root / "health_guard.log").open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )
        return self

    def stop(self) -> None:
        """Stop the loop (and the curl or sleep it is in)."""
        if self.proc is not None and self.proc.poll() is None:
            from bench.procstat import children_of  # noqa: PLC0415

            kids = children_of(self.proc.pid)
            stop_process(self.proc)
            for pid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self.proc = None


class Monit:
    """Debian's monit with its own control file: one `check host` at a 1 s cycle."""

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        front: Front | None = None,
        failures: int = 3,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.rc = root / "monitrc"
        action = "alert"  # no mail server is set: an alert is only logged
        if front is not None:
            cmd = " ".join(
                [
                    str(NGINX_SWITCH),
                    str(front.active_link),
                    str(front.targets["blue"]),
                    "--",
                    *front.args,
                ]
            )
            action = f'exec "/usr/bin/env NGINX={front.binary} {cmd}"'
        self.rc.write_text(
            f"""set daemon 1
set logfile {root}/monit.log
set pidfile {root}/monit.pid
set idfile {root}/monit.id
set statefile {root}/monit.state
check host app with address 127.0.0.1
    if failed port {port} protocol http request "/healthz" status = 200
       with timeout 2 seconds for {failures} cycles then {action}
"""
        )
        self.rc.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Monit:
        """Start monit in the foreground."""
        for name in ("monit.state", "monit.id", "monit.pid"):
            (self.root / name).unlink(missing_ok=True)
        with (self.root / "monit.stdout").open("ab") as log:
            self.proc = subprocess.Popen(
                ["monit", "-I", "-c", str(self.rc)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
            )
        return self

    def stop(self) -> None:
        """Stop monit."""
        stop_process(self.proc)
        self.proc = None


class BlackboxExporter:
    """Debian's prometheus-blackbox-exporter on loopback with an `http_2xx` module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "blackbox.yml"
        self.config.write_text(
            "modules:\n"
            "  http_2xx:\n"
            "    prober: http\n"
            "    timeout: 2s\n"
            "    http:\n"
            "      preferred_ip_protocol: ip4\n"
        )
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BlackboxExporter:
        """Start it and wait until it answers."""
        for _ in range(5):
            self.port = free_port()
            with (self.root / "blackbox.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        "prometheus-blackbox-exporter",
                        f"--config.file={self.config}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                    conn.request("GET", "/-/healthy")
                    if conn.getresponse().status == 200:
                        conn.close()
                        return self
                time.sleep(0.05)
            stop_process(self.proc)
        raise RuntimeError("prometheus-blackbox-exporter did not start")

    @property
    def pid(self) -> int:
        """Its pid."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Stop it."""
        stop_process(self.proc)
        self.proc = None


class BlackboxDriver:
    """Drives `/probe?target=...&module=http_2xx` at a fixed rate, as Prometheus would."""

    def __init__(self, exporter: BlackboxExporter, targets: Sequence[str], rate: float) -> None:
        self.exporter = exporter
        self.paths = [f"/probe?target={quote(t, safe='')}&module=http_2xx" for t in targets]
        self.period = 1.0 / rate
        self.sent = 0
        self.succeeded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blackbox-driver", daemon=True)

    def start(self) -> BlackboxDriver:
        """Start driving."""
        self._thread.start()
        return self

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.exporter.port, timeout=5)
            try:
                conn.request("GET", self.paths[i % len(self.paths)])
                body = conn.getresponse().read()
                self.sent += 1
                self.succeeded += b"\nprobe_success 1" in body
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
            i += 1
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
            elif self._stop.wait(delay):
                break

    def stop(self) -> None:
        """Stop driving."""
        self._stop.set()
        self._thread.join()


class Floor:
    """A bare prober loop (`python -m bench.floor KIND`): what a Python prober costs at least."""

    def __init__(self, root: Path, kind: str, urls: Sequence[str], interval: float) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.argv = [str(INSTALL.python), "-m", "bench.floor", kind, f"{interval}", *urls]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Floor:
        """Start it."""
        with (self.root / f"{self.kind}-floor.log").open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO
            )
        return self

    @property
    def pid(self) -> int:
        """Its pid."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Stop it."""
        stop_process(self.proc)
        self.proc = None
