"""guardctl's own read of the fleet's QoS lock (`guardd.fleet.lockread`): fail closed."""

from __future__ import annotations

import base64
import contextlib
import http.server
import re
import threading
from collections.abc import Iterator

import pytest

from guardd.fleet.lockread import (
    FleetLockUnknown,
    lock_problem,
    read_fleet_lock,
    unconverged,
    undersized,
)
from tests.harness.httpserver import QuietHTTPServer


@pytest.mark.parametrize(
    "etcd",
    [
        ["file:///etc/passwd"],
        ["ftp://127.0.0.1:2379"],
        ["127.0.0.1:2379"],
        ["http://127.0.0.1:9", "file:///etc/passwd"],
    ],
)
def test_an_etcd_address_that_is_not_http_is_unknown_before_any_request(etcd: list[str]) -> None:
    # The [fleet] table is read raw by guardctl: a scheme urllib would open as a file
    # (or anything but http/https) is never asked, and the lock is UNKNOWN, not unlocked.
    with pytest.raises(FleetLockUnknown, match="not an http"):
        read_fleet_lock({"etcd": etcd}, "lab", timeout=1.0)


@pytest.mark.parametrize("etcd", [None, [], "http://127.0.0.1:2379", [2379]])
def test_an_etcd_list_that_is_not_one_is_unknown(etcd: object) -> None:
    with pytest.raises(FleetLockUnknown, match="not a list of URLs"):
        read_fleet_lock({"etcd": etcd}, "lab", timeout=1.0)


_HEADER = b'"header": {"cluster_id": "7", "revision": "40"}'
_NODE = (
    b'{"key": "L2d1YXJkZC9sYWIvbm9kZXMvbjE=", "value": '  # /guardd/lab/nodes/n1
    b'"eyJzZXJ2aW5nIjogImJsdWUifQ=="}'  # {"serving": "blue"}
)


@contextlib.contextmanager
def answering(answer: bytes, status: int = 200) -> Iterator[str]:
    """An HTTP server on loopback that answers every POST with `answer` (HTTP `status`);
    yields its URL."""

    class Server(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: object) -> None:
            pass

    with QuietHTTPServer(("127.0.0.1", 0), Server) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"{}", "not an answer of etcd's"),
        (b'{"kvs": []}', "not an answer of etcd's"),
        (b'{"header": "x"}', "not an answer of etcd's"),
        # etcd's answer, but no `qos` key under the prefix: a mistyped prefix, a store
        # that lost it, or a fleet not started; nodes' records alone say nothing of it.
        (b"{" + _HEADER + b"}", "QoS lock is not in etcd"),
        (b"{" + _HEADER + b', "kvs": [], "count": "0"}', "QoS lock is not in etcd"),
        (b"{" + _HEADER + b', "kvs": [' + _NODE + b'], "count": "1"}', "not in etcd"),
    ],
)
def test_an_answer_that_is_not_etcds_is_unknown_never_unlocked(answer: bytes, why: str) -> None:
    # Something else on etcd's port (a proxy's error page, another service) answers 200:
    # without etcd's header it says nothing of the fleet's lock.
    with answering(answer) as url, pytest.raises(FleetLockUnknown, match=why):
        read_fleet_lock({"etcd": [url]}, "lab", timeout=2.0)


BLUE = {"color": "blue", "generation": 5}
_NOT_GUARDDS = (
    "the fleet's desired color in etcd is not a decision guardd wrote (no color blue or green "
    "with a generation): `guardctl rollback` (or `switch --force`) writes a new one"
)


