"""The control server on a real Unix socket: answers, bounds, authorization, survival."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from structlog.testing import capture_logs

from guardd.control import client, protocol
from guardd.control.server import Caller, ControlServer
from guardd.exceptions import DaemonUnreachable, NotPermitted, Refused, UnsafePath
from guardd.secrets import Secret

pytestmark = pytest.mark.anyio

NOBODY = 65534
WAIT_S = 30.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, world-traversable directory: socket paths are limited to 107 bytes, and
    the unprivileged client must be able to reach the socket."""
    path = Path(tempfile.mkdtemp(prefix="gdctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


class FakeDaemon:
    """A handler that answers like guardd and remembers who asked what."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Caller]] = []

    async def __call__(self, cmd: str, args: dict[str, Any], caller: Caller) -> dict[str, Any]:
        self.calls.append((cmd, args, caller))
        if cmd == "status":
            return {"guard": "threader", "state": "steady", "active": "green"}
        if cmd == "history":
            return {"events": []}
        if cmd == "promote":
            raise Refused("the QoS lock is held: rolled back green -> blue")
        if cmd == "rollback" and args["reason"] == "crash":
            raise RuntimeError("the handler fell over with /etc/guardd/private detail")
        if cmd == "rollback" and args["reason"] == "not json":
            return {"when": object()}
        if cmd == "pause" and args["reason"] == "leak":
            return {
                "message": f"sent to {Secret('https://hooks.slack.test/T0/B0/XyZsecret')}",
                "url": "https://hooks.slack.test/T0/B0/XyZsecret",
            }
        return {"message": f"{cmd} done", "by": caller.by()}


@asynccontextmanager
async def serving(server: ControlServer) -> AsyncIterator[ControlServer]:
    """Run `server` for the duration of the block."""
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def call(path: Path, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The real blocking client, run in a worker thread so the server keeps running."""
    return await anyio.to_thread.run_sync(partial(client.call, path, cmd, args, timeout=WAIT_S))


async def read_reply(stream: SocketStream) -> dict[str, Any] | None:
    """The server's reply line as JSON, or None if the server hung up without one."""
    data = b""
    with anyio.fail_after(WAIT_S):
        while b"\n" not in data:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    if not data:
        return None
    assert data.endswith(b"\n")
    reply: dict[str, Any] = json.loads(data)
    return reply


async def exchange(path: Path, payload: bytes, *, eof: bool = True) -> dict[str, Any] | None:
    """Send raw bytes, optionally half-close, and return the reply."""
    async with await anyio.connect_unix(path) as stream:
        await stream.send(payload)
        if eof:
            await stream.send_eof()
        return await read_reply(stream)


def error_code(reply: dict[str, Any] | None) -> str | None:
    """The error code of a reply, asserting that it is a well-formed error."""
    if reply is None:
        return None
    assert reply["v"] == 1
    assert reply["ok"] is False
    assert set(reply["error"]) == {"code", "message"}
    code: str = reply["error"]["code"]
    return code


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait for the server to reach a state, checking often, failing after a long while."""
    with anyio.fail_after(WAIT_S):
        # The server offers no event for its connection count; a short poll is the event.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_status_is_answered_and_the_caller_is_known(sock_dir: Path) -> None:
    """A status request gets the handler's result; the kernel says who asked."""
    handler = FakeDaemon()
    async with serving(ControlServer(sock_dir / "ctl.sock", handler)):
        result = await call(sock_dir / "ctl.sock", "status")

    assert result == {"guard": "threader", "state": "steady", "active": "green"}
    [(cmd, args, caller)] = handler.calls
    assert (cmd, args) == ("status", {})
    assert (caller.uid, caller.gid, caller.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert caller.user == "root"
    assert caller.admin
    assert caller.by() == "uid:0(root)"


async def test_mutating_command_from_root_reaches_the_handler(sock_dir: Path) -> None:
    """Root may change state; the handler gets validated arguments with defaults."""
    handler = FakeDaemon()
    async with serving(ControlServer(sock_dir / "ctl.sock", handler)):
        result = await call(sock_dir / "ctl.sock", "switch", {"color": "blue"})

    assert result == {"message": "switch done", "by": "uid:0(root)"}
    assert handler.calls[0][:2] == ("switch", {"color": "blue", "force": False, "reason": None})


async def test_socket_mode_and_cleanup(sock_dir: Path) -> None:
    """The socket gets the configured mode and is removed when the server stops."""
    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, FakeDaemon(), mode=0o640, group="0")):
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_gid == 0

    assert not path.exists()


async def test_a_stale_socket_is_replaced(sock_dir: Path) -> None:
    """A socket file left by a crashed guardd does not stop the next one from starting."""
    path = sock_dir / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)

    async with serving(ControlServer(path, FakeDaemon())):
        assert (await call(path, "status"))["state"] == "steady"


