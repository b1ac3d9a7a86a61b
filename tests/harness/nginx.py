"""A private, real nginx on loopback whose upstream is chosen by a symlink, as in production.

    with Upstream("blue") as blue, Upstream("green") as green:
        with Nginx(tmp_path, {"blue": blue, "green": green}) as nginx:
            nginx.served_color()              # "blue": one GET on a fresh connection
            NginxSwitcher(active_link=nginx.active_link, targets=nginx.targets,
                          test_command=nginx.test_command,
                          reload_command=nginx.reload_command, ...)

Layout under *tmp* (*name* defaults to ``lab``)::

    nginx.conf                      includes upstreams/<name>_active.conf
    upstreams/<name>_blue.conf      upstream <name>_app { server 127.0.0.1:<blue port>; }
    upstreams/<name>_green.conf     the same for green
    upstreams/<name>_active.conf -> <name>_blue.conf (absolute symlink)
    error.log, nginx.pid, temp/     everything nginx writes stays here

The server listens on a free loopback port and proxies every path to the active
upstream with ``proxy_next_upstream off``, so an upstream's failure shows through, and
passes the upstream's ``X-Color`` header on. ``test_command`` and ``reload_command``
are argv lists acting on this instance only.

After a reload the old workers keep accepting connections for ~100 ms, so "the first
answer came from green" proves nothing: use `wait_serving_only`.

If no ``nginx`` binary is found the harness installs Debian's ``nginx-light`` with
apt-get (root only) or fails loudly.
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
from types import TracebackType

from tests.harness.upstream import Upstream

_START_ATTEMPTS = 5


def nginx_binary() -> str:
    """Return the path of the nginx binary, installing Debian's nginx-light if missing."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("nginx is not installed and we are not root to apt-get it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"],
        check=True,
        env=env,
        timeout=600,
    )
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not found:
        raise RuntimeError("installed nginx-light but no nginx binary is on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago (start() retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Nginx:
    """A private nginx master with one worker, its config and upstream links under *tmp*."""

    def __init__(
        self,
        tmp: Path,
        upstreams: Mapping[str, Upstream],
        name: str = "lab",
        *,
        active: str = "blue",
    ) -> None:
        self.tmp = tmp
        self.upstreams = dict(upstreams)
        self.name = name
        self.binary = nginx_binary()
        self.conf = tmp / "nginx.conf"
        self.pid_file = tmp / "nginx.pid"
        self.error_log = tmp / "error.log"
        self.upstream_dir = tmp / "upstreams"
        self.active_link = self.upstream_dir / f"{name}_active.conf"
        self.targets: dict[str, Path] = {
            color: self.upstream_dir / f"{name}_{color}.conf" for color in self.upstreams
        }
        # -p and -e keep even nginx's start-up messages away from /var/log/nginx.
        self._common_args = ["-p", f"{tmp}/", "-e", str(self.error_log), "-c", str(self.conf)]
        self.test_command: list[str] = [self.binary, "-t", "-q", *self._common_args]
        self.reload_command: list[str] = [self.binary, "-s", "reload", *self._common_args]
        self.port = 0
        self._initial = active
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def front_url(self) -> str:
        """The health URL through nginx."""
        return f"http://127.0.0.1:{self.port}/healthz"

    @property
    def master_pid(self) -> int | None:
        """The master process's pid while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def write_target(self, color: str) -> Path:
        """(Re)write *color*'s upstream file, e.g. to repair one a test broke."""
        target = self.targets[color]
        upstream = self.upstreams[color]
        target.write_text(
            f"upstream {self.name}_app {{\n    server {upstream.host}:{upstream.port};\n}}\n"
        )
        return target

    def start(self) -> Nginx:
        """Write the config and links, start nginx, return once it accepts connections."""
        (self.tmp / "temp").mkdir(parents=True, exist_ok=True)
        self.upstream_dir.mkdir(parents=True, exist_ok=True)
        for color in self.targets:
            self.write_target(color)
        if not self.active_link.is_symlink():
            self.active_link.symlink_to(self.targets[self._initial])
        last_error = ""
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            self.conf.write_text(self._render_conf())
            if self._launch():
                return self
            last_error = self._error_tail()
            # Another test may have grabbed the port between probe and bind; retry.
            if "Address already in use" not in last_error:
                break
        raise RuntimeError(f"nginx did not start:\n{last_error}")

    def stop(self) -> None:
        """Quit nginx (gracefully, then firmly) and wait until the master is gone."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig, grace in ((signal.SIGQUIT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace)
        process.wait()

    def reload(self) -> None:
        """Run the reload command; raise if nginx refuses."""
        subprocess.run(self.reload_command, check=True, capture_output=True, timeout=30)

    def worker_pids(self) -> set[int]:
        """Return the pids of the master's current children (workers, old and new)."""
        master = self.master_pid
        if master is None:
            return set()
        pids = set()
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The command name may hold spaces; the ppid is the 2nd field after it.
                if int(stat_file.read_text().rpartition(")")[2].split()[1]) == master:
                    pids.add(int(stat_file.parent.name))
        return pids

    def served_color(self, path: str = "/healthz", timeout: float = 5.0) -> str | None:
        """GET *path* on a fresh connection; return its X-Color, or None on error or non-2xx."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            response.read()
            if not 200 <= response.status < 300:
                return None
            return response.getheader("X-Color")
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def wait_serving_only(
        self, color: str, hold: float = 0.5, timeout: float = 15.0, interval: float = 0.01
    ) -> bool:
        """True once every fresh-connection answer for *hold* seconds came from *color*."""
        deadline = time.monotonic() + timeout
        streak_since: float | None = None
        while (now := time.monotonic()) < deadline:
            if self.served_color() == color:
                streak_since = now if streak_since is None else streak_since
                if now - streak_since >= hold:
                    return True
            else:
                streak_since = None
            time.sleep(interval)  # a polling cadence, not a wait for something to happen
        return False

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self) -> bool:
        """Start the master; True once it listens, False if it exited first."""
        self.pid_file.unlink(missing_ok=True)
        with (self.tmp / "nginx.stderr").open("ab") as stderr:
            self._process = subprocess.Popen(
                [self.binary, *self._common_args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self.pid_file.exists() and self._accepts():
                return True
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"nginx did not listen on port {self.port} within 15 s")

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _error_tail(self) -> str:
        text = ""
        for log in (self.error_log, self.tmp / "nginx.stderr"):
            with contextlib.suppress(OSError):
                text += log.read_text(errors="replace")
        return "\n".join(text.splitlines()[-20:])

    def _render_conf(self) -> str:
        tmp = self.tmp
        temp_paths = "\n".join(
            f"    {module}_temp_path {tmp}/temp/{module};"
            for module in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            if module == "client_body" or _has_module(self.binary, module)
        )
        # Workers of a root master default to "nobody", who cannot enter pytest's 0700
        # temp dirs; this nginx only talks to loopback, so root workers are fine here.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return f"""# private nginx for guardd tests; everything it writes stays under {tmp}
{user}worker_processes 1;
daemon off;
master_process on;
pid {self.pid_file};
lock_file {tmp}/nginx.lock;
error_log {self.error_log} warn;

events {{
    worker_connections 128;
}}

http {{
    access_log off;
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
            proxy_read_timeout 10s;
        }}
    }}
}}
"""


_modules: dict[str, set[str]] = {}


def _has_module(binary: str, module: str) -> bool:
    """Tell whether *binary* was built with http_<module>_module (nginx-light drops some)."""
    if binary not in _modules:
        built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True)
        _modules[binary] = {
            flag.removeprefix("--without-http_").removesuffix("_module")
            for flag in built.stderr.split()
            if flag.startswith("--without-http_")
        }
    return module not in _modules[binary]
