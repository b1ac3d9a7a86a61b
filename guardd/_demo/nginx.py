"""A private nginx: its own prefix, config, pid, logs and temp paths, on loopback.

The demo runs one; the test suite builds its nginx harness on the same class. Layout
under *root* (*name* is ``demo`` for the demo)::

    nginx.conf                      includes upstreams/<name>_active.conf
    upstreams/<name>_blue.conf      upstream <name>_app { server 127.0.0.1:<blue port>; }
    upstreams/<name>_green.conf     the same for green
    upstreams/<name>_active.conf -> <name>_<active>.conf
    error.log, nginx.pid, temp/     everything this nginx writes stays here
    access.log                      with *traffic_log*: one line per request, guardd's log_format

It proxies every path to the active upstream with `proxy_next_upstream off`, so a
failing color shows through, exactly like the production layout guardd expects.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = ["Nginx", "NginxFailed", "find_nginx", "terminate"]

NAME: Final = "demo"
_TEMP_MODULES: Final = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_START_ATTEMPTS: Final = 3
# The `log_format guardd` of packaging/nginx/guardd-log-format.conf, which the wheel does not
# ship; tests/test_demo.py checks that the two stay the same.
LOG_FORMAT: Final = """\
log_format guardd escape=json
    '{"msec":"$msec","status":"$status",'
    '"upstream_addr":"$upstream_addr","upstream_status":"$upstream_status",'
    '"request_time":"$request_time","upstream_response_time":"$upstream_response_time"}';"""


def terminate(
    process: subprocess.Popen[bytes], steps: tuple[tuple[signal.Signals, float], ...]
) -> int:
    """Each signal in turn with its grace period, then SIGKILL: the exit status."""
    for sig, grace in (*steps, (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    return process.wait()


class NginxFailed(Exception):
    """The private nginx would not start; the message says why."""


def find_nginx() -> str | None:
    """The nginx binary on PATH, if any."""
    return shutil.which("nginx")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """One nginx master with one worker, started and stopped by the demo."""

    def __init__(
        self,
        binary: str,
        root: Path,
        ports: Mapping[str, int],
        active: str,
        *,
        name: str = NAME,
        start_attempts: int = _START_ATTEMPTS,
        traffic_log: bool = False,
    ) -> None:
        self.binary = binary
        self.root = root
        self.name = name
        self.start_attempts = start_attempts
        self.conf = root / "nginx.conf"
        self.pid_file = root / "nginx.pid"
        self.error_log = root / "error.log"
        #: Where nginx logs every request in guardd's log_format; None: it logs none.
        self.traffic_log: Path | None = root / "access.log" if traffic_log else None
        upstreams = root / "upstreams"
        self.upstream_dir = upstreams
        self.active_link = upstreams / f"{name}_active.conf"
        self.targets = {color: upstreams / f"{name}_{color}.conf" for color in ports}
        self._ports = dict(ports)
        self._active = active
        # -p and -e keep even start-up messages away from the system's /var/log/nginx.
        common = ["-p", f"{root}/", "-e", str(self.error_log), "-c", str(self.conf)]
        self.test_command = [binary, "-t", "-q", *common]
        self.reload_command = [binary, "-s", "reload", *common]
        self._start_command = [binary, *common]
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def front_url(self) -> str:
        """The health URL through nginx."""
        return f"http://127.0.0.1:{self.port}/healthz"

    @property
    def master_pid(self) -> int | None:
        """The master's pid while it runs."""
        return self.process.pid if self.process and self.process.poll() is None else None

    def version(self) -> str:
        """`nginx/1.22.1`, as the binary reports it."""
        out = subprocess.run(
            [self.binary, "-v"], capture_output=True, text=True, check=False, timeout=10
        )
        return out.stderr.strip().rpartition(": ")[2] or "nginx"

    def start(self) -> None:
        """Write the config and the links, start nginx, return once it accepts connections."""
        (self.root / "temp").mkdir(parents=True, exist_ok=True)
        self.active_link.parent.mkdir(parents=True, exist_ok=True)
        for color in self.targets:
            self.write_target(color)
        if not self.active_link.is_symlink():
            self.active_link.symlink_to(self.targets[self._active])
        temp_paths = self._temp_paths()
        why = ""
        for _ in range(self.start_attempts):
            self.port = free_port()
            self.conf.write_text(self._render(temp_paths))
            if self._launch():
                return
            why = self._error_tail()
            # Someone may have taken the port between our probe and nginx's bind.
            if "Address already in use" not in why:
                break
        raise NginxFailed(why or "nginx exited at start-up without a word")

    def write_target(self, color: str) -> Path:
        """(Re)write *color*'s upstream file."""
        target = self.targets[color]
        target.write_text(
            f"upstream {self.name}_app {{\n    server 127.0.0.1:{self._ports[color]};\n}}\n"
        )
        return target

    def stop(self) -> None:
        """Quit nginx gracefully (then firmly) and wait until the master is gone."""
        process, self.process = self.process, None
        if process is not None:
            # QUIT lets the workers finish their requests; nginx treats TERM as "fast".
            terminate(process, ((signal.SIGQUIT, 5.0), (signal.SIGTERM, 5.0)))

    def front_door(self, timeout: float = 2.0) -> tuple[int, str | None] | None:
        """GET /healthz on a fresh connection: (status, answering color), or None on an error."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", "/healthz", headers={"Connection": "close"})
            response = conn.getresponse()
            response.read()
            return response.status, response.getheader("X-Color")
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _launch(self) -> bool:
        """Start the master; True once it listens, False if it exited first."""
        self.pid_file.unlink(missing_ok=True)
        with (self.root / "nginx.stderr").open("ab") as stderr:
            # Its own session: the demo, not the terminal's Ctrl-C, decides when it stops.
            self.process = subprocess.Popen(
                self._start_command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if self.pid_file.exists() and self._accepts():
                return True
            time.sleep(0.02)
        self.stop()
        raise NginxFailed(f"nginx did not listen on 127.0.0.1:{self.port} within 15 s")

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _error_tail(self) -> str:
        text = ""
        for log in (self.error_log, self.root / "nginx.stderr"):
            with contextlib.suppress(OSError):
                text += log.read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-20:])

    def _temp_paths(self) -> str:
        # nginx-light is built without some modules; naming their temp path is an error.
        built = subprocess.run(
            [self.binary, "-V"], capture_output=True, text=True, check=False, timeout=10
        ).stderr
        return "\n".join(
            f"    {module}_temp_path {self.root}/temp/{module};"
            for module in _TEMP_MODULES
            if module == "client_body" or f"--without-http_{module}_module" not in built
        )

    def _render(self, temp_paths: str) -> str:
        # Workers of a root master would run as "nobody", who cannot enter the demo's 0700
        # workspace; this nginx only talks to loopback, so root workers are fine here.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        if self.traffic_log is None:
            logging = "    access_log off;"
        else:
            # No buffer=: each line reaches guardd as its request ends.
            logging = "\n".join(
                ["    " + line for line in LOG_FORMAT.splitlines()]
                + [f"    access_log {self.traffic_log} guardd;"]
            )
        return f"""# the private nginx of `guardd demo`; all it writes stays under {self.root}
{user}worker_processes 1;
daemon off;
master_process on;
pid {self.pid_file};
lock_file {self.root}/nginx.lock;
error_log {self.error_log} warn;

events {{
    worker_connections 64;
}}

http {{
{logging}
{temp_paths}

    include {self.active_link};

    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://{self.name}_app;
            proxy_next_upstream off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 2s;
            proxy_read_timeout 5s;
        }}
    }}
}}
"""
