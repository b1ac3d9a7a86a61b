"""One mapping from the errors guardd raises on purpose to the control protocol's codes.

The guard and the operator commands raise `OperationRefused`; the control server answers
it (and guardctl's own `Refused`) as `refused`, `NotPermitted` as `not_permitted`, and
anything else as `internal`, whose details stay in the log. guardctl raises `Refused`,
which is itself an `OperationRefused`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd.control import client, protocol
from guardd.control.protocol import ErrorCode
from guardd.control.server import Caller, ControlServer
from guardd.exceptions import (
    ControlError,
    GuarddError,
    NotPermitted,
    OperationRefused,
    ProtocolError,
    Refused,
    StorageError,
    VerifyFailed,
)

pytestmark = pytest.mark.anyio
WAIT_S = 30.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Socket paths are limited to 107 bytes: a short directory under /tmp.
    path = Path(tempfile.mkdtemp(prefix="gderr-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@asynccontextmanager
async def raising(path: Path, error: BaseException) -> AsyncIterator[None]:
    async def handler(cmd: str, args: dict[str, Any], caller: Caller) -> dict[str, Any]:
        raise error

    async with anyio.create_task_group() as tg:
        await tg.start(ControlServer(path, handler).serve)
        yield
        tg.cancel_scope.cancel()


async def call(path: Path, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(partial(client.call, path, cmd, args, timeout=WAIT_S))


def test_the_tree() -> None:
    assert issubclass(ProtocolError, ControlError) and issubclass(ControlError, GuarddError)
    assert issubclass(OperationRefused, GuarddError)
    assert issubclass(Refused, OperationRefused) and issubclass(Refused, ControlError)
    assert not issubclass(OperationRefused, ControlError)  # the guard's, not the socket's


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OperationRefused("green is unhealthy"), ErrorCode.REFUSED),
        (Refused("green is unhealthy"), ErrorCode.REFUSED),
        (NotPermitted("only the on-call"), ErrorCode.NOT_PERMITTED),
        (StorageError("disk full"), None),
        (VerifyFailed("verify failed"), None),
        (ProtocolError(ErrorCode.BAD_REQUEST, "no"), None),
        (RuntimeError("a bug"), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_code_of(error: BaseException, code: ErrorCode | None) -> None:
    assert protocol.code_of(error) == code


async def test_the_guards_refusal_reaches_guardctl_as_refused(sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    async with raising(path, OperationRefused("switch to blue failed at verify: HTTP 503")):
        with pytest.raises(Refused, match="failed at verify: HTTP 503"):
            await call(path, "switch", {"color": "blue"})


async def test_any_other_guardd_error_is_internal(sock_dir: Path) -> None:
    path = sock_dir / "ctl.sock"
    async with raising(path, StorageError("/var/lib/guardd/private: disk full")):
        with pytest.raises(ProtocolError) as caught:
            await call(path, "pause")
    assert caught.value.code == ErrorCode.INTERNAL
    assert "private" not in str(caught.value)