@pytest.mark.parametrize(
    ("desired", "live", "lost", "said"),
    [
        (None, {"a": {"serving": "green"}}, {}, None),
        (BLUE, {"a": {"serving": "blue"}, "b": {"serving": "blue"}}, {}, None),
        (BLUE, {"a": {"serving": "blue"}}, {"c": {"serving": "blue"}}, None),
        (
            BLUE,
            {"a": {"serving": "blue"}, "b": {"serving": "green"}},
            {},
            "the fleet has not converged on blue: node b serves green",
        ),
        (
            BLUE,
            {"a": {"serving": "blue"}},
            {"c": {"serving": "green"}},
            "the fleet has not converged on blue: node c (lost) last served green",
        ),
        (
            BLUE,
            {"a": {"serving": None}},
            {},
            "the fleet has not converged on blue: node a serves None",
        ),
        # A decision guardd did not write: not known to have converged (never "None").
        ({}, {"a": {"serving": "blue"}}, {}, _NOT_GUARDDS),
        ({"color": "purple", "generation": 50}, {"a": {"serving": "blue"}}, {}, _NOT_GUARDDS),
        ({"color": "blue"}, {"a": {"serving": "blue"}}, {}, _NOT_GUARDDS),
        ({"color": "blue", "generation": True}, {"a": {"serving": "blue"}}, {}, _NOT_GUARDDS),
    ],
)
def test_a_fleet_has_converged_when_every_node_serves_the_desired_color(
    desired: dict[str, object] | None,
    live: dict[str, dict[str, object]],
    lost: dict[str, dict[str, object]],
    said: str | None,
) -> None:
    assert unconverged(desired, live, lost) == said


@pytest.mark.parametrize(
    ("doc", "ok"),
    [
        ({"locked": True, "reason": "x", "until": None, "by": "uid:0(root)"}, True),
        ({"locked": False, "by": "n1", "released_at": "2026-12-01T10:00:00.000Z"}, True),
        ({"locked": False}, False),  # by hand: it would end every node's lock
        ({"locked": False, "by": "n1"}, False),
        ({"locked": False, "released_at": "2026-12-01T10:00:00.000Z"}, False),
        ({"locked": True, "by": ""}, False),
        ({"locked": "no", "by": "n1"}, False),
        (["locked", False], False),
        (None, False),
    ],
)
def test_only_a_lock_or_release_guardd_wrote_is_read_as_one(doc: object, ok: bool) -> None:
    assert (lock_problem(doc) is None) is ok


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://user:S3CRETPW@127.0.0.1:9",
        "http://127.0.0.1:9/?token=S3CRETTOKEN",
        "http://127.0.0.1:9/#S3CRETFRAG",
        "ftp://user:S3CRETPW@127.0.0.1:9",
    ],
)
def test_credentials_in_an_etcd_url_never_reach_the_answer(endpoint: str) -> None:
    """guardctl reads `[fleet]` unvalidated: credentials in a URL (which `check-config`
    refuses) must not be printed with the reason it is UNKNOWN (a CI log keeps it)."""
    with pytest.raises(FleetLockUnknown) as raised:
        read_fleet_lock({"etcd": [endpoint]}, "lab", timeout=1.0)
    said = str(raised.value)
    assert "S3CRET" not in said and "127.0.0.1:9" in said, said


@pytest.mark.parametrize(
    ("members", "size", "fits"),
    [((), 2, False), (("lb-a",), 2, False), (("lb-a",), 1, True), (("lb-a", "lb-b"), 2, True),
     (("lb-a", "lb-b"), 3, False), (("lb-a", "lb-b", "lb-c", "lb-d"), 3, True)],
)  # fmt: skip
def test_a_fleet_smaller_than_its_size_is_not_known_to_be_the_configured_one(
    members: tuple[str, ...], size: int, fits: bool
) -> None:
    why = undersized(members, size, "/guardd/lab")
    assert (why is None) is fits
    if why is not None:
        assert f"only {len(members)} of the fleet's {size} nodes (fleet.size)" in why
        assert "mistyped fleet.prefix" in why


