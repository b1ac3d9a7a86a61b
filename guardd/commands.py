"""Run external commands: an argv list, a timeout, retries with backoff.

Every command guardd runs (`nginx -t`, `nginx -s reload`, a deploy tool) goes through
`run_command`. It never uses a shell, runs the command in its own session so a
timeout kills the whole process group (a `sh` wrapper's children included), and
retries transient failures under a `RetryPolicy` with stamina's exponential backoff
and jitter. stamina is imported at the first retry (`retrying`): a guard whose commands
pass at once, and an idle one, never load it (nor tenacity under it).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType

import anyio
from anyio.abc import ByteReceiveStream

from guardd.exceptions import CommandFailed

__all__ = [
    "CommandResult",
    "RetryPolicy",
    "log_retries_through_structlog",
    "retrying",
    "run_command",
]

# Enough for any error message; a chatty command cannot balloon guardd's memory.
_MAX_OUTPUT = 64 * 1024
#: How the last attempt of a command run in this context failed (`<what>: <why>`), or None
#: when it succeeded: a caller's deadline that cuts the retries short says only "timed
#: out", and this is what the operator needs beside it (`switchers.switch_error_for`).
LAST_FAILURE: ContextVar[str | None] = ContextVar("guardd_last_command_failure", default=None)
# A line of a command's stderr that says what failed (`CommandResult.stderr_gist`).
_ERROR_LINE = re.compile(
    r"\[(?:emerg|alert|crit|error)\]|\b(?:error|fatal|failed)\b", re.IGNORECASE
)
# How long output may keep arriving after the command itself has exited.
_DRAIN_GRACE = 1.0


_retry_hooks = {"structlog_only": False, "applied": False}


def log_retries_through_structlog() -> None:
    """Have stamina report retries through structlog only, from its first import on.

    stamina's default Prometheus hook would register in prometheus_client's global
    registry, which guardd never serves. The daemon calls this at start; stamina itself
    is imported only when something is first retried (`retrying`).
    """
    _retry_hooks["structlog_only"] = True
    if "stamina" in sys.modules:
        retrying()


def retrying() -> ModuleType:
    """stamina, imported now if it was not yet, with the hooks the daemon asked for."""
    import stamina  # noqa: PLC0415 - a retry is rare: most processes never pay for it

    if _retry_hooks["structlog_only"] and not _retry_hooks["applied"]:
        stamina.instrumentation.set_on_retry_hooks([stamina.instrumentation.StructlogOnRetryHook])
        _retry_hooks["applied"] = True
    return stamina


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry: the `[retry]` section of the config."""

    attempts: int
    base_delay: float
    max_delay: float


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    attempts: int

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.returncode == 0

    def stderr_head(self, lines: int = 5) -> str:
        """Return the first *lines* non-empty lines of stderr, for messages and logs."""
        return "\n".join([line for line in self.stderr.splitlines() if line.strip()][:lines])

    def stderr_gist(self, lines: int = 2) -> str:
        """What stderr says went wrong, for a one-line message: its lines marked as errors
        (nginx's `[emerg]`, `[alert]`, `[crit]`, `[error]`; "error", "fatal", "failed"),
        else its last line (a program says why it stops last); at most *lines*, joined by
        " / ". nginx starts a failed `-s reload` with `[notice] signal process started`."""
        said = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        marked = [line for line in said if _ERROR_LINE.search(line)]
        return " / ".join((marked or said[-1:])[:lines])


