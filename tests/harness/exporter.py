"""A real `/metrics` endpoint on loopback: an app's `agent_runs_total{result}` counters.

    with Exporter() as green:
        green.url                      # http://127.0.0.1:<port>/metrics
        green.runs_per_scrape(ok=3, failed=1)   # each scrape first counts 4 more runs
        green.restart()                # the counters start again from 0 (a process restart)
        green.set_mode("hang")         # from now on /metrics never answers
        green.scrapes                  # /metrics requests answered

Modes: `ok` (the exposition text), `huge` (an endless-looking body of `huge_bytes`, no
Content-Length, written until the client goes away), `huge_declared` (the same with its
Content-Length), `hang` (reads the request, never answers; released by `stop()`),
`trickle` (headers, then one byte of a valid line every 50 ms, never ending; released by
`stop()`), `invalid` (text that is not the exposition format), `http_500`. `extra_series` adds that
many gauge series (`app_series{n="..."}`) to the text, as a large app's /metrics has.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Literal

from tests.harness.httpserver import QuietHTTPServer

ExporterMode = Literal["ok", "huge", "huge_declared", "hang", "trickle", "invalid", "http_500"]
_CHUNK = b"# " + b"x" * 65533 + b"\n"


class Exporter:
    """One app's metrics endpoint, whose counters and answers a test controls."""

    def __init__(self, *, extra_series: int = 0, huge_bytes: int = 50 * 1024 * 1024) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.ok = 0.0
        self.failed = 0.0
        self._step = (0.0, 0.0)
        self.mode: ExporterMode = "ok"
        self.scrapes = 0
        #: Bytes written by `huge` answers (they stop when the reader goes away).
        self.huge_sent = 0
        self.huge_bytes = huge_bytes
        self._extra = "".join(
            f'app_series{{n="{i}",shard="s{i % 16}"}} {i}.5\n' for i in range(extra_series)
        )
        self._server = QuietHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.exporter = self  # type: ignore[attr-defined]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The metrics URL."""
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> Exporter:
        """Serve in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release hung requests."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> Exporter:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def runs_per_scrape(self, *, ok: float, failed: float) -> None:
        """Before answering each scrape, count `ok` and `failed` more runs."""
        with self._lock:
            self._step = (ok, failed)

    def restart(self) -> None:
        """Both counters start again from 0, as after the app's restart."""
        with self._lock:
            self.ok = self.failed = 0.0

    def set_mode(self, mode: ExporterMode) -> None:
        """How /metrics answers from now on."""
        with self._lock:
            self.mode = mode

    def exposition(self) -> bytes:
        """Count this scrape's runs and render the text format."""
        with self._lock:
            self.ok += self._step[0]
            self.failed += self._step[1]
            self.scrapes += 1
            ok, failed = self.ok, self.failed
        return (
            "# HELP agent_runs_total Agent runs by result.\n"
            "# TYPE agent_runs_total counter\n"
            f'agent_runs_total{{result="ok"}} {ok}\n'
            f'agent_runs_total{{result="failed"}} {failed}\n'
            "# HELP app_queue_depth Jobs waiting.\n"
            "# TYPE app_queue_depth gauge\n"
            'app_queue_depth{queue="a"} 3\n'
            'app_queue_depth{queue="b"} 4\n' + self._extra
        ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        pass

    def do_GET(self) -> None:
        exp: Exporter = self.server.exporter  # type: ignore[attr-defined]
        mode = exp.mode
        if mode == "hang":
            exp._stopping.wait()
            return
        if mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            with contextlib.suppress(OSError):
                while not exp._stopping.wait(0.05):
                    self.wfile.write(b"#")
                    self.wfile.flush()
            self.close_connection = True
            return
        if mode == "http_500":
            self._send(500, b"oops\n")
        elif mode == "invalid":
            self._send(200, b"<html><body>Whitelabel Error Page</body></html>\n")
        elif mode in ("huge", "huge_declared"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            if mode == "huge_declared":
                self.send_header("Content-Length", str(exp.huge_bytes))
            self.send_header("Connection", "close")
            self.end_headers()
            sent = 0
            with contextlib.suppress(OSError):
                while sent < exp.huge_bytes and not exp._stopping.is_set():
                    self.wfile.write(_CHUNK)
                    sent += len(_CHUNK)
                    with exp._lock:
                        exp.huge_sent += len(_CHUNK)
            self.close_connection = True
        else:
            self._send(200, exp.exposition())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


def free_port() -> int:
    """A loopback port nobody listens on (for a connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
