"""A fake Prometheus `/api/v1/query` on loopback whose answers a test chooses.

    with FakePrometheus() as prom:
        prom.url                       # http://127.0.0.1:<port>
        prom.set_mode("series", n=3)   # every query answers a vector of 3 series
        prom.queries                   # the `query` parameter of every request, in order

| mode        | answer                                                                   |
|-------------|--------------------------------------------------------------------------|
| `value`     | 200, a vector of one series with `value` (default 0.5)                    |
| `scalar`    | 200, a scalar `value`                                                    |
| `series`    | 200, a vector of `n` series, labelled `series="0"`, `series="1"`, ...     |
| `empty`     | 200, an empty vector                                                     |
| `nan`       | 200, one series whose value is `value` given as text (`NaN`, `+Inf`)      |
| `matrix`    | 200, a range vector (a query with `[5m]` and no function)                 |
| `error`     | 400, `{"status":"error","errorType":"bad_data","error":<text>}`          |
| `http`      | 502 with a text body (a proxy in front of a dead Prometheus)              |
| `huge`      | 200 without a length, streaming `HUGE_BYTES` of JSON-ish text             |
| `hang`      | reads the request, never answers (released by `stop()`)                  |
| `invalid`   | 200, a body that is not JSON                                             |
| `gzip`      | 200, the `value` answer gzipped although identity was asked for          |
| `dribble`   | 200 headers, then the `value` answer one byte every 0.2 s                |

With `only="text"`, a query without that text is answered in mode `value` instead.

`bytes_sent` counts the body bytes written (a bounded reader stops the `huge` stream).
"""

from __future__ import annotations

import gzip
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.harness.httpserver import QuietHTTPServer

HUGE_BYTES = 100 * 1024 * 1024


class FakePrometheus:
    """A threaded HTTP server answering `/api/v1/query` in the mode a test sets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.mode = "value"
        self.params: dict[str, Any] = {}
        self.queries: list[str] = []
        self.bytes_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query).get("query", [""])[0]
                with outer._lock:
                    outer.queries.append(query)
                outer._answer(self)

        self._server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, as a `[signals.NAME] url` names it."""
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str, **params: Any) -> None:
        """Answer every query from now on in `mode` (see the table above)."""
        with self._lock:
            self.mode, self.params = mode, params

    def start(self) -> FakePrometheus:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hung requests, stop serving, close the socket."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakePrometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- answering ---------------------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        with self._lock:
            mode, params = self.mode, dict(self.params)
        only = params.get("only")
        if only is not None and only not in parse_qs(url.query).get("query", [""])[0]:
            mode = "value"
        if url.path != "/api/v1/query":
            self._send(h, 404, b"not found", "text/plain")
            return
        now = time.time()
        value = str(params.get("value", 0.5))
        if mode == "hang":
            self._hang(h.connection)
            return
        if mode == "huge":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            chunk = b'{"status":"success","data":' + b" " * 65000
            sent = 0
            try:
                while sent < HUGE_BYTES and not self._stopping.is_set():
                    h.wfile.write(chunk)
                    sent += len(chunk)
                    with self._lock:
                        self.bytes_sent += len(chunk)
            except OSError:
                pass  # the reader hung up: that is the point
            return
        if mode == "http":
            self._send(h, 502, b"Bad Gateway\n", "text/plain")
            return
        if mode == "invalid":
            self._send(h, 200, b"<html>not json", "application/json")
            return
        if mode == "error":
            text = params.get("error", "1:5: parse error: unexpected end of input")
            doc = {"status": "error", "errorType": "bad_data", "error": text}
            self._send(h, 400, json.dumps(doc).encode(), "application/json")
            return
        if mode == "scalar":
            data: dict[str, Any] = {"resultType": "scalar", "result": [now, value]}
        elif mode == "matrix":
            data = {
                "resultType": "matrix",
                "result": [{"metric": {}, "values": [[now, value]]}],
            }
        else:
            n = {"value": 1, "nan": 1, "empty": 0, "gzip": 1, "dribble": 1}.get(
                mode, params.get("n", 3)
            )
            data = {
                "resultType": "vector",
                "result": [
                    {"metric": {"series": str(i), "job": "app"}, "value": [now, value]}
                    for i in range(n)
                ],
            }
        body = json.dumps({"status": "success", "data": data}).encode()
        if mode == "dribble":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.flush()
            try:
                for byte in body:
                    if self._gone(h.connection, 0.2) or self._stopping.is_set():
                        return
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
            except OSError:
                pass  # the reader gave up: that is the point
            return
        if mode == "gzip":
            self._send(
                h, 200, gzip.compress(body), "application/json", {"Content-Encoding": "gzip"}
            )
            return
        self._send(h, 200, body, "application/json")

    def _hang(self, conn: socket.socket) -> None:
        """Say nothing until the client hangs up (or the server stops)."""
        while not self._stopping.is_set():
            if self._gone(conn, 0.05):
                return

    @staticmethod
    def _gone(conn: socket.socket, wait: float) -> bool:
        """Whether the client hung up, waiting up to `wait` seconds to see it."""
        readable, _, _ = select.select([conn], [], [], wait)
        if not readable:
            return False
        try:
            return not conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        kind: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        with self._lock:
            self.bytes_sent += len(body)
