"""A small app process that counts its requests in `http_requests_total{color,code}`.

    with MetricsApp("green") as app:
        app.target                     # 127.0.0.1:<port>, for a Prometheus scrape config
        app.set_error_share(0.3)       # from now on 30 % of its requests answer 500

It stands for one color's real service as Prometheus sees it: it serves `/metrics` in the
text exposition format, its counters growing at `RPS` requests a second of simulated
traffic, `code="500"` for the current share of them and `code="200"` for the rest (both
series exist from the start, as a well-instrumented app's do). `GET /control?error_share=X`
changes the share. Run as `python -m tests.harness.app_metrics COLOR`: it prints its port.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.harness.httpserver import QuietHTTPServer

RPS = 100.0
PROJECT = Path(__file__).resolve().parents[2]


class _Counters:
    """The app's counters, advanced to now whenever they are read or the share changes."""

    def __init__(self, color: str) -> None:
        self.color = color
        self.share = 0.0
        self.ok = 0.0
        self.errors = 0.0
        self._lock = threading.Lock()
        self._at = time.monotonic()

    def _advance(self) -> None:
        now = time.monotonic()
        served = (now - self._at) * RPS
        self._at = now
        self.errors += served * self.share
        self.ok += served * (1.0 - self.share)

    def set_share(self, share: float) -> None:
        with self._lock:
            self._advance()
            self.share = share

    def exposition(self) -> bytes:
        with self._lock:
            self._advance()
            ok, errors = self.ok, self.errors
        c = self.color
        return (
            "# HELP http_requests_total Requests served, by status code.\n"
            "# TYPE http_requests_total counter\n"
            f'http_requests_total{{color="{c}",code="200"}} {ok:.3f}\n'
            f'http_requests_total{{color="{c}",code="500"}} {errors:.3f}\n'
        ).encode()


def serve(color: str) -> None:
    """Serve `/metrics` and `/control` on a free loopback port (printed) until killed."""
    counters = _Counters(color)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- stdlib name
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/metrics":
                body = counters.exposition()
                kind = "text/plain; version=0.0.4"
            elif url.path == "/control":
                share = float(parse_qs(url.query)["error_share"][0])
                counters.set_share(share)
                body, kind = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class MetricsApp:
    """The app as a child process, stopped on exit."""

    def __init__(self, color: str) -> None:
        self.color = color
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        """`host:port` of its `/metrics`."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> MetricsApp:
        """Start the process and read its port."""
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.app_metrics", self.color],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=PROJECT,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the {self.color} app did not start: {line!r}")
        self.port = int(line)
        return self

    def set_error_share(self, share: float) -> None:
        """From now on `share` (0 ... 1) of the app's requests answer 500."""
        response = httpx.get(
            f"http://{self.target}/control", params={"error_share": str(share)}, timeout=10
        )
        response.raise_for_status()

    def stop(self) -> None:
        """Stop the process; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()

    def __enter__(self) -> MetricsApp:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    serve(sys.argv[1])
