"""Hostile and broken HTTP upstreams on loopback, built on raw sockets so they can misbehave.

    with Hostile("silent") as h:
        h.url                          # http://127.0.0.1:<port>/healthz
        h.set_mode("dribble")          # headers, then the body one byte a second
        h.connections                  # how many connections were accepted

| mode            | what the server does                                                   |
|-----------------|------------------------------------------------------------------------|
| `ok`            | 200 `{"status":"UP"}` (the baseline, e.g. over TLS)                    |
| `silent`        | accepts, reads the request, never answers                              |
| `dribble`       | 200 headers promising 1000 bytes, then one byte a second               |
| `huge`          | 200 with `Content-Length` 100 MB, streamed for as long as it is read   |
| `many_headers`  | 200 with 10,000 headers before the body                                |
| `redirect_loop` | 302 to `/loop/<n+1>` for ever                                          |
| `reset`         | 200 headers and half the body, then a TCP reset                        |
| `bad_gzip`      | 200 `Content-Encoding: gzip` over a body that is not gzip              |
| `bad_deflate`   | the same labelled `deflate`                                            |
| `br`            | 200 `Content-Encoding: br` (guardd does not decode brotli)             |
| `unknown_coding`| 200 `Content-Encoding: x-snappy-framed`                                |
| `truncated_gzip`| a gzip body cut in half, with a matching `Content-Length`              |
| `gzip_ok`       | the `ok` body, gzipped (a proxy compressing although asked not to)     |
| `deflate_ok`    | the `ok` body, zlib-deflated                                           |
| `gzip_bomb`     | 200 gzip: `BOMB_BYTES` of zeros in about a thousandth of that          |
| `deflate_bomb`  | the same with deflate                                                  |
| `deep_json`     | 200 with a JSON body nested 30,000 arrays deep                         |
| `answer`        | the status, headers and body given to `set_answer`                     |

With `keepalive=True` the `ok` and `answer` modes keep the connection open and answer
every request on it; `close_listener()` then stops accepting new connections while the
old ones go on answering (a green whose accept loop died).

Pass `tls=` (a server `ssl.SSLContext`, e.g. from `trustme`) to speak HTTPS. Every
connection runs in its own thread; `stop()` releases the silent and dribbling ones,
closes every socket and joins every thread, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import socket
import ssl
import struct
import threading
import zlib
from types import TracebackType
from typing import Literal, get_args

HostileMode = Literal[
    "ok",
    "silent",
    "dribble",
    "huge",
    "many_headers",
    "redirect_loop",
    "reset",
    "bad_gzip",
    "bad_deflate",
    "br",
    "unknown_coding",
    "truncated_gzip",
    "gzip_ok",
    "deflate_ok",
    "gzip_bomb",
    "deflate_bomb",
    "deep_json",
    "answer",
    "split",
    "huge_chunk",
    "stall_handshake",
]
HOSTILE_MODES: tuple[HostileMode, ...] = get_args(HostileMode)
HUGE_BYTES = 100 * 1024 * 1024
BOMB_BYTES = 100 * 1024 * 1024
MANY_HEADERS = 10_000


@functools.cache
def bomb(coding: str) -> bytes:
    """`BOMB_BYTES` of zeros compressed with `coding` (gzip or deflate), made once."""
    zeros = bytes(BOMB_BYTES)
    if coding == "gzip":
        return gzip.compress(zeros, compresslevel=9, mtime=0)
    return zlib.compress(zeros, 9)


class Hostile:
    """One misbehaving HTTP server on 127.0.0.1 whose manner a test chooses."""

    def __init__(
        self,
        mode: HostileMode = "ok",
        *,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        color: str = "hostile",
        keepalive: bool = False,
    ) -> None:
        self.host = host
        self.tls = tls
        self.color = color
        self.keepalive = keepalive
        self._ok_body = b'{"status":"UP","color":"%s"}' % color.encode()
        self._answer_parts: tuple[int, dict[str, str], bytes] = (200, {}, self._ok_body)
        self._mode: HostileMode = "ok"
        self.set_mode(mode)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stop_accepting = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self.connections = 0
        self.requests = 0
        self.bytes_sent = 0
        self.connections_stalled = 0
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The health URL, with the scheme the server speaks."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/healthz"

    @property
    def mode(self) -> HostileMode:
        """The current mode."""
        return self._mode

    def set_mode(self, mode: HostileMode) -> None:
        """Misbehave differently from the next request on."""
        if mode not in HOSTILE_MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(HOSTILE_MODES)}")
        self._mode = mode

    def set_answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Answer every request with this status, body and headers (mode `answer`)."""
        self._answer_parts = (status, dict(headers or {}), body)
        self.set_mode("answer")

    def close_listener(self) -> None:
        """Stop accepting: new connections are refused, open ones go on being served."""
        self._stop_accepting.set()
        if self._acceptor is not None:
            self._acceptor.join()
        self._listener.close()

    def start(self) -> Hostile:
        """Accept connections in a background thread."""
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept_loop, name=f"hostile-{self.port}")
            self._acceptor.start()
        return self

    def stop(self) -> None:
        """Release every held connection, close everything, join every thread."""
        self._stopping.set()
        self._stop_accepting.set()
        if self._acceptor is not None:
            self._acceptor.join()
            self._acceptor = None
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        self._listener.close()

    def __enter__(self) -> Hostile:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Hostile {self.url} mode={self.mode}>"

    # ---- serving -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop_accepting.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets.add(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"hostile-conn-{self.port}"
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        conn: socket.socket = raw
        try:
            raw.settimeout(10)
            if self._mode == "stall_handshake":
                # TCP is accepted, the TLS handshake (or the request) is never answered.
                with self._lock:
                    self.connections_stalled += 1
                self._stopping.wait()
                return
            if self.tls is not None:
                conn = self.tls.wrap_socket(raw, server_side=True)
                with self._lock:
                    self._sockets.add(conn)
            while not self._stopping.is_set():
                path = self._read_request(conn)
                if path is None:
                    return
                with self._lock:
                    self.requests += 1
                mode = self._mode
                self._answer(conn, path, mode)
                if not (self.keepalive and mode in ("ok", "answer")):
                    return
        except (OSError, ssl.SSLError):
            pass  # the client hung up or refused our certificate: that is the point
        finally:
            with self._lock:
                self._sockets.discard(raw)
                self._sockets.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _read_request(self, conn: socket.socket) -> str | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        request_line = data.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        return parts[1] if len(parts) >= 2 else "/"

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self._lock:
            self.bytes_sent += len(data)

    def _answer(self, conn: socket.socket, path: str, mode: HostileMode) -> None:
        if mode == "silent":
            self._stopping.wait()
        elif mode == "ok":
            body = self._ok_body
            self._send(conn, self._head(200, len(body)) + body)
        elif mode == "answer":
            status, headers, body = self._answer_parts
            self._send(conn, self._head(status, len(body), headers) + body)
        elif mode in ("bad_gzip", "bad_deflate", "br", "unknown_coding"):
            coding = {
                "bad_gzip": "gzip",
                "bad_deflate": "deflate",
                "br": "br",
                "unknown_coding": "x-snappy-framed",
            }[mode]
            body = self._ok_body
            self._send(conn, self._head(200, len(body), {"Content-Encoding": coding}) + body)
        elif mode in ("gzip_ok", "deflate_ok", "truncated_gzip"):
            coding = "deflate" if mode == "deflate_ok" else "gzip"
            body = (
                zlib.compress(self._ok_body)
                if coding == "deflate"
                else gzip.compress(self._ok_body, mtime=0)
            )
            if mode == "truncated_gzip":
                body = body[: len(body) // 2]
            self._send(conn, self._head(200, len(body), {"Content-Encoding": coding}) + body)
        elif mode in ("gzip_bomb", "deflate_bomb"):
            coding = mode.removesuffix("_bomb")
            body = bomb(coding)
            self._send(conn, self._head(200, len(body), {"Content-Encoding": coding}) + body)
        elif mode == "deep_json":
            body = b"[" * 30_000 + b"]" * 30_000
            self._send(conn, self._head(200, len(body)) + body)
        elif mode == "dribble":
            self._send(conn, self._head(200, 1000))
            for _ in range(1000):
                if self._stopping.wait(1.0):
                    return
                self._send(conn, b" ")
        elif mode == "huge":
            self._send(conn, self._head(200, HUGE_BYTES))
            chunk = b"x" * 65536
            sent = 0
            while sent < HUGE_BYTES and not self._stopping.is_set():
                self._send(conn, chunk)
                sent += len(chunk)
        elif mode == "many_headers":
            noise = b"".join(b"X-Noise-%d: %d\r\n" % (i, i) for i in range(MANY_HEADERS))
            self._send(
                conn,
                b"HTTP/1.1 200 OK\r\n"
                + noise
                + b"Content-Type: application/json\r\n"
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self._ok_body)
                + self._ok_body,
            )
        elif mode == "redirect_loop":
            n = int(path.rsplit("/", 1)[-1]) if path.startswith("/loop/") else 0
            self._send(
                conn,
                b"HTTP/1.1 302 Found\r\nLocation: /loop/%d\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n" % (n + 1),
            )
        elif mode == "split":
            # The whole answer a byte a write, each write its own segment: the client
            # must put the head and the body together from hundreds of reads.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            body = self._ok_body
            for byte in self._head(200, len(body)) + body:
                self._send(conn, bytes([byte]))
        elif mode == "huge_chunk":
            # Chunked, one chunk announced as HUGE_BYTES long and streamed until the
            # client hangs up.
            head = self._head(200, 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
            self._send(conn, head + b"%x\r\n" % HUGE_BYTES)
            chunk = b"{" * 65536
            sent = 0
            while sent < HUGE_BYTES and not self._stopping.is_set():
                self._send(conn, chunk)
                sent += len(chunk)
        elif mode == "reset":
            body = self._ok_body
            self._send(conn, _head(200, len(body)) + body[: len(body) // 2])
            # SO_LINGER with a zero timeout turns close() into a RST.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _head(self, status: int, length: int, headers: dict[str, str] | None = None) -> bytes:
        fields = {"Content-Type": "application/json", "X-Color": self.color, **(headers or {})}
        extra = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        connection = "keep-alive" if self.keepalive else "close"
        return (
            f"HTTP/1.1 {status} {_reason(status)}\r\n{extra}"
            f"Content-Length: {length}\r\nConnection: {connection}\r\n\r\n"
        ).encode()


def _reason(status: int) -> str:
    return {200: "OK", 302: "Found", 500: "Internal Server Error", 503: "Service Unavailable"}.get(
        status, "Status"
    )


def _head(status: int, length: int) -> bytes:
    return (
        f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()
