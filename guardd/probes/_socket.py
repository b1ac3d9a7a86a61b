"""A plain non-blocking TCP socket as an anyio byte stream, for the probe's one exchange.

anyio's own `SocketStream` puts an asyncio transport and protocol (and their buffers and
callbacks) under every connection, and `anyio.connect_tcp` a task group for happy
eyeballs: together ~660 µs of CPU per fresh connection against ~270 µs for the same GET
on a bare socket waited on with `anyio.wait_readable` / `anyio.wait_writable` (loopback,
nginx, `Connection: close`; measured in-process, see README "Performance"). A probe
opens a connection a round and reads one answer, so this is most of what it costs.

Only for an address literal: a host name keeps `anyio.connect_tcp`, whose happy eyeballs
try IPv4 and IPv6 side by side (a probe must not wait out a dead address family).
"""

from __future__ import annotations

import os
import socket

import anyio
import anyio.abc

__all__ = ["SocketStream", "connect_literal"]


class SocketStream(anyio.abc.ByteStream):
    """A connected non-blocking socket; `receive` and `send` wait on anyio's readiness
    calls, so the caller's cancel scope bounds every wait.

    Raises `OSError` as the socket does (a reset is `ConnectionResetError`),
    `anyio.EndOfStream` when the peer has closed, `anyio.ClosedResourceError` after
    `aclose`.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise anyio.ClosedResourceError
        return sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next bytes the peer sent, at most `max_bytes`."""
        while True:
            sock = self._socket()
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        """Send all of `item`."""
        view = memoryview(item)
        while view:
            sock = self._socket()
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                continue
            view = view[sent:]

    async def send_eof(self) -> None:
        """Close the sending half (the peer reads an end of stream)."""
        self._socket().shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        """Close the socket (again: nothing)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


async def connect_literal(
    address: str, port: int, family: socket.AddressFamily, *, early: bool = False
) -> SocketStream:
    """A TCP connection to the address literal `address` (of `family`) and `port`.

    With `early`, the stream comes back as soon as the connect is under way, for a caller
    whose first move is to send: its first `send` or `receive` raises what the handshake
    ended with (the same `OSError`, ECONNREFUSED, ETIMEDOUT, ...). Otherwise the handshake
    is waited for and its failure raised here. Raises `OSError` (refused, unreachable,
    ...); the caller's cancel scope bounds every wait (a cancelled connect closes its
    socket).
    """
    # Non-blocking from its creation: one system call fewer a probe than setblocking().
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        # As anyio does: a probe's request goes out in one segment, at once.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((address, port))
        except BlockingIOError:
            # A non-blocking connect says EINPROGRESS even on loopback, where the handshake
            # is over by the time the call returns: waiting for writability first costs a
            # trip round the event loop a probe. A send before the handshake ends waits for
            # writability itself (EAGAIN), and one after a failed handshake raises the
            # connect's own error, so an early caller skips the wait.
            if not early:
                await anyio.wait_writable(sock)
                if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(error, os.strerror(error)) from None
    except BaseException:
        sock.close()
        raise
    return SocketStream(sock)
