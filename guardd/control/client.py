"""guardctl's side of the control socket: one blocking request, one answer.

Only the standard library is imported, so that guardctl starts fast.
"""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Any, Final

from guardd.control import protocol
from guardd.control.protocol import ErrorCode
from guardd.exceptions import (
    ControlError,
    DaemonUnreachable,
    DaemonUnresponsive,
    NotPermitted,
    ProtocolError,
    Refused,
)

__all__ = ["call"]

# A history answer can be long, but not without bound.
MAX_REPLY_BYTES: Final = 32 * 1024 * 1024


def call(
    socket_path: Path, cmd: str, args: dict[str, Any] | None = None, *, timeout: float = 5.0
) -> dict[str, Any]:
    """Send `cmd` to the daemon at `socket_path` and return its `result`.

    Raises `DaemonUnreachable` (no socket, nobody listening, busy, no answer in time),
    `NotPermitted`, `Refused`, or another `ControlError` for any other failure.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, socket_path)
        try:
            sock.sendall(protocol.encode_request(cmd, args))
        except (BrokenPipeError, ConnectionResetError):
            # The server may have answered (busy) and closed before reading: read that answer.
            pass
        except TimeoutError:
            raise DaemonUnresponsive(f"guardd did not read the request in {timeout:g}s") from None
        line = _read_line(sock, deadline, timeout)
    try:
        return protocol.parse_response(line)
    except ProtocolError as e:
        if e.code == ErrorCode.NOT_PERMITTED:
            raise NotPermitted(e.message) from None
        if e.code == ErrorCode.REFUSED:
            raise Refused(e.message) from None
        if e.code == ErrorCode.BUSY:
            raise DaemonUnreachable(f"guardd is busy: {e.message}") from None
        raise


def _connect(sock: socket.socket, path: Path) -> None:
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        raise DaemonUnreachable(f"no control socket at {path}; is guardd running?") from None
    except ConnectionRefusedError:
        raise DaemonUnreachable(f"nothing listens on {path}; is guardd running?") from None
    except PermissionError:
        raise NotPermitted(
            f"permission denied on {path}; ask for membership in the socket's group"
        ) from None
    except TimeoutError:
        raise DaemonUnreachable(f"guardd did not accept a connection on {path}") from None
    except OSError as e:
        if e.errno == errno.EAGAIN:
            raise DaemonUnreachable(f"guardd's backlog on {path} is full") from None
        raise DaemonUnreachable(f"cannot connect to {path}: {e.strerror or e}") from None


def _read_line(sock: socket.socket, deadline: float, timeout: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DaemonUnresponsive(f"guardd did not answer within {timeout:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise DaemonUnresponsive(f"guardd did not answer within {timeout:g}s") from None
        except OSError as e:
            raise DaemonUnreachable(f"connection to guardd lost: {e.strerror or e}") from None
        if not chunk:
            raise DaemonUnreachable("guardd closed the connection without answering")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise ControlError(f"guardd's answer exceeds {MAX_REPLY_BYTES} bytes")