_RELEASE = (
    b'{"key": "L2d1YXJkZC9sYWIvcW9z", "value": "'  # /guardd/lab/qos
    + base64.b64encode(
        b'{"locked": false, "by": "fleet:n1", "released_at": "2026-12-02T00:00:00Z"}'
    )
    + b'"}'
)
_SEEN = (
    b'{"key": "L2d1YXJkZC9sYWIvc2Vlbi9uMg==", "value": '  # /guardd/lab/seen/n2
    b'"eyJzZXJ2aW5nIjogImJsdWUifQ=="}'  # {"serving": "blue"}
)


@pytest.mark.parametrize(
    ("kvs", "size", "unknown"),
    [
        # A release under a prefix one node ever wrote to: a fleet of its own.
        ([_RELEASE, _NODE], None, "only 1 of the fleet's 2 nodes"),
        ([_RELEASE, _NODE], 2, "only 1 of the fleet's 2 nodes"),
        ([_RELEASE, _NODE], 3, "only 1 of the fleet's 3 nodes"),
        ([_RELEASE], 1, "only 0 of the fleet's 1 nodes"),
        ([_RELEASE, _NODE], 1, None),
        # A lost node (its last record only) is still one of the fleet's.
        ([_RELEASE, _NODE, _SEEN], None, None),
        ([_RELEASE, _NODE, _SEEN], "2", "size is not a whole number"),
        ([_RELEASE, _NODE, _SEEN], 0, "size is not a whole number"),
        ([_RELEASE, _NODE, _SEEN], True, "size is not a whole number"),
    ],
)
def test_the_gate_reads_a_fleet_smaller_than_its_size_as_unknown(
    kvs: list[bytes], size: object, unknown: str | None
) -> None:
    answer = b"{" + _HEADER + b', "kvs": [' + b", ".join(kvs) + b"]}"
    with answering(answer) as url:
        table: dict[str, object] = {"etcd": [url]}
        if size is not None:
            table["size"] = size
        if unknown is None:
            assert read_fleet_lock(table, "lab", timeout=5.0)["locked"] is False
        else:
            with pytest.raises(FleetLockUnknown, match=re.escape(unknown)):
                read_fleet_lock(table, "lab", timeout=5.0)


def test_an_etcd_that_refuses_says_its_http_status_and_nothing_of_its_body() -> None:
    """An auth failure answers 401 (or 400 with etcd's error): the gate names the status, so
    an operator sees it is no network problem; the body is never repeated."""
    body = b'{"error": "etcdserver: user name is empty S3CRET", "code": 3}'
    with answering(body, status=401) as url, pytest.raises(FleetLockUnknown) as caught:
        read_fleet_lock({"etcd": [url]}, "lab", timeout=2.0)
    assert f"{url}: HTTPError: HTTP 401" in str(caught.value)
    assert "S3CRET" not in str(caught.value)


def _node(name: str, doc: bytes) -> bytes:
    key = base64.b64encode(f"/guardd/lab/nodes/{name}".encode())
    return b'{"key": "' + key + b'", "value": "' + base64.b64encode(doc) + b'"}'


@pytest.mark.parametrize(
    ("states", "locked", "said"),
    [
        ((b"steady", b"guard_window"), False, None),
        ((b"steady", b"hold"), True, "node n2 holds: no automatic switch there"),
        ((b"hold", b"hold"), True, "nodes n1, n2 hold: no automatic switch there"),
    ],
)
def test_guardctl_from_etcd_is_locked_while_any_node_holds(
    states: tuple[bytes, bytes], locked: bool, said: str | None
) -> None:
    """A node that holds keeps its hold's lock in its own lock file: a CI job on another
    host asks etcd, and must be locked out alike."""
    nodes = [
        _node(name, b'{"serving": "blue", "state": "' + state + b'"}')
        for name, state in zip(("n1", "n2"), states, strict=True)
    ]
    answer = b"{" + _HEADER + b', "kvs": [' + b", ".join([_RELEASE, *nodes]) + b"]}"
    with answering(answer) as url:
        got = read_fleet_lock({"etcd": [url], "size": 2}, "lab", timeout=5.0)
    assert got["locked"] is locked
    if said is not None:
        assert got["reason"].startswith(said), got
