"""One HTTP/1.1 GET over a fresh connection: h11 driven over an anyio byte stream.

A probe needs one request and one answer, read in bounded pieces; a general client's
pool, its request and response models and its decoders cost several times the exchange
itself (httpx ~890 µs a request against ~155 µs for h11 over plain streams, on loopback).
h11 parses; this module only moves bytes. The caller owns the deadline (an anyio cancel
scope around the whole exchange) and the body bound (it stops reading).

`Connector` is the seam: a coroutine that opens the byte stream. The default dials TCP
and, for https, wraps it in TLS with the standard `ssl` module.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

from guardd import httpfields
from guardd.probes._socket import connect_literal

if TYPE_CHECKING:
    import ssl

# The largest header block accepted (h11 refuses one past it: "receive buffer too long").
MAX_HEAD_BYTES = 100 * 1024
# The most read from the socket at once: a huge chunk or body arrives in pieces this size.
READ_BYTES = 65536
# Statuses whose Location is followed when redirects are asked for.
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class ProtocolError(Exception):
    """The upstream's bytes are not HTTP/1.1, or the connection ended mid-answer."""


class RequestError(ValueError):
    """The request cannot be sent as written: a header name or value is not valid HTTP.

    Its text is guardd's own and names no header value: h11's reason quotes the value,
    and a header is where credentials travel (`Authorization: Bearer ...`).
    """


