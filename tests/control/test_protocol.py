"""The control protocol: what a request may say, and what each mistake is called."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.control import protocol
from guardd.control.protocol import ErrorCode, ProtocolError, Request
from guardd.exceptions import ControlError


def _line(doc: object) -> bytes:
    return json.dumps(doc).encode()


GOOD = [
    ({"v": 1, "cmd": "status", "args": {}}, Request("status", {})),
    ({"v": 1, "cmd": "status"}, Request("status", {})),
    ({"v": 1, "cmd": "status", "args": None}, Request("status", {})),
    ({"v": 1, "cmd": "history", "args": {}}, Request("history", {"limit": None})),
    ({"v": 1, "cmd": "history", "args": {"limit": 20}}, Request("history", {"limit": 20})),
    ({"v": 1, "cmd": "history", "args": {"limit": None}}, Request("history", {"limit": None})),
    (
        {"v": 1, "cmd": "switch", "args": {"color": "blue"}},
        Request("switch", {"color": "blue", "force": False, "reason": None}),
    ),
    (
        {
            "v": 1,
            "cmd": "switch",
            "args": {"color": "green", "force": True, "reason": "drain blue"},
        },
        Request("switch", {"color": "green", "force": True, "reason": "drain blue"}),
    ),
    (
        {"v": 1, "cmd": "rollback", "args": {"reason": "  checkout 500s  "}},
        Request("rollback", {"reason": "checkout 500s"}),
    ),
    ({"v": 1, "cmd": "rollback", "args": {"reason": ""}}, Request("rollback", {"reason": None})),
    ({"v": 1, "cmd": "rollback", "args": {}}, Request("rollback", {"reason": None})),
    (
        {"v": 1, "cmd": "promote", "args": {"reason": "Grüße, release 🚀"}},
        Request("promote", {"reason": "Grüße, release 🚀"}),
    ),
    (
        {"v": 1, "cmd": "pause", "args": {"reason": "CHG-4711"}},
        Request("pause", {"reason": "CHG-4711"}),
    ),
    ({"v": 1, "cmd": "resume", "args": {}}, Request("resume", {"reason": None})),
    (
        {"v": 1, "cmd": "resume", "args": {"reason": "failover done"}},
        Request("resume", {"reason": "failover done"}),
    ),
    ({"v": 1, "cmd": "qos_status", "args": {}}, Request("qos_status", {})),
    (
        {"v": 1, "cmd": "qos_lock", "args": {"for_s": 300}},
        Request("qos_lock", {"for_s": 300.0, "reason": None}),
    ),
    (
        {"v": 1, "cmd": "qos_lock", "args": {"for_s": 0.25, "reason": "freeze"}},
        Request("qos_lock", {"for_s": 0.25, "reason": "freeze"}),
    ),
    (
        {"v": 1, "cmd": "qos_lock", "args": {"for_s": None}},
        Request("qos_lock", {"for_s": None, "reason": None}),
    ),
    ({"v": 1, "cmd": "qos_unlock", "args": {}}, Request("qos_unlock", {"reason": None})),
    (
        {"v": 1, "cmd": "qos_unlock", "args": {"reason": "incident 812 closed"}},
        Request("qos_unlock", {"reason": "incident 812 closed"}),
    ),
]


@pytest.mark.parametrize(("doc", "expected"), GOOD)
def test_good_requests(doc: dict[str, Any], expected: Request) -> None:
    """Valid requests parse, with the defaults of omitted arguments filled in."""
    request = protocol.parse_request(_line(doc))

    assert request == expected
    assert request.mutating == (expected.cmd in protocol.MUTATING)


def test_for_s_is_always_a_float() -> None:
    """An integer number of seconds arrives as a float, so the daemon sees one type."""
    request = protocol.parse_request(_line({"v": 1, "cmd": "qos_lock", "args": {"for_s": 5}}))

    assert type(request.args["for_s"]) is float


def test_mutating_commands() -> None:
    """Exactly the commands that change state need an admin caller."""
    changes = {"switch", "rollback", "promote", "pause", "resume", "qos_lock", "qos_unlock"}
    assert changes == protocol.MUTATING
    assert set(protocol.COMMANDS) - changes == {"status", "history", "qos_status", "fleet_status"}


def _cmd(cmd: str, **args: Any) -> bytes:
    return _line({"v": 1, "cmd": cmd, "args": args})


BAD = [
    pytest.param(b"\xff\xfe{}", ErrorCode.BAD_REQUEST, "UTF-8", id="not-utf8"),
    pytest.param(b'{"v": 1, "cmd": "st\xc3"}', ErrorCode.BAD_REQUEST, "UTF-8", id="cut-utf8"),
    pytest.param(b"\xef\xbb\xbf" + _cmd("status"), ErrorCode.BAD_REQUEST, "JSON", id="bom"),
    pytest.param(b"", ErrorCode.BAD_REQUEST, "JSON", id="empty"),
    pytest.param(b"status", ErrorCode.BAD_REQUEST, "JSON", id="not-json"),
    pytest.param(b'{"v": 1, "cmd": "status"', ErrorCode.BAD_REQUEST, "JSON", id="cut-json"),
    pytest.param(b"[" * 50_000 + b"]" * 50_000, ErrorCode.BAD_REQUEST, "JSON", id="deep"),
    pytest.param(
        b'{"v": 1, "cmd": "history", "args": {"limit": ' + b"9" * 5000 + b"}}",
        ErrorCode.BAD_REQUEST,
        "JSON",
        id="huge-int",
    ),
    pytest.param(
        b'{"v": 1, "cmd": "qos_lock", "args": {"for_s": NaN}}',
        ErrorCode.BAD_REQUEST,
        "NaN",
        id="nan",
    ),
    pytest.param(
        b'{"v": 1, "cmd": "qos_lock", "args": {"for_s": Infinity}}',
        ErrorCode.BAD_REQUEST,
        "Infinity",
        id="infinity",
    ),
    pytest.param(
        b'{"v": 1, "cmd": "qos_lock", "args": {"for_s": 1e999}}',
        ErrorCode.BAD_REQUEST,
        "for_s",
        id="overflowing-float",
    ),
    pytest.param(b"[1, 2]", ErrorCode.BAD_REQUEST, "object", id="array"),
    pytest.param(b'"status"', ErrorCode.BAD_REQUEST, "object", id="string"),
    pytest.param(b"null", ErrorCode.BAD_REQUEST, "object", id="null"),
    pytest.param(_line({"cmd": "status"}), ErrorCode.BAD_REQUEST, "request.v", id="no-version"),
    pytest.param(
        _line({"v": "1", "cmd": "status"}), ErrorCode.BAD_REQUEST, "request.v", id="version-string"
    ),
    pytest.param(
        _line({"v": True, "cmd": "status"}), ErrorCode.BAD_REQUEST, "request.v", id="version-bool"
    ),
    pytest.param(
        _line({"v": 2, "cmd": "status"}), ErrorCode.UNSUPPORTED_VERSION, "version 2", id="version-2"
    ),
    pytest.param(
        _line({"v": 0, "cmd": "status"}), ErrorCode.UNSUPPORTED_VERSION, "version 0", id="version-0"
    ),
    pytest.param(_line({"v": 1}), ErrorCode.BAD_REQUEST, "request.cmd", id="no-cmd"),
    pytest.param(_line({"v": 1, "cmd": 7}), ErrorCode.BAD_REQUEST, "request.cmd", id="cmd-int"),
    pytest.param(
        _line({"v": 1, "cmd": "status", "id": 1}), ErrorCode.BAD_REQUEST, "'id'", id="extra-field"
    ),
    pytest.param(_cmd("frobnicate"), ErrorCode.UNKNOWN_COMMAND, "'frobnicate'", id="unknown"),
    pytest.param(_cmd("STATUS"), ErrorCode.UNKNOWN_COMMAND, "'STATUS'", id="unknown-case"),
    pytest.param(_cmd("qos status"), ErrorCode.UNKNOWN_COMMAND, "'qos status'", id="cli-spelling"),
    pytest.param(
        _line({"v": 1, "cmd": "status", "args": []}),
        ErrorCode.BAD_REQUEST,
        "request.args",
        id="args-array",
    ),
    pytest.param(
        _cmd("status", verbose=True), ErrorCode.BAD_REQUEST, "'verbose'", id="status-extra-arg"
    ),
    pytest.param(
        _cmd("history", limit="20"), ErrorCode.BAD_REQUEST, "args.limit", id="limit-string"
    ),
    pytest.param(
        _cmd("history", limit=20.0), ErrorCode.BAD_REQUEST, "args.limit", id="limit-float"
    ),
    pytest.param(_cmd("history", limit=True), ErrorCode.BAD_REQUEST, "args.limit", id="limit-bool"),
    pytest.param(_cmd("history", limit=0), ErrorCode.BAD_REQUEST, "args.limit", id="limit-0"),
    pytest.param(
        _cmd("history", limit=-5), ErrorCode.BAD_REQUEST, "args.limit", id="limit-negative"
    ),
    pytest.param(_cmd("switch"), ErrorCode.BAD_REQUEST, "args.color", id="switch-no-color"),
    pytest.param(_cmd("switch", color="red"), ErrorCode.BAD_REQUEST, "args.color", id="switch-red"),
    pytest.param(
        _cmd("switch", color=None), ErrorCode.BAD_REQUEST, "args.color", id="switch-color-null"
    ),
    pytest.param(
        _cmd("switch", color="blue", force="yes"),
        ErrorCode.BAD_REQUEST,
        "args.force",
        id="force-string",
    ),
    pytest.param(
        _cmd("switch", color="blue", force=1), ErrorCode.BAD_REQUEST, "args.force", id="force-int"
    ),
    pytest.param(_cmd("rollback", reason=5), ErrorCode.BAD_REQUEST, "args.reason", id="reason-int"),
    pytest.param(
        _cmd("rollback", reason=["a"]), ErrorCode.BAD_REQUEST, "args.reason", id="reason-list"
    ),
    pytest.param(
        _cmd("pause", reason="line one\nline two"),
        ErrorCode.BAD_REQUEST,
        "control characters",
        id="reason-newline",
    ),
    pytest.param(
        _cmd("pause", reason="red \x1b[31m"),
        ErrorCode.BAD_REQUEST,
        "control characters",
        id="reason-escape",
    ),
    pytest.param(
        _cmd("pause", reason="evil\u202eexe.txt"),
        ErrorCode.BAD_REQUEST,
        "control characters",
        id="reason-bidi",
    ),
    pytest.param(_cmd("pause", reason="x" * 501), ErrorCode.BAD_REQUEST, "500", id="reason-long"),
    pytest.param(
        _cmd("qos_unlock", reason="x" * 501), ErrorCode.BAD_REQUEST, "500", id="unlock-reason-long"
    ),
    pytest.param(
        _cmd("qos_unlock", reason="x", color="blue"),
        ErrorCode.BAD_REQUEST,
        "'color'",
        id="unlock-color",
    ),
    pytest.param(
        _cmd("resume", reason="x" * 501), ErrorCode.BAD_REQUEST, "500", id="resume-reason-long"
    ),
    pytest.param(
        _cmd("qos_lock", for_s="5m"), ErrorCode.BAD_REQUEST, "args.for_s", id="for-string"
    ),
    pytest.param(_cmd("qos_lock", for_s=True), ErrorCode.BAD_REQUEST, "args.for_s", id="for-bool"),
    pytest.param(_cmd("qos_lock", for_s=0), ErrorCode.BAD_REQUEST, "args.for_s", id="for-0"),
    pytest.param(
        _cmd("qos_lock", for_s=-60), ErrorCode.BAD_REQUEST, "args.for_s", id="for-negative"
    ),
    pytest.param(
        _cmd("qos_lock", for_s=10 * 366 * 86400),
        ErrorCode.BAD_REQUEST,
        "args.for_s",
        id="for-decade",
    ),
]


@pytest.mark.parametrize(("line", "code", "fragment"), BAD)
def test_bad_requests(line: bytes, code: ErrorCode, fragment: str) -> None:
    """Every malformed request is rejected with its error code and a message that says why."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(line)

    assert caught.value.code == code
    assert fragment in caught.value.message


