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

With ``access_log`` (a path, or ``syslog:server=unix:PATH,nohostname``) nginx logs every
request there with guardd's shipped ``log_format guardd``
(``packaging/nginx/guardd-log-format.conf``), as production does for the access-log signal.

After a reload the old workers keep accepting connections for ~100 ms, so "the first
answer came from green" proves nothing: use `wait_serving_only`.

If no ``nginx`` binary is found the harness installs Debian's ``nginx-light`` with
apt-get (root only) or fails loudly.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from guardd._demo import nginx as private
from tests.harness.paths import debian_binary
from tests.harness.upstream import Upstream

_START_ATTEMPTS = 5
LOG_FORMAT = Path(__file__).resolve().parents[2] / "packaging/nginx/guardd-log-format.conf"


def nginx_binary() -> str:
    """Return the path of the nginx binary, installing Debian's nginx-light if missing."""
    return debian_binary("nginx", "nginx-light")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago (start() retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Nginx(private.Nginx):
    """guardd's private nginx (the demo's), plus what tests ask of it."""

    def __init__(
        self,
        tmp: Path,
        upstreams: Mapping[str, Upstream],
        name: str = "lab",
        *,
        active: str = "blue",
        access_log: str | None = None,
    ) -> None:
        self.upstreams = dict(upstreams)
        self.access_log = access_log
        super().__init__(
            nginx_binary(),
            tmp,
            {c: u.port for c, u in self.upstreams.items()},
            active,
            name=name,
            start_attempts=_START_ATTEMPTS,
        )
        self.tmp = tmp

    # Returns self so that a test can write `Nginx(...).start()`; the demo's returns None.
    def start(self) -> Nginx:  # type: ignore[override]
        """Write the config and links, start nginx, return once it accepts connections."""
        try:
            super().start()
        except private.NginxFailed as e:
            raise RuntimeError(f"nginx did not start:\n{e}") from None
        return self

    def _render(self, temp_paths: str) -> str:
        base = super()._render(temp_paths)
        if self.access_log is None:
            return base
        logging = f"include {LOG_FORMAT};\n    access_log {self.access_log} guardd;"
        return base.replace("access_log off;", logging, 1)

    def log_to(self, access_log: str | None) -> None:
        """Log requests to `access_log` from now on (None: not at all): rewrite, reload."""
        self.access_log = access_log
        self.conf.write_text(self._render(self._temp_paths()))
        self.reload()

    def reopen(self) -> None:
        """`nginx -s reopen`, as logrotate's postrotate runs it."""
        command = ["reopen" if arg == "reload" else arg for arg in self.reload_command]
        subprocess.run(command, check=True, capture_output=True, timeout=30)

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

    def served_color(self, timeout: float = 5.0) -> str | None:
        """GET /healthz on a fresh connection; its X-Color, or None on an error or non-2xx."""
        answer = self.front_door(timeout)
        if answer is None or not 200 <= answer[0] < 300:
            return None
        return answer[1]

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
