"""What every suite shares: the temp dir, the app server, the notify hub, the clock."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.nginx import AppServer, Hit
from bench.notify import NotifyHub

# Endpoints of the app: faultable colors for rollbacks, steady ones for cost and soak.
COLORS = {"blue": "blue", "green": "green", "sblue": "blue", "sgreen": "green"}


@dataclass
class Bench:
    """The shared state of one run."""

    root: Path
    quick: bool
    app: AppServer
    hub: NotifyHub
    started: float = field(default_factory=time.monotonic)

    def say(self, message: str) -> None:
        """Progress on stderr, stamped with the run's elapsed time."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def wait_hit(
        self, since: int, timeout: float, *, ua: str | None = None, port: int | None = None
    ) -> Hit:
        """Wait until the app logs a request (from a User-Agent prefix, to a port)."""
        deadline = time.monotonic() + timeout
        while True:
            for hit in self.app.hits(since):
                if (ua is None or hit.ua.startswith(ua)) and (port is None or hit.port == port):
                    return hit
            if time.monotonic() > deadline:
                raise TimeoutError(f"no request from {ua or 'anyone'} within {timeout:g}s")
            time.sleep(0.02)


def emit(result: object, out: Path | None, name: str) -> None:
    """A standalone suite's result: printed as JSON, and written to `out/name` if given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text + "\n")
