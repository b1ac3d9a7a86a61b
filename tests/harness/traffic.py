"""Real traffic at a steady rate: an asyncio httpx client in a thread of its own.

    with Load(lab.nginx, rate=100, path="/api") as load:
        load.wait_sent(500)           # block until 500 requests were sent
        load.answered                 # Counter of (color, status) of the answers
        load.failed                   # requests that got no answer (refused, timed out)

Requests start on a fixed schedule (`rate` per second) whatever the answers' latency, as
users' requests do, with at most `concurrency` in flight (beyond it the schedule waits).
Every request is counted when sent and again when answered; `stop()` waits for those in
flight, so that after it every sent request has an outcome.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from types import TracebackType
from typing import Protocol

import httpx


class _Front(Protocol):
    port: int


class Load:
    """`rate` GETs of `path` per second through nginx, counted by what answered them."""

    def __init__(
        self, front: _Front, *, rate: float, path: str = "/api", concurrency: int = 32
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.url = f"http://127.0.0.1:{front.port}"
        self.rate = rate
        self.path = path
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self._sent = 0
        self._answered: Counter[tuple[str, int]] = Counter()
        self._failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def sent(self) -> int:
        """Requests sent so far."""
        with self._lock:
            return self._sent

    @property
    def answered(self) -> Counter[tuple[str, int]]:
        """Answers so far by (X-Color, status); `none` when the answer named no color."""
        with self._lock:
            return Counter(self._answered)

    @property
    def failed(self) -> int:
        """Requests that got no HTTP answer at all."""
        with self._lock:
            return self._failed

    def answered_by(self, color: str) -> int:
        """How many answers came from `color`."""
        return sum(n for (c, _s), n in self.answered.items() if c == color)

    def start(self) -> Load:
        """Start sending in the background."""
        self._thread = threading.Thread(target=self._main, name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending, wait for the requests in flight; re-raise the sender's crash."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if self._error is not None:
            raise AssertionError("the load generator crashed") from self._error

    def wait_sent(self, n: int, timeout: float = 60.0) -> None:
        """Block until `n` requests were sent in all; fail on timeout or a crash."""
        deadline = time.monotonic() + timeout
        while self.sent < n:
            if self._error is not None:
                raise AssertionError("the load generator crashed") from self._error
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.sent} of {n} requests sent in {timeout}s")
            self._stop.wait(0.02)  # a polling cadence, not a wait for something to happen

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._send_all())
        except BaseException as e:  # noqa: BLE001 -- handed to the test by stop()/wait_sent()
            self._error = e

    async def _send_all(self) -> None:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=10.0) as client:
            start = time.monotonic()
            n = 0
            while not self._stop.is_set():
                # The n-th request is due at start + n / rate: a schedule, not a sleep per
                # request, so that slow answers do not lower the rate.
                delay = start + n / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                with self._lock:
                    self._sent += 1
                n += 1
                task = asyncio.create_task(self._one(client, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, slots: asyncio.Semaphore) -> None:
        try:
            answer = await client.get(self.path)
        except httpx.HTTPError:
            with self._lock:
                self._failed += 1
        else:
            with self._lock:
                self._answered[answer.headers.get("X-Color", "none"), answer.status_code] += 1
        finally:
            slots.release()