async def test_a_live_socket_is_not_stolen(sock_dir: Path) -> None:
    """A second server on the same path fails instead of cutting off the first one."""
    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, FakeDaemon())):
        with pytest.raises(OSError, match="in use") as caught:
            await ControlServer(path, FakeDaemon()).serve()
        assert caught.value.errno == errno.EADDRINUSE
        assert (await call(path, "status"))["state"] == "steady"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_text("precious"), id="file"),
        pytest.param(lambda p: p.symlink_to("/etc/passwd"), id="symlink"),
        pytest.param(lambda p: p.mkdir(), id="directory"),
    ],
)
async def test_a_non_socket_is_never_removed(sock_dir: Path, make: Callable[[Path], Any]) -> None:
    """Whatever else sits at the socket path is left alone, and the server does not start."""
    path = sock_dir / "ctl.sock"
    make(path)

    with pytest.raises(UnsafePath, match="not a socket"):
        await ControlServer(path, FakeDaemon()).serve()

    assert path.is_symlink() or path.exists()
    if path.is_file() and not path.is_symlink():
        assert path.read_text() == "precious"


def _request(cmd: str, **args: Any) -> bytes:
    return protocol.encode_request(cmd, args)


GARBAGE = [
    pytest.param(
        random.Random(7).randbytes(4096),  # noqa: S311 - repeatable noise
        True,
        "bad_request",
        id="random-bytes",
    ),
    pytest.param(b'{"v": 1, "cmd": "sta', True, "bad_request", id="half-request-then-eof"),
    pytest.param(
        b'{"v": 1, "cmd": "status", "args": {}}', True, "bad_request", id="no-newline-then-eof"
    ),
    pytest.param(b"\n", True, "bad_request", id="empty-line"),
    pytest.param(b'{"v": 1, "cmd": "st\xff\xfeus"}\n', True, "bad_request", id="invalid-utf8"),
    pytest.param(b'[{"v": 1, "cmd": "status"}]\n', True, "bad_request", id="json-array"),
    pytest.param(b'"status"\n', True, "bad_request", id="json-string"),
    pytest.param(b"[" * 30_000 + b"\n", True, "bad_request", id="deeply-nested"),
    pytest.param(b"x" * 70_000, True, "too_large", id="too-large-no-newline"),
    pytest.param(b"x" * 65_536 + b"\n", True, "too_large", id="newline-just-past-limit"),
    pytest.param(_request("frobnicate"), True, "unknown_command", id="unknown-command"),
    pytest.param(b'{"v": 9, "cmd": "status"}\n', True, "unsupported_version", id="version-9"),
    pytest.param(_request("history", limit="ten"), True, "bad_request", id="wrong-arg-type"),
    pytest.param(_request("switch", color="purple"), True, "bad_request", id="wrong-color"),
    pytest.param(_request("status") + b"trailing garbage", False, None, id="trailing-bytes"),
    pytest.param(b"", True, None, id="connect-and-leave"),
]


@pytest.mark.parametrize(("payload", "eof", "expected"), GARBAGE)
async def test_garbage_gets_an_error_and_the_server_lives_on(
    sock_dir: Path, payload: bytes, eof: bool, expected: str | None
) -> None:
    """Each kind of malformed input gets its error code; then status still answers."""
    path = sock_dir / "ctl.sock"
    handler = FakeDaemon()
    with capture_logs() as logs:
        async with serving(ControlServer(path, handler)):
            reply = await exchange(path, payload, eof=eof)
            if expected is None and reply is not None:
                # Only the request before the newline counts; what follows is ignored.
                assert reply["ok"] is True
            else:
                assert error_code(reply) == expected
            assert (await call(path, "status"))["state"] == "steady"

    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert all(cmd == "status" for cmd, _, _ in handler.calls)


