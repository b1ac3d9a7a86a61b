"""Real nginx on loopback, twice over: the app that answers health checks, and the fronts.

`AppServer` is one nginx serving every upstream endpoint the suite needs, each on its
own port: a color answers `{"status":"UP","color":...}` with an `X-Color` header, or a
503 while its fault file exists (one `stat` per request, so a fault is a `touch` and
takes effect at a known instant). Its access log records each request's time (ms),
port, status, whether it came through a front, and the User-Agent, which is how the
suite tells the probers apart and times their probes.

`Front` is the nginx a guard switches: it includes a symlink naming one color's
upstream file, exactly like the lab in tests/harness/nginx.py and like production. With
`traffic_log` it logs every request in guardd's `log_format` for an `access_log` signal.

`TrafficApp` is the app behind real traffic: `/healthz` always UP, `/api/...` 200, or a 500
for a fifth of the requests while its fault file exists, so that only the traffic, never
the probe, can see the failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.paths import debian_binary

_START_ATTEMPTS = 5
LOG_FORMAT = Path(__file__).resolve().parents[1] / "packaging" / "nginx" / "guardd-log-format.conf"


def nginx_binary() -> str:
    """The nginx binary (installed by `bench.tools.ensure_tools`, so never apt-get here)."""
    return debian_binary("nginx", "nginx-light", install=False)


def free_port() -> int:
    """A loopback port that was free a moment ago (starts retry when it was taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user_line() -> str:
    # Workers of a root master default to nobody, who cannot read a 0700 temp dir.
    return "user root root;\n" if os.geteuid() == 0 else ""


class _Nginx:
    """One private nginx master (one worker) under `tmp`, started and stopped by us."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.binary = nginx_binary()
        self.conf = tmp / "nginx.conf"
        self.pid_file = tmp / "nginx.pid"
        self.error_log = tmp / "error.log"
        self.args = ["-p", f"{tmp}/", "-e", str(self.error_log), "-c", str(self.conf)]
        self.test_command = [self.binary, "-t", "-q", *self.args]
        self.reload_command = [self.binary, "-s", "reload", *self.args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []

    def render(self) -> str:
        """The config text for the current `ports`."""
        raise NotImplementedError

    def pick_ports(self) -> None:
        """Choose the ports to listen on."""
        raise NotImplementedError

    def start(self) -> None:
        """Write the config, start nginx, return once every port accepts."""
        (self.tmp / "temp").mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(_START_ATTEMPTS):
            self.pick_ports()
            self.conf.write_text(self.render())
            if self._launch():
                return
            last = self._tail()
            if "Address already in use" not in last:
                break
        raise RuntimeError(f"nginx under {self.tmp} did not start:\n{last}")

    def _launch(self) -> bool:
        self.pid_file.unlink(missing_ok=True)
        with (self.tmp / "nginx.stderr").open("ab") as err:
            self.proc = subprocess.Popen(
                [self.binary, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if self.pid_file.exists() and all(_accepts(p) for p in self.ports):
                return True
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"nginx under {self.tmp} did not listen within 20 s")

    def _tail(self) -> str:
        text = ""
        for f in (self.error_log, self.tmp / "nginx.stderr"):
            with contextlib.suppress(OSError):
                text += f.read_text(errors="replace")
        return "\n".join(text.splitlines()[-15:])

    def stop(self) -> None:
        """Quit nginx and wait for its master."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, grace in ((signal.SIGQUIT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        proc.wait()

    def worker_pids(self) -> list[int]:
        """The master's children: its workers, old and new."""
        from bench.procstat import children_of  # noqa: PLC0415 - keeps this module standalone

        return children_of(self.proc.pid) if self.proc else []


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True, slots=True)
class Hit:
    """One line of the app's access log."""

    t: float  # wall clock, seconds (ms resolution)
    port: int
    status: int
    via_front: bool
    ua: str


