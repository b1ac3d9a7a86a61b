"""The daemon's side of the control socket: bounded, authorized, and impossible to crash.

Each connection carries one request. Callers are identified by the kernel
(`SO_PEERCRED`), not by anything they say; read-only commands are open to anyone who
can connect, mutating ones need root, guardd's own user or the admin group. Whatever a
peer sends, it gets an error line (if it is still there) and the server goes on.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, TaskStatus
from structlog.typing import FilteringBoundLogger

from guardd.control import protocol
from guardd.control.protocol import ErrorCode
from guardd.exceptions import ProtocolError, UnsafePath
from guardd.secrets import redact

__all__ = ["Caller", "ControlServer", "Handler"]

_PEERCRED: Final = struct.Struct("3i")
# Accept errors (EMFILE, ENFILE) clear when connections close; retrying at once would spin.
_ACCEPT_BACKOFF_S: Final = 0.1
# The busy answer goes to a peer that has not said anything yet; never wait on it for long.
_BUSY_SEND_TIMEOUT_S: Final = 1.0
# The traceback stays in guardd's log; the peer learns only that it was not its fault.
_INTERNAL: Final = protocol.encode_error(ErrorCode.INTERNAL, "internal error; see guardd's log")


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a connection, as the kernel reports it."""

    uid: int
    gid: int
    pid: int
    user: str
    admin: bool
    waiting: Callable[[], bool] = field(default=lambda: True, compare=False, repr=False)
    """Whether the peer still waits for the answer (has not closed the connection)."""

    def by(self) -> str:
        """The journal's `by` field: `uid:<n>(<user>)`."""
        return f"uid:{self.uid}({self.user})"


Handler = Callable[[str, dict[str, Any], Caller], Awaitable[dict[str, Any]]]


def _group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LookupError(f"group {name!r} does not exist") from None


def _peer_waits(sock: socket.socket) -> bool:
    """Whether the peer of `sock` still waits for an answer: it has not closed its end.

    guardctl keeps the connection open until the answer, and closes it when it gives up
    (its timeout, an interrupt). A look without reading: nothing is taken off the socket.
    """
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing more to read, and still open
    except OSError:
        return False  # reset


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _process_groups(pid: int, uid: int) -> set[int] | None:
    """The supplementary groups of a live process, or None if /proc cannot tell."""
    try:
        # A str path, not a `Path`: a `Path` interns its parts, and a fresh pid string per
        # request churns CPython's interned-string table (see `guardd.faults`).
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:  # noqa: PTH123
            text = f.read()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    # The peer waits for our answer, so its pid cannot have been reused; the uid check
    # catches a peer that handed its connection to another process and exited.
    uids = fields.get("Uid", "").split()
    if not uids or int(uids[0]) != uid:
        return None
    return {int(g) for g in fields.get("Groups", "").split()}