async def test_half_a_request_then_gone(sock_dir: Path) -> None:
    """A peer that sends half a request and leaves without reading costs nothing."""
    path = sock_dir / "ctl.sock"
    with capture_logs() as logs:
        async with serving(ControlServer(path, FakeDaemon())) as server:
            for _ in range(20):
                async with await anyio.connect_unix(path) as stream:
                    await stream.send(b'{"v": 1, "cmd": "swi')
            await wait_until(lambda: server.active_connections == 0)
            assert (await call(path, "status"))["state"] == "steady"

    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


async def test_ten_megabytes(sock_dir: Path) -> None:
    """A 10 MB flood is cut off at the limit with `too_large`, not buffered."""
    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, FakeDaemon())) as server:
        async with await anyio.connect_unix(path) as stream:

            async def flood() -> None:
                # The server hangs up mid-flood, as it should.
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send(b"{" * (10 * 1024 * 1024))

            async with anyio.create_task_group() as tg:
                tg.start_soon(flood)
                reply = await read_reply(stream)
            assert error_code(reply) == "too_large"
        await wait_until(lambda: server.active_connections == 0)
        assert (await call(path, "status"))["state"] == "steady"


async def test_silence_times_out(sock_dir: Path) -> None:
    """A peer that connects and says nothing, or stops before the newline, gets `timeout`."""
    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, FakeDaemon(), request_timeout=0.2)) as server:
        assert error_code(await exchange(path, b"", eof=False)) == "timeout"
        assert (
            error_code(await exchange(path, b'{"v": 1, "cmd": "status"}', eof=False)) == "timeout"
        )
        await wait_until(lambda: server.active_connections == 0)
        assert (await call(path, "status"))["state"] == "steady"


async def test_smaller_request_limit(sock_dir: Path) -> None:
    """`max_request_bytes` counts the newline: a request of exactly the limit passes."""
    path = sock_dir / "ctl.sock"
    line = _request("status")
    async with serving(ControlServer(path, FakeDaemon(), max_request_bytes=len(line))):
        reply = await exchange(path, line)
        assert reply is not None and reply["ok"] is True
        assert error_code(await exchange(path, b" " + line)) == "too_large"


def _raise_nofile(minimum: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < minimum:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(minimum, hard), hard))


async def test_500_idle_connections_do_not_block_status(sock_dir: Path) -> None:
    """500 held idle connections (under the cap) leave the server answering."""
    _raise_nofile(4096)
    path = sock_dir / "ctl.sock"
    server = ControlServer(path, FakeDaemon(), max_connections=1000, request_timeout=WAIT_S * 4)
    async with serving(server):
        idle = [await anyio.connect_unix(path) for _ in range(500)]
        await wait_until(lambda: server.active_connections == 500)
        assert (await call(path, "status"))["state"] == "steady"
        for stream in idle:
            await stream.aclose()
        await wait_until(lambda: server.active_connections == 0)
        assert (await call(path, "status"))["state"] == "steady"


async def test_500_connections_over_the_cap_get_busy(sock_dir: Path) -> None:
    """Past `max_connections` a peer is told `busy` at once, not queued; after, status works."""
    _raise_nofile(4096)
    path = sock_dir / "ctl.sock"
    server = ControlServer(path, FakeDaemon(), request_timeout=WAIT_S * 4)  # the default cap: 64
    async with serving(server):
        streams = [await anyio.connect_unix(path) for _ in range(500)]
        await wait_until(lambda: server.active_connections == 64)
        replies = [await read_reply(stream) for stream in streams[64:]]
        assert {error_code(reply) for reply in replies} == {"busy"}
        with pytest.raises(DaemonUnreachable, match="busy"):
            await call(path, "status")

        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: server.active_connections == 0)
        assert (await call(path, "status"))["state"] == "steady"


async def test_handler_exception_is_internal_and_the_server_lives_on(sock_dir: Path) -> None:
    """A crashing handler gives `internal`, with no detail for the client, and a log entry."""
    path = sock_dir / "ctl.sock"
    with capture_logs() as logs:
        async with serving(ControlServer(path, FakeDaemon())):
            for reason in ("crash", "not json"):
                reply = await exchange(path, _request("rollback", reason=reason))
                assert error_code(reply) == "internal"
                assert "private" not in json.dumps(reply)
                assert "Traceback" not in json.dumps(reply)
            assert (await call(path, "status"))["state"] == "steady"

    events = [e["event"] for e in logs if e["log_level"] == "error"]
    assert events == ["control_handler_failed", "control_result_not_json"]