class AppServer(_Nginx):
    """The upstream apps: named color endpoints (with fault files) and a pool of plain ones."""

    def __init__(self, tmp: Path, colors: dict[str, str], pool: int = 0) -> None:
        super().__init__(tmp)
        self.colors = dict(colors)  # endpoint name -> color it reports
        self.pool_size = pool
        self.port_of: dict[str, int] = {}
        self.pool: list[int] = []
        self.fault_dir = tmp / "faults"
        self.fault_dir.mkdir(parents=True, exist_ok=True)
        self.access_log = tmp / "access.log"
        self._offset = 0

    def pick_ports(self) -> None:
        """One port per named endpoint, then the pool."""
        chosen: set[int] = set()
        while len(chosen) < len(self.colors) + self.pool_size:
            chosen.add(free_port())
        ports = sorted(chosen)
        self.port_of = dict(zip(self.colors, ports, strict=False))
        self.pool = ports[len(self.colors) :]
        self.ports = ports

    def url(self, name: str) -> str:
        """The health URL of a named endpoint."""
        return f"http://127.0.0.1:{self.port_of[name]}/healthz"

    def pool_url(self, i: int) -> str:
        """The health URL of pool endpoint `i`."""
        return f"http://127.0.0.1:{self.pool[i]}/healthz"

    def fault(self, name: str, on: bool = True) -> float:
        """Make endpoint `name` answer 503 (or stop doing so); the wall time it took effect."""
        path = self.fault_dir / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)
        return time.time()

    def render(self) -> str:
        """nginx.conf for the app."""
        servers = []
        for name, color in self.colors.items():
            fault = self.fault_dir / name
            up = f'{{"status":"UP","color":"{color}"}}'
            down = f'{{"status":"DOWN","color":"{color}","error":"injected 503"}}'
            servers.append(
                f"""    server {{
        listen 127.0.0.1:{self.port_of[name]};
        location / {{
            add_header X-Color {color} always;
            if (-f {fault}) {{
                add_header X-Color {color} always;
                return 503 '{down}';
            }}
            return 200 '{up}';
        }}
    }}"""
            )
        if self.pool:
            listens = "\n".join(f"        listen 127.0.0.1:{p};" for p in self.pool)
            servers.append(
                f"""    server {{
{listens}
        location / {{
            return 200 '{{"status":"UP"}}';
        }}
    }}"""
            )
        body = "\n".join(servers)
        return f"""# the upstream apps of guardd's benchmark
{_user_line()}worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
pid {self.pid_file};
lock_file {self.tmp}/nginx.lock;
error_log {self.error_log} warn;
events {{
    worker_connections 8192;
}}
http {{
    default_type application/json;
    client_body_temp_path {self.tmp}/temp/client_body;
    log_format bench '$msec $server_port $status $http_x_bench_via "$http_user_agent"';
    access_log {self.access_log} bench;
    keepalive_requests 100000;
    keepalive_timeout 75s;
{body}
}}
"""

    def mark(self) -> int:
        """The current end of the access log, to read only what follows."""
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def hits(self, since: int = 0) -> list[Hit]:
        """Access-log lines from byte offset `since` on."""
        try:
            with self.access_log.open("rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for raw in data.splitlines():
            line = raw.decode("utf-8", "replace")
            head, _, ua = line.partition(' "')
            parts = head.split()
            if len(parts) != 4:
                continue
            with contextlib.suppress(ValueError):
                out.append(
                    Hit(
                        float(parts[0]),
                        int(parts[1]),
                        int(parts[2]),
                        parts[3] == "front",
                        ua.removesuffix('"'),
                    )
                )
        return out


class TrafficApp(AppServer):
    """Two colors whose `/api` fails 20 % of requests while their fault file exists."""

    # nginx's split_clients over $request_id: a random fifth of the requests.
    ERROR_SHARE = "20%"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, {"blue": "blue", "green": "green"})

    def render(self) -> str:
        """nginx.conf for the app: no access log, it is not what is measured."""
        servers = []
        for name, color in self.colors.items():
            fault = self.fault_dir / name
            servers.append(
                f"""    server {{
        listen 127.0.0.1:{self.port_of[name]};
        add_header X-Color {color} always;
        location /api {{
            if (-f {fault}) {{
                rewrite ^ /faulty last;
            }}
            return 200 '{{"color":"{color}"}}';
        }}
        location = /faulty {{
            internal;
            if ($bench_fail) {{
                return 500 '{{"color":"{color}","error":"injected 500"}}';
            }}
            return 200 '{{"color":"{color}"}}';
        }}
        location / {{
            return 200 '{{"status":"UP","color":"{color}"}}';
        }}
    }}"""
            )
        body = "\n".join(servers)
        return f"""# the traffic app of guardd's benchmark
{_user_line()}worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process on;
pid {self.pid_file};
lock_file {self.tmp}/nginx.lock;
error_log {self.error_log} warn;
events {{
    worker_connections 4096;
}}
http {{
    default_type application/json;
    access_log off;
    client_body_temp_path {self.tmp}/temp/client_body;
    keepalive_requests 100000;
    split_clients "$request_id" $bench_fail {{
        {self.ERROR_SHARE} 1;
        * "";
    }}
{body}
}}
"""


