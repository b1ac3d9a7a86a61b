"""A real HTTP receiver on loopback that records every request and answers from a script.

    async with serve([Reply(500), Reply(500), Reply(200)]) as receiver:
        ... point a sink at receiver.url ...
        first, second, third = await receiver.wait_for(3)

Each request takes the next step of the script (`Reply(...)`, `HANG`: accept and never
answer, or a callable that makes the reply from the request, such as `SlackWebApi`); once
the script is used up, every request gets `default`. Arrival times are the
receiver's own clocks, taken when the whole request has arrived.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
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


Step = Reply | _Hang | Callable[[Received], Reply]


class SlackWebApi:
    """A stand-in for Slack's `chat.postMessage`, checking requests as Slack's docs describe.

    A bearer token in `Authorization`, a JSON body declared with its charset, `channel`, and
    `text` or `blocks`; `thread_ts` must be the `ts` of a top-level message this stand-in
    posted in that channel. Answers `{"ok": true, "channel": <ID>, "ts": ..., "message": ...}`,
    or HTTP 200 `{"ok": false, "error": ...}` with Slack's error names.
    """

    #: Channel names that exist and the IDs Slack answers with.
    CHANNELS: Final = {"#ops": "C0OPS00001", "C0OPS00001": "C0OPS00001"}

    def __init__(self, token: str) -> None:
        self.token = token
        #: Every message posted: the request's JSON plus the ts and channel ID it got.
        self.posted: list[dict[str, Any]] = []
        self._seq = 0

    def __call__(self, request: Received) -> Reply:
        if request.method != "POST" or not request.path.endswith("/chat.postMessage"):
            return Reply(404, body=b"not found")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return self._error("not_authed")
        if auth.removeprefix("Bearer ") != self.token:
            return self._error("invalid_auth")
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("application/json"):
            return self._error("invalid_form_data")
        try:
            doc = json.loads(request.body)
        except ValueError:
            return self._error("invalid_json")
        channel = self.CHANNELS.get(doc.get("channel", ""))
        if channel is None:
            return self._error("channel_not_found")
        if not doc.get("text") and not doc.get("blocks"):
            return self._error("no_text")
        thread_ts = doc.get("thread_ts")
        tops = {(m["channel_id"], m["ts"]) for m in self.posted if "thread_ts" not in m}
        if thread_ts is not None and (channel, thread_ts) not in tops:
            return self._error("thread_not_found")
        self._seq += 1
        ts = f"17000000{self._seq:02d}.{self._seq:06d}"
        self.posted.append({**doc, "ts": ts, "channel_id": channel})
        message = {"type": "message", "text": doc.get("text", ""), "ts": ts}
        if thread_ts is not None:
            message["thread_ts"] = thread_ts
        answer = {"ok": True, "channel": channel, "ts": ts, "message": message}
        if "charset" not in content_type:
            # What Slack does: accepted, with a warning.
            answer["warning"] = "missing_charset"
        return _json_reply(answer)

    @staticmethod
    def _error(error: str) -> Reply:
        return _json_reply({"ok": False, "error": error})


def slack_ratelimited(retry_after: int = 1) -> Reply:
    """Slack's rate-limit answer: HTTP 429, Retry-After, `{"ok": false, "error": "ratelimited"}`."""
    return _json_reply(
        {"ok": False, "error": "ratelimited"}, 429, {"Retry-After": str(retry_after)}
    )


def _json_reply(doc: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(
        status,
        {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
        json.dumps(doc).encode(),
    )


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
        step = self.script.popleft() if self.script else self.default
        if isinstance(step, Reply | _Hang):
            return step
        return step(request)

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