class ControlServer:
    """Serves the control protocol on a Unix socket, calling `handler` for each request."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        mode: int = 0o660,
        group: str | None = None,
        admin_group: str | None = None,
        request_timeout: float = 5.0,
        max_connections: int = 64,
        max_request_bytes: int = protocol.MAX_REQUEST_BYTES,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self._path = path
        self._handler = handler
        self._mode = mode
        self._group = group
        self._admin_group = admin_group
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._max_request_bytes = max_request_bytes
        self._log: FilteringBoundLogger = logger or structlog.get_logger("guardd.control")
        self._admin_gid: int | None = None
        self._own_uid = os.geteuid()
        self._active = 0

    @property
    def path(self) -> Path:
        """Where the socket lives."""
        return self._path

    @property
    def active_connections(self) -> int:
        """Connections being served right now (busy rejections not counted)."""
        return self._active

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report started, serve until cancelled, then remove the socket."""
        if self._admin_group is not None:
            self._admin_gid = _group_id(self._admin_group)
        sock, inode = self._bind()
        try:
            listener = await SocketListener.from_socket(sock)
            async with listener, anyio.create_task_group() as tg:
                self._log.info("control_listening", socket=str(self._path))
                task_status.started()
                await self._accept_forever(listener, tg)
        finally:
            sock.close()
            self._unlink_if_ours(inode)

    def _bind(self) -> tuple[socket.socket, int]:
        self._clear_stale_socket()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self._path))
        except BaseException:
            sock.close()
            raise
        try:
            # Permissions are set before listen(): until then every connect is refused,
            # so no one slips in under the umask's looser mode.
            self._path.chmod(self._mode)
            if self._group is not None:
                os.chown(self._path, -1, _group_id(self._group))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            return sock, os.lstat(self._path).st_ino
        except BaseException:
            sock.close()
            self._path.unlink(missing_ok=True)
            raise

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UnsafePath(f"{self._path} exists and is not a socket; not removing it")
        result = connect_answer(self._path)
        if result != errno.ECONNREFUSED:
            raise OSError(
                errno.EADDRINUSE,
                f"{self._path} is in use by another process "
                f"(connect: {os.strerror(result) if result else 'accepted'})",
            )
        self._path.unlink(missing_ok=True)

    def _unlink_if_ours(self, inode: int) -> None:
        # A newer guardd may have replaced the socket meanwhile; its socket is not ours to remove.
        try:
            if os.lstat(self._path).st_ino == inode:
                self._path.unlink()
        except FileNotFoundError:
            pass

    async def _accept_forever(self, listener: SocketListener, tg: TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except anyio.BrokenResourceError as e:
                self._log.warning("control_accept_failed", error=str(e.__cause__ or e))
                await anyio.sleep(_ACCEPT_BACKOFF_S)
                continue
            if self._active >= self._max_connections:
                tg.start_soon(self._reject_busy, stream)
            else:
                self._active += 1
                tg.start_soon(self._serve_connection, stream)

    async def _reject_busy(self, stream: SocketStream) -> None:
        reply = protocol.encode_error(
            ErrorCode.BUSY, f"too many control connections ({self._max_connections}); try again"
        )
        async with stream:
            with anyio.move_on_after(_BUSY_SEND_TIMEOUT_S):
                await _send_quietly(stream, reply)

    async def _serve_connection(self, stream: SocketStream) -> None:
        try:
            async with stream:
                reply = await self._answer(stream)
                if reply is not None:
                    with anyio.move_on_after(self._request_timeout):
                        await _send_quietly(stream, reply)
        except Exception:  # noqa: BLE001 - logged; one connection must not end the server
            self._log.exception("control_connection_failed")
        finally:
            self._active -= 1

    async def _answer(self, stream: SocketStream) -> bytes | None:
        raw = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - anyio, not Django  # nosec B610
        pid, uid, gid = _PEERCRED.unpack(
            raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        line: bytes | None = None
        with anyio.move_on_after(self._request_timeout):
            try:
                line = await self._read_line(stream)
            except ProtocolError as e:
                self._log.debug("control_bad_request", code=e.code, message=e.message, uid=uid)
                return protocol.encode_error(e.code, e.message)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        if line is None:
            return protocol.encode_error(
                ErrorCode.TIMEOUT, f"no complete request within {self._request_timeout:g}s"
            )
        try:
            request = protocol.parse_request(line)
        except ProtocolError as e:
            self._log.debug("control_bad_request", code=e.code, message=e.message, uid=uid)
            return protocol.encode_error(e.code, e.message)
        caller = await anyio.to_thread.run_sync(self._identify, pid, uid, gid)
        caller = replace(caller, waiting=functools.partial(_peer_waits, raw))
        if request.mutating and not caller.admin:
            self._log.warning("control_not_permitted", cmd=request.cmd, by=caller.by())
            return protocol.encode_error(ErrorCode.NOT_PERMITTED, self._denial(request.cmd, caller))
        return await self._call_handler(request, caller)

    async def _read_line(self, stream: SocketStream) -> bytes:
        """Read up to the first newline, within `max_request_bytes` newline included."""
        buffer = bytearray()
        while True:
            try:
                chunk = await stream.receive(self._max_request_bytes - len(buffer))
            except anyio.EndOfStream:
                if not buffer:
                    raise  # connected and left without a word: nobody to answer
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, "the request ended without a newline"
                ) from None
            end = chunk.find(b"\n")
            if end >= 0:
                buffer += chunk[:end]
                return bytes(buffer)
            buffer += chunk
            if len(buffer) >= self._max_request_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"no newline within {self._max_request_bytes} bytes"
                )

    def _identify(self, pid: int, uid: int, gid: int) -> Caller:
        # Blocking NSS lookups (LDAP, sssd) run here, in a worker thread.
        user = _user_name(uid)
        admin = self._is_admin(pid, uid, gid, user)
        return Caller(uid=uid, gid=gid, pid=pid, user=user, admin=admin)

    def _is_admin(self, pid: int, uid: int, gid: int, user: str) -> bool:
        if uid in (0, self._own_uid):
            return True
        if self._admin_gid is None:
            return False
        if gid == self._admin_gid:
            return True
        groups = _process_groups(pid, uid) if pid > 0 else None
        if groups is None:
            # The peer is in another pid namespace or /proc is hidden: fall back to the
            # group database, which says what the user gets at login.
            groups = set(os.getgrouplist(user, gid)) if user != str(uid) else set()
        return self._admin_gid in groups

    def _denial(self, cmd: str, caller: Caller) -> str:
        who = "root or guardd's own user"
        if self._admin_group is not None:
            who += f" or in group {self._admin_group!r}"
        return f"{cmd!r} changes guardd's state; {caller.by()} is not {who}"

    async def _call_handler(self, request: protocol.Request, caller: Caller) -> bytes:
        try:
            # Typed as object: a handler written in haste may still return something else.
            result: object = await self._handler(request.cmd, request.args, caller)
        except Exception as e:  # noqa: BLE001 - the client gets `internal`, the log the traceback
            code = protocol.code_of(e)
            if code is not None:
                # An error raised on purpose (`protocol.ANSWERED`): its message is the answer.
                return protocol.encode_error(code, redact(str(e)))
            self._log.exception("control_handler_failed", cmd=request.cmd, by=caller.by())
            return _INTERNAL
        if not isinstance(result, dict):
            self._log.error("control_result_not_dict", cmd=request.cmd, type=type(result).__name__)
            return _INTERNAL
        try:
            reply = protocol.encode_result(result)
        except (TypeError, ValueError):
            self._log.exception("control_result_not_json", cmd=request.cmd)
            return _INTERNAL
        # The reply is ASCII JSON; a known secret inside a string is replaced in place.
        return redact(reply.decode("ascii")).encode("ascii")


async def _send_quietly(stream: SocketStream, reply: bytes) -> None:
    # The peer may be gone already; there is nobody left to tell.
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stream.send(reply)


def connect_answer(path: Path) -> int:
    """What a connect to the Unix socket at `path` answers, as `connect_ex` gives it: 0 (a
    process accepted), `ECONNREFUSED` (nobody listens any more), `EAGAIN` (a listener
    whose backlog is full), or another errno. A Unix connect answers at once."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        return probe.connect_ex(str(path))
