"""Real, controllable HTTP/1.1 upstreams on loopback, one per color.

    with Upstream("green") as green:
        green.url                     # http://127.0.0.1:<port>/healthz
        green.set_mode("http_503")    # from now on every request gets a 503
        green.set_mode("pattern", statuses=[503, 503, 200])
        green.wait_for_requests(3)    # block until 3 requests have been served
        green.counts["http_503"]      # requests served per outcome

Every path but `/api` answers the same way, so `/healthz` and `/` behave alike. Modes:

| mode         | answer                                                           |
|--------------|------------------------------------------------------------------|
| `ok`         | 200 `{"status":"UP","color":"<color>"}`, header `X-Color`        |
| `http_503`   | 503 with a JSON body, header `X-Color`                           |
| `hang`       | reads the request, never answers; released (closed) by `stop()`  |
| `not_json`   | 200 with a text body                                             |
| `json_down`  | 200 `{"status":"DOWN","color":...}`                              |
| `pattern`    | cycles through `statuses`, e.g. `[503, 503, 200]` (200 is `ok`)  |
| `random_5xx` | 503 with `probability`, else `ok`; `seed` makes it repeatable    |
| `slow`       | waits `delay` seconds (cut short by `stop()`), then `ok`         |

`/api` (and every path under it) answers on its own terms, set by `set_api`: a 500 for a
given fraction of its requests, spread evenly (`error_ratio=0.2`: every fifth), after an
optional `delay`; otherwise the mode's `ok` answer. `/healthz` keeps following the mode, so
real traffic can fail while the probes pass. `api_counts` counts `/api` answers by status.

Outcomes counted in `counts`: `ok`, `http_<status>` (e.g. `http_503`), `hang`,
`not_json`, `json_down`. Every answer carries `X-Color` (hang sends none).
`stop()` ends hung and slow requests, closes kept-alive connections and joins every
thread it started.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal, get_args

Mode = Literal["ok", "http_503", "hang", "not_json", "json_down", "pattern", "random_5xx", "slow"]
MODES: tuple[Mode, ...] = get_args(Mode)


class Upstream:
    """One color's app: a threaded HTTP server on 127.0.0.1 whose answers a test controls."""

    def __init__(self, color: str, *, mode: Mode = "ok", host: str = "127.0.0.1") -> None:
        self.color = color
        self.host = host
        self._lock = threading.Lock()
        self._served = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._counts: Counter[str] = Counter()
        self._mode: Mode = "ok"
        self._statuses: tuple[int, ...] = ()
        self._pattern_index = 0
        self._probability = 0.0
        self._rng = random.Random(0)  # noqa: S311 -- repeatable failures, not secrets
        self._delay = 0.0
        self._api_error_ratio = 0.0
        self._api_delay = 0.0
        self._api_requests = 0
        self._api_counts: Counter[int] = Counter()
        self.set_mode(mode)
        self._server = _Server((host, 0), _Handler, self)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The server's root URL, e.g. `http://127.0.0.1:8123`."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The health endpoint's URL."""
        return f"{self.base_url}/healthz"

    @property
    def mode(self) -> Mode:
        """The current mode."""
        with self._lock:
            return self._mode

    @property
    def counts(self) -> Counter[str]:
        """A snapshot of the requests served so far, per outcome."""
        with self._lock:
            return Counter(self._counts)

    @property
    def requests(self) -> int:
        """How many requests have been received so far."""
        with self._lock:
            return sum(self._counts.values())

    def set_mode(
        self,
        mode: Mode,
        *,
        statuses: Sequence[int] = (),
        probability: float = 0.5,
        seed: int = 0,
        delay: float = 1.0,
    ) -> None:
        """Change how the next requests are answered; safe from any thread."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode == "pattern" and not statuses:
            raise ValueError("mode 'pattern' needs statuses, e.g. [503, 503, 200]")
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must lie in [0, 1]")
        with self._lock:
            self._mode = mode
            self._statuses = tuple(statuses)
            self._pattern_index = 0
            self._probability = probability
            self._rng = random.Random(seed)  # noqa: S311 -- repeatable failures, not secrets
            self._delay = delay

    def set_api(self, *, error_ratio: float = 0.0, delay: float = 0.0) -> None:
        """How `/api` answers from now on: a 500 for `error_ratio` of its requests (spread
        evenly), each after `delay` seconds; safe from any thread."""
        if not 0.0 <= error_ratio <= 1.0:
            raise ValueError("error_ratio must lie in [0, 1]")
        with self._lock:
            self._api_error_ratio = error_ratio
            self._api_delay = delay
            self._api_requests = 0

    @property
    def api_counts(self) -> Counter[int]:
        """The `/api` answers so far, by status."""
        with self._lock:
            return Counter(self._api_counts)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least *n* requests were received in all; False on timeout."""
        with self._served:
            return self._served.wait_for(lambda: sum(self._counts.values()) >= n, timeout)

    def start(self) -> Upstream:
        """Start serving in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"upstream-{self.color}-{self.port}",
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hung requests, close every connection, join every thread."""
        with self._lock:
            self._stopping.set()
            # Kept-alive clients would otherwise hold their handler threads forever.
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()  # joins the handler threads

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Upstream {self.color} {self.base_url} mode={self.mode}>"

    # Called from handler threads.

    def _track(self, conn: socket.socket) -> bool:
        """Register a new connection; False if we are stopping and it must close."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._connections.add(conn)
            return True

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _decide_api(self) -> tuple[int, float]:
        """Pick an `/api` request's (status, delay) and count it."""
        with self._served:
            n = self._api_requests
            self._api_requests += 1
            ratio = self._api_error_ratio
            # The n-th request fails when it carries the failures' running total past a
            # whole number: exactly `ratio` of any long run, evenly spread.
            failed = int((n + 1) * ratio) > int(n * ratio)
            status = 500 if failed else 200
            self._api_counts[status] += 1
            self._served.notify_all()
            return status, self._api_delay

    def _decide(self) -> tuple[str, int, float]:
        """Pick this request's (outcome, status, delay) and count it."""
        with self._served:
            mode: str = self._mode
            delay = 0.0
            if mode == "pattern":
                status = self._statuses[self._pattern_index % len(self._statuses)]
                self._pattern_index += 1
                mode = "ok" if status == 200 else f"http_{status}"
            elif mode == "random_5xx":
                mode = "http_503" if self._rng.random() < self._probability else "ok"
            elif mode == "slow":
                mode, delay = "ok", self._delay
            status = {"ok": 200, "hang": 0, "not_json": 200, "json_down": 200}.get(mode, 0)
            if mode.startswith("http_"):
                status = int(mode.removeprefix("http_"))
            self._counts[mode] += 1
            self._served.notify_all()
            return mode, status, delay