async def test_refused_is_passed_on(sock_dir: Path) -> None:
    """The handler's `Refused` reaches the client with its message."""
    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, FakeDaemon())):
        with pytest.raises(Refused, match="QoS lock is held"):
            await call(path, "promote", {"reason": None})


async def test_secrets_never_leave_the_socket(sock_dir: Path) -> None:
    """A registered secret in a handler's result is replaced before it is sent."""
    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, FakeDaemon())):
        result = await call(path, "pause", {"reason": "leak"})

    assert "XyZsecret" not in json.dumps(result)
    assert result["url"] == "***"


async def test_a_handler_may_deny_too(sock_dir: Path) -> None:
    """`NotPermitted` raised by the handler reaches the client as `not_permitted`."""

    async def handler(cmd: str, args: dict[str, Any], caller: Caller) -> dict[str, Any]:
        raise NotPermitted("only the on-call may promote")

    path = sock_dir / "ctl.sock"
    async with serving(ControlServer(path, handler)):
        with pytest.raises(NotPermitted, match="on-call"):
            await call(path, "promote")


_AS_CLIENT = """
import json, sys
from pathlib import Path
from guardd.control.client import call
from guardd.exceptions import ControlError
out = {}
for cmd, args in (("status", {}), ("history", {"limit": 5}), ("switch", {"color": "blue"}),
                  ("qos_unlock", {})):
    try:
        out[cmd] = {"ok": call(Path(sys.argv[1]), cmd, args, timeout=30)}
    except ControlError as e:
        out[cmd] = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(out))
"""


async def _run_as(uid: int, gid: int, groups: str, path: Path) -> dict[str, Any]:
    groups_opt = "--clear-groups" if not groups else f"--groups={groups}"
    done = await anyio.run_process(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            groups_opt,
            sys.executable,
            "-c",
            _AS_CLIENT,
            str(path),
        ]
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_an_unprivileged_caller_may_read_but_not_change(sock_dir: Path) -> None:
    """Read-only commands work for anyone who can connect; mutating ones need an admin."""
    path = sock_dir / "ctl.sock"
    handler = FakeDaemon()
    async with serving(ControlServer(path, handler, mode=0o666, admin_group="adm")):
        out = await _run_as(NOBODY, NOBODY, "", path)

    assert out["status"] == {"ok": {"guard": "threader", "state": "steady", "active": "green"}}
    assert out["history"] == {"ok": {"events": []}}
    for cmd in ("switch", "qos_unlock"):
        assert out[cmd]["error"] == "NotPermitted"
        assert "uid:65534(nobody)" in out[cmd]["message"]
        assert "'adm'" in out[cmd]["message"]
    assert [(cmd, caller.by(), caller.admin) for cmd, _, caller in handler.calls] == [
        ("status", "uid:65534(nobody)", False),
        ("history", "uid:65534(nobody)", False),
    ]


async def test_a_member_of_the_admin_group_may_change(sock_dir: Path) -> None:
    """A supplementary group equal to `admin_group` makes an unprivileged caller an admin."""
    path = sock_dir / "ctl.sock"
    handler = FakeDaemon()
    admin_gid = 4  # "adm" on Debian and Ubuntu; the name is resolved by the server
    async with serving(ControlServer(path, handler, mode=0o666, admin_group="adm")):
        out = await _run_as(NOBODY, NOBODY, str(admin_gid), path)

    assert out["switch"] == {"ok": {"message": "switch done", "by": "uid:65534(nobody)"}}
    assert out["qos_unlock"]["ok"]["message"] == "qos_unlock done"
    assert all(caller.admin for _, _, caller in handler.calls)


@pytest.mark.parametrize("option", ["admin_group", "group"])
async def test_unknown_group_fails_at_start(sock_dir: Path, option: str) -> None:
    """A misspelt group is an error at start-up, not a silent lock-out, and leaves no socket."""
    options: dict[str, Any] = {option: "no-such-group"}
    with pytest.raises(LookupError, match="no-such-group"):
        await ControlServer(sock_dir / "ctl.sock", FakeDaemon(), **options).serve()
    assert [p async for p in anyio.Path(sock_dir).iterdir()] == []


async def test_client_errors_when_nobody_listens(sock_dir: Path) -> None:
    """No socket, or a socket nobody listens on, is `DaemonUnreachable`."""
    path = sock_dir / "ctl.sock"
    with pytest.raises(DaemonUnreachable, match="no control socket"):
        await call(path, "status")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    with pytest.raises(DaemonUnreachable, match="nothing listens"):
        await call(path, "status")
