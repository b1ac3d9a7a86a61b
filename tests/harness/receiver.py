"""A real HTTP receiver on loopback that records every request and answers from a script.

    async with serve([Reply(500), Reply(500), Reply(200)]) as receiver:
        ... point a sink at receiver.url ...
        first, second, third = await receiver.wait_for(3)

Each request takes the next step of the script (`Reply(...)` or `HANG`: accept and never
answer); once the script is used up, every request gets `default`. Arrival times are the
receiver's own clocks, taken when the whole request has arrived.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc
import h11

_READ_SIZE: Final = 65536
#: How long a test waits for something that should happen at once: generous, for slow CI.
WAIT: Final = 15.0


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b"ok"


class _Hang:
    """Accept the request, then never answer."""

    def __repr__(self) -> str:
        return "HANG"


HANG: Final = _Hang()
Step = Reply | _Hang


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: Mapping[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival, to compare with HTTP dates

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class Receiver:
    """Records requests and answers them; made by `serve`."""

    def __init__(self, script: Iterable[Step], default: Step, path: str) -> None:
        self.requests: list[Received] = []
        self.path = path
        self.port = 0
        #: What the next requests get, in order; then `default`. Both may be changed.
        self.script: deque[Step] = deque(script)
        self.default = default
        self._arrived = anyio.Event()

    @property
    def url(self) -> str:
        """Where to send: a Slack-like URL whose path is a token."""
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def wait_for(self, count: int) -> list[Received]:
        """The first `count` requests, waiting generously for them to arrive."""
        with anyio.fail_after(WAIT):
            while len(self.requests) < count:
                await self._arrived.wait()
        return self.requests[:count]

    def _record(self, request: Received) -> Step:
        self.requests.append(request)
        self._arrived.set()
        self._arrived = anyio.Event()
        return self.script.popleft() if self.script else self.default

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one connection, request after request, until the client closes it."""
        async with stream:
            conn = h11.Connection(h11.SERVER)
            try:
                while await self._one_exchange(conn, stream):
                    conn.start_next_cycle()
            except (h11.RemoteProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    async def _one_exchange(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> bool:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(_READ_SIZE)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed, or PAUSED after a close
                return False
        assert request is not None
        step = self._record(
            Received(
                method=request.method.decode(),
                path=request.target.decode(),
                headers={k.decode().lower(): v.decode() for k, v in request.headers},
                body=body,
                at=time.monotonic(),
                wall=time.time(),
            )
        )
        if isinstance(step, _Hang):
            await anyio.sleep_forever()
        assert isinstance(step, Reply)
        headers = [*step.headers.items(), ("Content-Length", str(len(step.body)))]
        await stream.send(conn.send(h11.Response(status_code=step.status, headers=headers)) or b"")
        await stream.send(conn.send(h11.Data(data=step.body)) or b"")
        await stream.send(conn.send(h11.EndOfMessage()) or b"")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


@asynccontextmanager
async def serve(
    script: Iterable[Step] = (), *, default: Step = Reply(), port: int = 0, path: str | None = None
) -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 (on `port`, or a free one) until the block ends."""
    receiver = Receiver(script, default, path or f"/services/T01/B02/{secrets.token_hex(12)}")
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    receiver.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - not Django
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, receiver.handle)
            try:
                yield receiver
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()


def closed_port() -> int:
    """A loopback port nothing listens on (until someone serves on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
