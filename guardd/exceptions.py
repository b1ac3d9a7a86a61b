"""Every error guardd raises on purpose, in one tree.

GuarddError
├── ConfigError            the configuration is invalid; carries one problem per key
├── SwitchError            moving traffic failed; the old target is back in place
│   ├── SwitchRejected     the test command refused the new target
│   ├── CommandFailed      a switch, reload or test command failed or timed out
│   └── VerifyFailed       the new target did not answer through the front door;
│                          carries the answers counted and the last one's status/error
├── StorageError           the journal, state or outbox could not be written
├── UnsafePath             a path is a symlink or otherwise not what guardd may write
├── OperationRefused       the guard declined an operation (a gate, a switch that
│   │                      failed); the control socket answers it as `refused`
│   └── Refused            (guardctl's side) the daemon answered `refused`; also a ControlError
└── ControlError           a control-socket request failed
    ├── ProtocolError      a request or answer broke the control protocol; carries its code
    ├── DaemonUnreachable  nothing answers on the socket
    ├── NotPermitted       the caller may not run a mutating command
    └── Refused            (see above)
"""

from __future__ import annotations

from dataclasses import dataclass


class GuarddError(Exception):
    """Base of every error guardd raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One invalid key: the file, the dotted key and the reason."""

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


class ConfigError(GuarddError):
    """The configuration is invalid; `problems` lists each key at fault."""

    def __init__(
        self, problems: list[ConfigProblem], warnings: list[ConfigProblem] | None = None
    ) -> None:
        self.problems = problems
        # Warnings found beside the errors, so that a person fixing the file sees them all
        # at once rather than one run later.
        self.warnings = warnings or []
        super().__init__("\n".join(str(p) for p in problems))


class SwitchError(GuarddError):
    """Moving traffic failed; the previous target has been put back.

    `step` names the step that failed, as the journal reports it: ``switch`` (changing
    the target itself), ``test``, ``reload`` or ``verify``.
    """

    step: str = "switch"


class SwitchRefused(SwitchError):
    """guardd may not change the switch target now (`Guard.may_switch`: it does not hold
    the target's lock, or the target became one it never switches); nothing was changed."""


class SwitchRejected(SwitchError):
    """The test command rejected the new target."""

    step = "test"


class CommandFailed(SwitchError):
    """An external command failed or ran past its timeout."""


class VerifyFailed(SwitchError):
    """After the switch, the front door did not serve the new target.

    The message counts the answers, e.g. ``verify failed: 0/31 answers passed (3 in a
    row needed) within 5s, last: HTTP 503``. `answers` and `passed` count them; `status`
    is the HTTP status of the last answer (None when there was none, or no HTTP answer
    such as a refused connection) and `error` what was wrong with it (None if it passed,
    or if there was no answer at all).
    """

    step = "verify"

    def __init__(
        self,
        message: str,
        *,
        answers: int = 0,
        passed: int = 0,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.answers = answers
        self.passed = passed
        self.status = status
        self.error = error


class StorageError(GuarddError):
    """A journal, state or outbox write failed (disk full, permissions)."""


class AlreadyRunning(GuarddError):
    """Another guardd holds a lock this one needs: its instance's state directory, or its
    switch target's (`fsutil.hold_instance_lock`, `fsutil.hold_switch_lock`)."""


class SwitchLockError(GuarddError):
    """The switch target's lock cannot be held: another process holds it, or its file
    cannot be made (`Supervisor.build_runtime`). The message is `<file>: <key>: <why>`."""


class UnsafePath(GuarddError):
    """A path guardd must write is a symlink or not a regular file."""


class OperationRefused(GuarddError):
    """The guard declined an operation; the message says why, for the operator.

    Raised by the guard and the operator commands (a gate that does not open, a switch
    that failed and was undone); the control socket answers it with the `refused` code.
    """


class ControlError(GuarddError):
    """A control-socket request failed."""


class ProtocolError(ControlError):
    """A control request or answer was rejected with an error code; `message` says why.

    `code` is the wire code (`guardd.control.protocol.ErrorCode`), e.g. ``bad_request``.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class DaemonUnreachable(ControlError):
    """Nothing answers on the control socket."""


class DaemonUnresponsive(DaemonUnreachable):
    """A guardd took the connection but gave no answer in time (frozen, or wedged): unlike
    a guardd that is down, it may be in the middle of something."""


class NotPermitted(ControlError):
    """The caller may not run a mutating command."""


class Refused(ControlError, OperationRefused):
    """The daemon declined the request (it answered `refused`); the message says why."""


_TELLING = ("[emerg]", "[alert]", "[crit]", "[error]", "failed", "error", "rejected")


def why(e: BaseException) -> str:
    """The lines of an error an operator needs: nginx's [emerg] line, not its banner.

    One line of at most 400 characters; "timed out" for a `TimeoutError`.
    """
    if isinstance(e, TimeoutError):
        return "timed out"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    telling = [line for line in lines[1:] if any(word in line.lower() for word in _TELLING)]
    return "; ".join([lines[0], *telling])[:400]