class Target:
    """Where a URL points: scheme, host, port and the request target (path?query)."""

    __slots__ = ("family", "host", "port", "request_target", "scheme", "url")

    def __init__(self, url: str) -> None:
        """Raise `ValueError` for a URL that is not http(s)://host[:port]/..."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # An address literal is dialled as it is (`connect_literal`); None for a host name.
        self.family: socket.AddressFamily | None = None
        with contextlib.suppress(ValueError):
            version = ipaddress.ip_address(self.host).version
            self.family = socket.AF_INET if version == 4 else socket.AF_INET6

    @property
    def where(self) -> str:
        """`host:port`, brackets around an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def host_header(self) -> str:
        """The Host header: the port only when it is not the scheme's own."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


Connector = Callable[[Target, "ssl.SSLContext | None"], Awaitable[anyio.abc.ByteStream]]


async def connect(target: Target, tls: ssl.SSLContext | None) -> anyio.abc.ByteStream:
    """A TCP connection to `target`, wrapped in TLS (stdlib `ssl`) when `tls` is given.

    Raises `OSError` (refused, unreachable, DNS) or `ssl.SSLError`; a plain connection to
    an address literal may raise the handshake's `OSError` at its first send instead.
    """
    family = target.family
    stream: anyio.abc.ByteStream
    if family is None:
        stream = await anyio.connect_tcp(target.host, target.port)
    else:
        # Plain HTTP sends the request first, so the handshake need not be waited for; TLS
        # wraps the stream, and anyio's TLS stream turns an `OSError` into another error.
        stream = await connect_literal(target.host, target.port, family, early=tls is None)
    if tls is None:
        return stream
    literal = family is not None
    try:
        # The handshake runs under the caller's deadline, so a server that stalls it
        # costs at most the probe's timeout.
        return await TLSStream.wrap(
            stream,
            hostname=None if literal and not tls.check_hostname else target.host,
            ssl_context=tls,
            standard_compatible=False,
        )
    except BaseException:
        await stream.aclose()
        raise


class Response:
    """An answer's status and headers; its body is read with `aiter_raw`."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: h11.Connection,
        status: int,
        headers: dict[str, str],
    ) -> None:
        self._stream = stream
        self._conn = conn
        self.status = status
        # Names in lower case; a repeated header keeps its last value.
        self.headers = headers

    async def _next(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = self._conn.next_event()
        while event is h11.NEED_DATA:
            self._conn.receive_data(await _receive(self._stream))
            event = self._conn.next_event()
        return event

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as sent (de-chunked, not decoded), in pieces of at most READ_BYTES.

        Raises `ProtocolError` for a malformed or cut-short body, `OSError` for a reset.
        """
        while True:
            try:
                event = await self._next()
            except h11.RemoteProtocolError as e:
                raise ProtocolError(str(e)) from e
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return
            else:
                raise ProtocolError(f"unexpected {type(event).__name__} in a body")

    async def aclose(self) -> None:
        """Close the connection."""
        await self._stream.aclose()

    def keep(self) -> Idle | None:
        """The connection for the next request (`keepalive`), if this answer was read to
        its end and both sides may go on; else None, and the caller closes it."""
        if self._conn.our_state is not h11.DONE or self._conn.their_state is not h11.DONE:
            return None
        try:
            self._conn.start_next_cycle()
        except h11.LocalProtocolError:
            return None
        return Idle(self._stream, self._conn)


class Idle:
    """A kept-alive connection between two requests."""

    __slots__ = ("conn", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn


async def _receive(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive(READ_BYTES)
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        return b""
    except anyio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, OSError):
            raise cause from None
        raise ConnectionResetError(104, "Connection reset by peer") from e


def _not_an_answer(event: object) -> None:
    if isinstance(event, h11.ConnectionClosed):
        raise ProtocolError("server disconnected without sending a response")
    raise ProtocolError(f"unexpected {type(event).__name__} before the answer")


async def get(
    target: Target,
    headers: Sequence[tuple[str, str]],
    *,
    tls: ssl.SSLContext | None,
    connector: Connector = connect,
    idle: Idle | None = None,
) -> Response:
    """Send `GET target` on a new connection (or on `idle`) and read the status and headers.

    The caller reads the body (`Response.aiter_raw`) and must `aclose()` the response (or
    `keep()` it). A kept connection the server has closed meanwhile is replaced by a new
    one, once. Raises `OSError`, `ssl.SSLError` or `ProtocolError`, and `RequestError`
    when `headers` cannot be sent (no byte is sent then); the caller's cancel scope bounds
    the time.
    """
    if idle is not None:
        try:
            return await _exchange(idle.stream, idle.conn, target, headers)
        except (OSError, ProtocolError):
            pass  # closed by the server while idle (nginx's keepalive_timeout): reconnect
    stream = await connector(target, tls if target.scheme == "https" else None)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    return await _exchange(stream, conn, target, headers, fresh=True)


def _request_bytes(
    conn: h11.Connection, target: Target, headers: tuple[tuple[str, str], ...]
) -> bytes:
    """The bytes of `GET target` with `headers`; raises `RequestError` if h11 refuses them."""
    request = _request(target.request_target, headers)
    if request is None:
        raise RequestError(unsendable(headers))
    data = conn.send(request)
    return (data or b"") + (conn.send(h11.EndOfMessage()) or b"")


def _fields(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """An answer's header fields by lower-case name. A name sent on several lines is one
    field, its values joined by ", " in order (RFC 9110 §5.3), as httpx gives it: never
    only the last line, which would let one value hide another (a `Content-Encoding`
    applied twice, two colors named in `switch.verify_header`). A value is read as UTF-8
    when it is that (what servers send today, and what a message quoting it shows), else
    as Latin-1, which reads any bytes (RFC 9110 §5.5)."""
    fields: dict[str, str] = {}
    for k, v in headers:
        name, value = k.decode("latin-1").lower(), _text(v)
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


@functools.lru_cache(maxsize=256)
def _request(request_target: str, headers: tuple[tuple[str, str], ...]) -> h11.Request | None:
    """The request event, built once per URL and headers: h11 checks every header as it
    builds one, a third of its work for a probe's exchange (events are not changed by
    sending them). None when h11 refuses the headers."""
    try:
        return h11.Request(method="GET", target=request_target, headers=list(headers))
    except (h11.LocalProtocolError, UnicodeError):
        # h11 quotes the offending header (a non-ASCII one, its characters): only guardd's
        # own words go on, raised by the caller so that h11's exception is not even
        # chained to them.
        return None


async def _exchange(
    stream: anyio.abc.ByteStream,
    conn: h11.Connection,
    target: Target,
    headers: Sequence[tuple[str, str]],
    *,
    fresh: bool = False,
) -> Response:
    """Send the request on `stream` and read the answer's head; `fresh`: a new connection,
    whose parser holds nothing yet."""
    try:
        # The config's `Host`, when given (a virtual host behind the URL's address),
        # replaces the URL's: two would be refused.
        given = any(name.lower() == "host" for name, _ in headers)
        data = _request_bytes(
            conn, target, (*(() if given else [("Host", target.host_header)]), *headers)
        )
        try:
            await stream.send(data)
        except anyio.BrokenResourceError as e:
            cause = e.__cause__
            raise cause if isinstance(cause, OSError) else ConnectionResetError(104, str(e)) from e
        if fresh:
            # Nothing was received on a new connection yet: asking h11 first would only
            # say NEED_DATA, a parse of an empty buffer per probe.
            conn.receive_data(await _receive(stream))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await _receive(stream))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return Response(stream, conn, event.status_code, _fields(event.headers))
            _not_an_answer(event)
    except h11.RemoteProtocolError as e:
        await stream.aclose()
        raise ProtocolError(str(e)) from e
    except BaseException:
        await stream.aclose()
        raise


def unsendable(headers: Sequence[tuple[str, str]]) -> str:
    """Why h11 refused to send `headers`, in words that quote no header value.

    Names the first header whose value cannot be sent (a valid name is not a secret), or
    says a name is not valid; h11 also refuses headers a GET cannot carry as given (a
    `Content-Length` without a body, a second `Host`), which the last sentence covers.
    """
    for name, value in headers:
        if httpfields.name_problem(name):
            return "cannot send this request: a header name is not valid HTTP"
        if httpfields.value_problem(value):
            return f"cannot send this request: the value of header {name} is not valid HTTP"
    return "cannot send this request: a header is not valid for an HTTP/1.1 GET"
