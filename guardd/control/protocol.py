"""The control protocol, version 1: one JSON request line in, one JSON response line out.

A request is ``{"v": 1, "cmd": "status", "args": {...}}`` followed by a newline; the
answer is ``{"v": 1, "ok": true, "result": {...}}`` or
``{"v": 1, "ok": false, "error": {"code": ..., "message": ...}}``, then the server closes.
Only the standard library is used: the server and guardctl share this module.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from guardd.core.types import COLORS
from guardd.exceptions import ControlError, GuarddError, NotPermitted, OperationRefused

# Re-exported: the protocol's error lives in the one tree of guardd.exceptions.
from guardd.exceptions import ProtocolError as ProtocolError  # noqa: PLC0414

VERSION: Final = 1
MAX_REQUEST_BYTES: Final = 64 * 1024
MAX_REASON_CHARS: Final = 500
# A lock longer than a year is a mistake; the bound also keeps date arithmetic finite.
MAX_LOCK_S: Final = 366 * 24 * 3600.0
MAX_HISTORY_LIMIT: Final = 1_000_000


class ErrorCode(StrEnum):
    """Why a request failed, as sent on the wire."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNKNOWN_COMMAND = "unknown_command"
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_PERMITTED = "not_permitted"
    REFUSED = "refused"
    BUSY = "busy"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


#: The errors a command's handler raises on purpose, and the code each is answered with
#: (the first that matches); anything else is a bug, answered as `internal`. guardctl
#: raises the matching error again (`client.call`): `Refused`, `NotPermitted`.
ANSWERED: Final[tuple[tuple[type[GuarddError], ErrorCode], ...]] = (
    (OperationRefused, ErrorCode.REFUSED),
    (NotPermitted, ErrorCode.NOT_PERMITTED),
)


def code_of(error: BaseException) -> ErrorCode | None:
    """The code a handler's `error` is answered with; None when it is a bug (logged)."""
    return next((code for kind, code in ANSWERED if isinstance(error, kind)), None)


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request: a known command and its arguments, defaults filled in."""

    cmd: str
    args: dict[str, Any]

    @property
    def mutating(self) -> bool:
        """Whether the command changes guardd's state and so needs an admin caller."""
        return self.cmd in MUTATING


def _shown(name: str) -> str:
    # Names come from the peer: quote, escape and cut them before they reach a message.
    return repr(name[:40].encode("ascii", "backslashreplace").decode("ascii"))


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _color(name: str, value: object) -> str:
    if value not in COLORS:
        raise _bad(f'args.{name} must be "blue" or "green"')
    return str(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"args.{name} must be true or false")
    return value


def _reason(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"args.{name} must be a string or null")
    if len(value) > MAX_REASON_CHARS:
        raise _bad(f"args.{name} must be at most {MAX_REASON_CHARS} characters")
    # A reason lands in the one-line-per-event journal and in chat messages.
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        raise _bad(f"args.{name} must not contain control characters")
    return value.strip() or None


def _limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"args.{name} must be an integer or null")
    if not 1 <= value <= MAX_HISTORY_LIMIT:
        raise _bad(f"args.{name} must be between 1 and {MAX_HISTORY_LIMIT}")
    return value


def _seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"args.{name} must be a number of seconds or null")
    if not (math.isfinite(value) and 0 < value <= MAX_LOCK_S):
        raise _bad(f"args.{name} must be > 0 and at most {MAX_LOCK_S:.0f} seconds")
    return float(value)


@dataclass(frozen=True, slots=True)
class _Arg:
    check: Callable[[str, object], object]
    required: bool = False
    default: object = None


_REASON: Final = _Arg(_reason)

COMMANDS: Final[Mapping[str, Mapping[str, _Arg]]] = {
    "status": {},
    "history": {"limit": _Arg(_limit)},
    "switch": {
        "color": _Arg(_color, required=True),
        "force": _Arg(_flag, default=False),
        "reason": _REASON,
    },
    "rollback": {"reason": _REASON},
    "promote": {"reason": _REASON},
    "pause": {"reason": _REASON},
    "resume": {"reason": _REASON},
    "qos_status": {},
    "fleet_status": {},
    "qos_lock": {"for_s": _Arg(_seconds), "reason": _REASON},
    "qos_unlock": {"reason": _REASON},
}
MUTATING: Final = frozenset(
    {"switch", "rollback", "promote", "pause", "resume", "qos_lock", "qos_unlock"}
)


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON, whatever Python's json module tolerates by default.
    raise _bad(f"{name} is not valid JSON")


def _loads(text: str) -> object:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise _bad(f"not valid JSON: {e.msg} at character {e.pos}") from None
    except RecursionError:
        raise _bad("not valid JSON: nested too deeply") from None
    except ValueError as e:
        # Integers longer than Python's digit limit land here.
        raise _bad(f"not valid JSON: {e}") from None


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line (without its newline)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("request is not valid UTF-8") from None
    doc = _loads(text)
    if not isinstance(doc, dict):
        raise _bad("request must be a JSON object")
    version = doc.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad("request.v must be an integer")
    if version != VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this guardd speaks version {VERSION}",
        )
    unexpected = sorted(set(doc) - {"v", "cmd", "args"})
    if unexpected:
        raise _bad(f"unexpected request field {_shown(unexpected[0])}")
    cmd = doc.get("cmd")
    if not isinstance(cmd, str):
        raise _bad("request.cmd must be a string")
    spec = COMMANDS.get(cmd)
    if spec is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {_shown(cmd)}; known: {', '.join(COMMANDS)}",
        )
    raw_args = doc.get("args")
    if raw_args is None:
        raw_args = {}
    if not isinstance(raw_args, dict):
        raise _bad("request.args must be an object")
    return Request(cmd, _check_args(spec, raw_args))


def _check_args(spec: Mapping[str, _Arg], raw: dict[str, Any]) -> dict[str, Any]:
    unexpected = sorted(set(raw) - set(spec))
    if unexpected:
        raise _bad(f"unexpected argument {_shown(unexpected[0])} in args")
    args: dict[str, Any] = {}
    for name, arg in spec.items():
        if name in raw:
            args[name] = arg.check(name, raw[name])
        elif arg.required:
            raise _bad(f"missing argument args.{name}")
        else:
            args[name] = arg.default
    return args


def _dumps(doc: Mapping[str, Any]) -> bytes:
    # ASCII-only output cannot contain a raw newline, so one object is always one line.
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def encode_request(cmd: str, args: Mapping[str, Any] | None = None) -> bytes:
    """The request line for `cmd`, newline included."""
    return _dumps({"v": VERSION, "cmd": cmd, "args": dict(args or {})})


def encode_result(result: Mapping[str, Any]) -> bytes:
    """A success response line; raises `TypeError`/`ValueError` if `result` is not JSON."""
    return _dumps({"v": VERSION, "ok": True, "result": result})


def encode_error(code: str, message: str) -> bytes:
    """An error response line."""
    return _dumps({"v": VERSION, "ok": False, "error": {"code": str(code), "message": message}})


def parse_response(line: bytes) -> dict[str, Any]:
    """The `result` of a response line; raises `ProtocolError` for an error response."""
    try:
        doc = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError("guardd sent a reply that is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ControlError("guardd sent a reply this guardctl does not understand")
    if doc.get("ok") is True and isinstance(result := doc.get("result"), dict):
        return result
    error = doc.get("error")
    if doc.get("ok") is False and isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        if isinstance(code, str) and isinstance(message, str):
            raise ProtocolError(code, message)
    raise ControlError("guardd sent a malformed reply")