class _TransientError(Exception):
    """One attempt failed in a way another attempt may not: non-zero exit or timeout."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def run_command(
    argv: Sequence[str],
    *,
    # A plain per-attempt limit rather than a cancel scope: the scope cannot tell a
    # timeout (retried) from the caller giving up (not retried).
    timeout: float,  # noqa: ASYNC109
    retry: RetryPolicy | None,
    what: str,
    check: bool = True,
) -> CommandResult:
    """Run *argv* (no shell), each attempt bounded by *timeout* seconds.

    A timeout, and with *check* a non-zero exit, is retried under *retry* (`None`: one
    attempt); when the attempts are spent `CommandFailed` is raised, its message naming
    *what*. With `check=False` a non-zero exit is returned, not retried: for commands
    whose "no" is deterministic, like `nginx -t`. A command that cannot be started
    raises `CommandFailed` at once. Cancelling the caller kills the process group too.
    """
    args = tuple(argv)
    if not args:
        raise CommandFailed(f"{what}: empty command")
    attempts = 0
    LAST_FAILURE.set(None)  # (a failure of an earlier command is no news of this one)

    async def attempt_once() -> CommandResult:
        nonlocal attempts
        attempts += 1
        returncode, stdout, stderr = await _run_once(args, timeout, what)
        result = CommandResult(args, returncode, stdout, stderr, attempts)
        failure = None
        if returncode < 0:
            # A signal from outside (the OOM killer, an operator) says nothing about
            # the command's verdict, even where a non-zero exit would.
            failure = f"killed by signal {_signal_name(-returncode)}"
        elif check and not result.ok:
            gist = result.stderr_gist()
            failure = f"exited with status {returncode}" + (f": {gist}" if gist else "")
        LAST_FAILURE.set(None if failure is None else f"{what}: {failure}")
        if failure is not None:
            raise _TransientError(failure)
        return result

    try:
        if retry is None or retry.attempts <= 1:
            return await attempt_once()
        # The first attempt runs before stamina is loaded; its failure is replayed as
        # stamina's first attempt, so the backoff and the attempt count are stamina's own.
        replay: list[_TransientError] = []
        try:
            return await attempt_once()
        except _TransientError as exc:
            replay.append(exc)
        async for attempt in retrying().retry_context(
            on=_TransientError,
            attempts=retry.attempts,
            # The caller bounds the whole run with a cancel scope; stamina need not.
            timeout=None,
            wait_initial=retry.base_delay,
            wait_max=retry.max_delay,
            wait_jitter=retry.base_delay,
        ):
            with attempt:
                if replay:
                    raise replay.pop()
                return await attempt_once()
    except _TransientError as exc:
        raise CommandFailed(
            f"{what} ({args[0]}) failed after {attempts} attempt(s): {exc.reason}"
        ) from None
    raise AssertionError("unreachable: stamina either returns a result or re-raises")


async def _run_once(argv: tuple[str, ...], time_limit: float, what: str) -> tuple[int, str, str]:
    """Run *argv* once; return (returncode, stdout, stderr) or raise on timeout."""
    try:
        # Shielded: a cancel landing while asyncio connects the pipes makes it kill the
        # child alone (its process group lives on: `sh -c 'x & y'`) and leave the pipes'
        # transports open. The spawn is a fork, an exec and a few loop turns; the cancel
        # is taken right after it, by the `finally` below, which kills the whole group.
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Its own session and process group, so a timeout can kill all of it.
                start_new_session=True,
            )
    except OSError as exc:
        raise CommandFailed(f"{what} ({argv[0]}) cannot start: {exc.strerror or exc}") from exc
    out, err = bytearray(), bytearray()
    returncode: int | None = None
    try:
        with anyio.move_on_after(time_limit):
            async with anyio.create_task_group() as tg:
                for stream, into in ((process.stdout, out), (process.stderr, err)):
                    if stream is not None:
                        tg.start_soon(_drain, stream, into)
                returncode = await process.wait()
                # A detached grandchild may hold the pipes open for ever; what the
                # command said is in by now or never.
                tg.cancel_scope.deadline = min(
                    tg.cancel_scope.deadline, anyio.current_time() + _DRAIN_GRACE
                )
    finally:
        if returncode is None:
            # Timed out or cancelled: nothing of the command may outlive the attempt.
            _kill_group(process.pid)
        with anyio.CancelScope(shield=True):
            await process.aclose()
    if returncode is None:
        raise _TransientError(f"timed out after {time_limit:g}s")
    return returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _drain(stream: ByteReceiveStream, into: bytearray) -> None:
    """Read *stream* to its end, keeping at most `_MAX_OUTPUT` bytes of it."""
    async for chunk in stream:
        if len(into) < _MAX_OUTPUT:
            into.extend(chunk[: _MAX_OUTPUT - len(into)])


def _signal_name(number: int) -> str:
    """Return `SIGTERM` for 15, or the bare number for a signal without a name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group *pgid*; it may be gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
