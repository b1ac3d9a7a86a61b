"""The demo's load generator: real requests through the demo's nginx, at a steady rate.

One thread sends `GET /api/orders` on a fresh connection each time (a reload of nginx then
costs no request, as it would not for a browser), paced on the monotonic clock, and counts
every answer by the color that gave it (`X-Color`) and its status. Those counts are what the
demo narrates; guardd sees the same requests only through nginx's access log.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from typing import Final

__all__ = ["Traffic"]

PATH: Final = "/api/orders"
# A request that gets no answer (refused, reset, timed out) is counted under this status.
NO_ANSWER: Final = 0


class Traffic:
    """`rate` requests per second to `127.0.0.1:port` until `stop()`."""

    def __init__(self, port: int, rate: float, *, timeout: float = 2.0) -> None:
        self.port = port
        self.interval = 1.0 / rate
        self.timeout = timeout
        #: (color or "?", status) -> answers; status NO_ANSWER for a request without one.
        self.answers: Counter[tuple[str, int]] = Counter()
        #: Wall-clock time (time.time()) of the first 5xx answer, once there is one.
        self.first_5xx: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guardd-demo-traffic", daemon=True)

    def start(self) -> Traffic:
        """Start sending in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and join the thread (at most one request's timeout)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 1.0)

    def counts(self) -> Counter[tuple[str, int]]:
        """A copy of the answers so far."""
        with self._lock:
            return Counter(self.answers)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            color, status = self._one()
            with self._lock:
                self.answers[color, status] += 1
                if status >= 500 and self.first_5xx is None:
                    self.first_5xx = time.time()
            due += self.interval
            # Behind schedule (a slow answer): start again from now rather than burst.
            due = max(due, time.monotonic())
            self._stop.wait(due - time.monotonic())

    def _one(self) -> tuple[str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request("GET", PATH, headers={"Connection": "close"})
            response = conn.getresponse()
            response.read()
            return response.getheader("X-Color") or "?", response.status
        except (OSError, http.client.HTTPException):
            return "?", NO_ANSWER
        finally:
            conn.close()