def test_peer_text_in_messages_is_escaped_and_cut() -> None:
    """A hostile command name cannot put a newline or 10 KB into an error message."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(_cmd("x\n\x1b[2J" + "y" * 10_000))

    assert "\n" not in caught.value.message
    assert "\x1b" not in caught.value.message
    assert len(caught.value.message) < 300


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_with_a_protocol_error(line: bytes) -> None:
    """Arbitrary bytes never raise anything but `ProtocolError`."""
    try:
        request: Request | None = protocol.parse_request(line)
    except ProtocolError as e:
        request, code = None, e.code
    if request is None:
        assert code in set(ErrorCode)
    else:
        assert request.cmd in protocol.COMMANDS


_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.sampled_from(["blue", "green", "", " "])
    | st.text(max_size=12)
    | st.lists(st.integers(), max_size=2)
)


@given(
    st.sampled_from(sorted(protocol.COMMANDS)),
    st.dictionaries(
        st.sampled_from(["limit", "color", "force", "reason", "for_s", "x"]), _values, max_size=4
    ),
)
def test_any_args_are_validated_or_rejected(cmd: str, args: dict[str, Any]) -> None:
    """Whatever the arguments, a request either validates to the declared types or is refused."""
    try:
        request: Request | None = protocol.parse_request(_cmd(cmd, **args))
    except ProtocolError as e:
        request, code = None, e.code
    if request is None:
        assert code == ErrorCode.BAD_REQUEST
        return
    assert set(request.args) == set(protocol.COMMANDS[cmd])
    for name, value in request.args.items():
        expected = {
            "limit": (int, type(None)),
            "color": (str,),
            "force": (bool,),
            "reason": (str, type(None)),
            "for_s": (float, type(None)),
        }[name]
        assert isinstance(value, expected)


def test_request_round_trip() -> None:
    """What the client encodes is one line that the server parses back to the same request."""
    line = protocol.encode_request("switch", {"color": "blue", "force": True, "reason": "é\n"})

    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {
        "v": 1,
        "cmd": "switch",
        "args": {"color": "blue", "force": True, "reason": "é\n"},
    }


def test_result_round_trip() -> None:
    """A result comes back as it was sent."""
    result = {"state": "steady", "upstreams": {"blue": {"p95_ms": 7.9, "last_error": "a\nb"}}}
    line = protocol.encode_result(result)

    assert line.count(b"\n") == 1
    assert protocol.parse_response(line.rstrip(b"\n")) == result


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_round_trip(code: ErrorCode) -> None:
    """An error reply is raised on the client side as a `ProtocolError` with its code."""
    line = protocol.encode_error(code, "because")

    with pytest.raises(ProtocolError) as caught:
        protocol.parse_response(line.rstrip(b"\n"))

    assert (caught.value.code, caught.value.message) == (code.value, "because")
    assert isinstance(caught.value, ControlError)


def test_result_that_is_not_json_is_refused_by_the_encoder() -> None:
    """NaN and arbitrary objects never reach the wire."""
    with pytest.raises(ValueError, match="JSON compliant"):
        protocol.encode_result({"error_ratio": float("nan")})
    with pytest.raises(TypeError, match="not JSON serializable"):
        protocol.encode_result({"when": object()})


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\xff",
        b"not json",
        b"[]",
        b'{"v": 2, "ok": true, "result": {}}',
        b'{"v": 1, "ok": true, "result": []}',
        b'{"v": 1, "ok": false, "error": "nope"}',
        b'{"v": 1, "ok": false, "error": {"code": 1, "message": "x"}}',
        b'{"v": 1}',
    ],
)
def test_malformed_replies(line: bytes) -> None:
    """A reply the client cannot read is a `ControlError`, not a crash or a success."""
    with pytest.raises(ControlError) as caught:
        protocol.parse_response(line)

    assert not isinstance(caught.value, ProtocolError)
