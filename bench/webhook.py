"""A Slack-like incoming-webhook receiver on loopback: answers every POST `200 ok`, as Slack does.

It stands in for `hooks.slack.com` where a bench guardd has a `slack` sink: the sink's
client, its connection and its deliveries are then real, and no message leaves the host.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar


class _Handler(BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.received.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """Quiet: the bench prints its own progress."""


class SlackHook:
    """`url` takes Slack's incoming-webhook path shape; `received` holds every body posted."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        handler = type("Handler", (_Handler,), {"received": self.received})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where a `slack` sink posts."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/services/T0/B0/bench"

    def start(self) -> SlackHook:
        """Serve in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
