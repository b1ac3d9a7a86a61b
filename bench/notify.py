"""A NOTIFY_SOCKET shared by every guardd the suite starts, as systemd's own is.

The socket has SO_PASSCRED set, so each datagram arrives with its sender's pid and
one socket tells the instances apart without a thread per instance.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

_UCRED = struct.Struct("3i")


class NotifyHub:
    """Receives sd_notify datagrams; `wait_ready(pid)` waits for that pid's READY=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self.ready: dict[int, float] = {}
        self.watchdogs: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-hub", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        space = socket.CMSG_SPACE(_UCRED.size)
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(65536, space)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            lines = data.decode("utf-8", "replace").splitlines()
            with self._cond:
                if "READY=1" in lines:
                    self.ready.setdefault(pid, now)
                if "WATCHDOG=1" in lines:
                    self.watchdogs[pid] = self.watchdogs.get(pid, 0) + 1
                self._cond.notify_all()

    def wait_ready(self, pid: int, timeout: float = 60.0) -> float:
        """The monotonic time `pid` said READY=1; raises TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: pid in self.ready, timeout):
                raise TimeoutError(f"pid {pid} sent no READY=1 within {timeout:g}s")
            return self.ready[pid]

    def close(self) -> None:
        """Stop reading and remove the socket."""
        self._stop.set()
        self._sock.close()
        self._thread.join()
        self.path.unlink(missing_ok=True)
