"""The threading HTTP server of the harness's fakes (Prometheus, exporters, /metrics)."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer


class QuietHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` that says nothing when a client hangs up mid-answer (guardd
    closes a query or scrape it no longer waits for: normal, not a failure), and prints
    any other handler error as the standard server does."""

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipe, ConnectionReset, ...
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]
