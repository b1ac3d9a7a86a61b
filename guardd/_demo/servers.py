"""The demo's own HTTP servers: one upstream per color and a webhook receiver, all on loopback.

Each runs a stdlib `ThreadingHTTPServer` in a thread; `close()` stops it, cuts the
connections it still has open and joins its thread.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

_MAX_BODY: Final = 1024 * 1024


class _Server(ThreadingHTTPServer):
    """A threading server that remembers its open connections, to cut them on close."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections: set[socket.socket] = set()
        self.guard = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"guardd-demo-{self.port}",
            daemon=True,
        )

    @property
    def port(self) -> int:
        """The loopback port it listens on."""
        return int(self.server_address[1])

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving, close every connection, join the serving thread."""
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
        with self.guard:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.server_close()

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet: a client hanging up mid-answer is no news in a demo."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.guard:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.guard:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        """Keep the demo's output for the demo."""

    def answer(
        self, status: int, document: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        """Send `document` as JSON with `status`."""
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


class Upstream:
    """One color of the app: every path answers UP, or 503 once `failing` is set.

    `api_failing` breaks only the app's own paths (`/api/...`): then `API_ERRORS` of every
    `API_PERIOD` of their answers are 500s, counted in order (not drawn at random, so that
    every run tells the same story), while `/healthz` still answers UP.
    """

    API_ERRORS: Final = 3
    API_PERIOD: Final = 10

    def __init__(self, color: str) -> None:
        self.color = color
        self.failing = threading.Event()
        self.api_failing = threading.Event()
        self._api_answers = 0
        self._api_lock = threading.Lock()
        self._server = _Server(self._handler())
        self.port = self._server.port

    @property
    def url(self) -> str:
        """Its health endpoint."""
        return f"http://127.0.0.1:{self.port}/healthz"

    def _api_fails(self) -> bool:
        """Whether this `/api` answer is one of the failing ones."""
        if not self.api_failing.is_set():
            return False
        with self._api_lock:
            self._api_answers += 1
            return self._api_answers % self.API_PERIOD < self.API_ERRORS

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(_Handler):
            def do_GET(self) -> None:
                color = upstream.color
                if self.path.startswith("/api") and upstream._api_fails():
                    self.answer(
                        500,
                        {"color": color, "error": "injected 500 on /api"},
                        {"X-Color": color},
                    )
                elif upstream.failing.is_set():
                    self.answer(
                        503,
                        {"status": "DOWN", "color": color, "error": "injected 503"},
                        {"X-Color": color},
                    )
                else:
                    self.answer(200, {"status": "UP", "color": color}, {"X-Color": color})

        return Handler

    def start(self) -> Upstream:
        """Serve in the background."""
        self._server.start()
        return self

    def close(self) -> None:
        """Stop serving and join its thread."""
        self._server.close()


class Receiver:
    """A webhook endpoint that records every JSON body POSTed to its secret path."""

    def __init__(self, token: str) -> None:
        self.path = f"/hooks/{token}"
        self.bodies: list[Any] = []
        self._arrived = threading.Condition()
        self._server = _Server(self._handler())
        self.port = self._server.port

    @property
    def url(self) -> str:
        """Where guardd should POST: the path is the secret, as with Slack's webhooks."""
        return f"http://127.0.0.1:{self.port}{self.path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(_Handler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, _MAX_BODY))
                if self.path != receiver.path:
                    self.answer(404, {"ok": False})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver._arrived:
                    receiver.bodies.append(body)
                    receiver._arrived.notify_all()
                self.answer(200, {"ok": True})

        return Handler

    def wait(self, event: str, timeout: float) -> dict[str, Any] | None:
        """The body for `event`, waiting at most `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while (found := self._find_locked(event)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._arrived.wait(remaining)
        return found

    def _find_locked(self, event: str) -> dict[str, Any] | None:
        for body in self.bodies:
            if isinstance(body, dict) and body.get("event") == event:
                return body
        return None

    def start(self) -> Receiver:
        """Serve in the background."""
        self._server.start()
        return self

    def close(self) -> None:
        """Stop serving and join its thread."""
        self._server.close()