class Front(_Nginx):
    """The guarded nginx: `include <name>_active.conf`, a symlink to one color's file."""

    def __init__(
        self,
        tmp: Path,
        app: AppServer,
        endpoints: dict[str, str],
        active: str,
        *,
        traffic_log: Path | None = None,
    ) -> None:
        super().__init__(tmp)
        self.traffic_log = traffic_log
        self.app = app
        self.endpoints = dict(endpoints)  # color -> app endpoint name
        self.upstream_dir = tmp / "upstreams"
        self.upstream_dir.mkdir(parents=True, exist_ok=True)
        self.active_link = self.upstream_dir / "app_active.conf"
        self.targets = {c: self.upstream_dir / f"app_{c}.conf" for c in self.endpoints}
        self.initial = active
        self.port = 0

    def pick_ports(self) -> None:
        """One listening port."""
        self.port = free_port()
        self.ports = [self.port]

    @property
    def url(self) -> str:
        """The health URL through this front."""
        return f"http://127.0.0.1:{self.port}/healthz"

    def start(self) -> None:
        """Write the upstream files and the link, then start."""
        for color, name in self.endpoints.items():
            self.targets[color].write_text(
                f"upstream app {{\n    server 127.0.0.1:{self.app.port_of[name]};\n}}\n"
            )
        if not self.active_link.is_symlink():
            self.active_link.symlink_to(self.targets[self.initial])
        super().start()

    def active_on_disk(self) -> str | None:
        """The color the link names."""
        resolved = self.active_link.resolve()
        for color, target in self.targets.items():
            if target.resolve() == resolved:
                return color
        return None

    def switch(self, color: str) -> dict[str, float]:
        """ln + rename + nginx -t + reload, as a shell script would; each step's seconds."""
        t0 = time.perf_counter()
        tmp_link = self.active_link.with_name(".app_active.conf.bench")
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(self.targets[color])
        tmp_link.replace(self.active_link)
        t1 = time.perf_counter()
        subprocess.run(self.test_command, check=True, capture_output=True, timeout=30)
        t2 = time.perf_counter()
        subprocess.run(self.reload_command, check=True, capture_output=True, timeout=30)
        t3 = time.perf_counter()
        return {"link_s": t1 - t0, "test_s": t2 - t1, "reload_s": t3 - t2, "total_s": t3 - t0}

    def _logging(self) -> str:
        if self.traffic_log is None:
            return "    access_log off;"
        # guardd's own log_format file, as an operator includes it; no buffer=.
        return f"    include {LOG_FORMAT};\n    access_log {self.traffic_log} guardd;"

    def render(self) -> str:
        """nginx.conf for the front."""
        return f"""# a guarded front of guardd's benchmark
{_user_line()}worker_processes 1;
worker_rlimit_nofile 8192;
daemon off;
master_process on;
pid {self.pid_file};
lock_file {self.tmp}/nginx.lock;
error_log {self.error_log} error;
events {{
    worker_connections 2048;
}}
http {{
{self._logging()}
    client_body_temp_path {self.tmp}/temp/client_body;
    proxy_temp_path {self.tmp}/temp/proxy;
    include {self.active_link};
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://app;
            proxy_next_upstream off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Bench-Via front;
            proxy_connect_timeout 2s;
            proxy_read_timeout 10s;
        }}
    }}
}}
"""


_REQUEST = (
    b"GET /healthz HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-poll\r\nConnection: close\r\n\r\n"
)


def fresh_get(port: int, timeout: float = 2.0) -> tuple[int, str | None]:
    """One GET on a fresh connection: (status, X-Color); status 0 on a connection error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(_REQUEST)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return 0, None
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    lines = head.split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, None
    color = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-color":
            color = value.strip()
    return status, color