class _Server(ThreadingHTTPServer):
    """A threading server whose handler threads are joined on close, not abandoned."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], upstream: Upstream
    ) -> None:
        self.upstream = upstream
        super().__init__(address, handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet: clients hanging up mid-answer is normal in these tests."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # Bounds a silent client that was never tracked; stop() closes tracked ones.
    timeout = 30

    def setup(self) -> None:
        super().setup()
        if not self.server.upstream._track(self.connection):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.server.upstream._untrack(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- stdlib name
        """Keep test output clean."""

    def do_GET(self) -> None:
        upstream = self.server.upstream
        if upstream._stopping.is_set():
            self.close_connection = True
            return
        if self.path == "/api" or self.path.startswith(("/api/", "/api?")):
            self._answer_api(upstream)
            return
        outcome, status, delay = upstream._decide()
        if outcome == "hang":
            upstream._stopping.wait()
            self.close_connection = True
            return
        if delay and upstream._stopping.wait(delay):
            self.close_connection = True
            return
        color = upstream.color
        if outcome == "not_json":
            body, ctype = b"everything is fine, probably\n", "text/plain"
        else:
            document = {
                "status": "UP" if status == 200 and outcome == "ok" else "DOWN",
                "color": color,
            }
            if status >= 300:
                document["error"] = f"injected {status}"
            body, ctype = json.dumps(document).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Color", color)
        if upstream._stopping.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def _answer_api(self, upstream: Upstream) -> None:
        status, delay = upstream._decide_api()
        if delay and upstream._stopping.wait(delay):
            self.close_connection = True
            return
        document = {"color": upstream.color, "ok": status == 200}
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Color", upstream.color)
        if upstream._stopping.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)
