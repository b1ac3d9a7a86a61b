"""A real `NOTIFY_SOCKET`: an AF_UNIX datagram socket the test owns, as systemd would."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class NotifySocket:
    """Collects sd_notify datagrams with their arrival times (monotonic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._cond:
                for line in data.decode("utf-8", "replace").splitlines():
                    self.messages.append((now, line))
                self._cond.notify_all()

    def lines(self) -> list[str]:
        """Every line received so far."""
        with self._cond:
            return [m for _, m in self.messages]

    def wait_for(
        self, predicate: Callable[[str], bool] | str, timeout: float = 30.0, after: int = 0
    ) -> tuple[int, float, str]:
        """The first message from index `after` matching; (index, arrival, line)."""
        match = (lambda m: m == predicate) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.messages)):
                    at, line = self.messages[i]
                    if match(line):
                        return i, at, line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no sd_notify message matching {predicate!r} within "
                        f"{timeout}s; got {[m for _, m in self.messages][-20:]}"
                    )
                self._cond.wait(remaining)

    def close(self) -> None:
        """Stop reading and remove the socket."""
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
