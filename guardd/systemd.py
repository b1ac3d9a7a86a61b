"""The sd_notify adapter: READY, STATUS, WATCHDOG, RELOADING, STOPPING — or nothing.

Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op, so the supervisor
calls it unconditionally.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify


class SystemdNotifier:
    """Talks to the service manager over `NOTIFY_SOCKET` when there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._status: str | None = None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if (
            self.enabled
            and usec
            and usec.isdigit()
            and int(usec) > 0
            and (not pid or pid == str(os.getpid()))
        ):
            # Half the timeout, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(usec) / 2_000_000

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self) -> None:
        """The guard is guarding."""
        self._send("READY=1")

    def reloading(self) -> None:
        """A reload has begun; the monotonic stamp satisfies Type=notify-reload too."""
        self._send(
            f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def stopping(self) -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """Publish a one-line status when it changes."""
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        """The supervisor is making progress."""
        self._send("WATCHDOG=1")
