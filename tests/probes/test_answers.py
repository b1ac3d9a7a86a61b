"""What a probe makes of real answers: encodings, bombs, JSON types, summaries, failures.

Every case is a real HTTP exchange with a misbehaving server on loopback; nothing an
upstream sends may raise out of a probe or hold more than a bounded amount of memory.
"""

from __future__ import annotations

import gzip
import importlib.machinery
import json
import socket
import sys
import tracemalloc
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from guardd.core.types import Outcome
from guardd.probes.http import HttpProber, ProbeResult, ProbeSpec
from guardd.secrets import Secret
from tests.harness.daemon import GUARDD
from tests.harness.hostile import Hostile, HostileMode, bomb
from tests.harness.nginx import free_port
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.anyio

UP = {"status": "UP"}
# A probe holds at most max_body_bytes of a body, however it is encoded.
MEMORY_BOUND = 4 * 1024 * 1024


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    """A hostile server, stopped after the test."""
    with Hostile("ok") as server:
        yield server


async def probe(url: str, **spec: Any) -> ProbeResult:
    """One probe of `url` with a 2s deadline."""
    prober = HttpProber([url], ProbeSpec(timeout=2.0, **spec))
    try:
        return await prober.probe()
    finally:
        await prober.aclose()


async def probe_peak(url: str, **spec: object) -> tuple[ProbeResult, int]:
    """One probe of `url`, and the most memory (bytes) Python held while it ran."""
    tracemalloc.start()
    try:
        result = await probe(url, **spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


# ---- encodings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "outcome", "error"),
    [
        ("gzip_ok", Outcome.OK, None),
        ("deflate_ok", Outcome.OK, None),
        (
            "bad_gzip",
            Outcome.BODY_MISMATCH,
            "body is labelled Content-Encoding: gzip but does not decode",
        ),
        (
            "bad_deflate",
            Outcome.BODY_MISMATCH,
            "body is labelled Content-Encoding: deflate but does not decode",
        ),
        (
            "br",
            Outcome.BODY_MISMATCH,
            "body is Content-Encoding: br, which guardd does not decode (it asks for identity)",
        ),
        (
            "unknown_coding",
            Outcome.BODY_MISMATCH,
            "body is Content-Encoding: x-snappy-framed, which guardd does not decode",
        ),
        ("truncated_gzip", Outcome.BODY_MISMATCH, "gzip body ends early (truncated)"),
        ("deep_json", Outcome.BODY_MISMATCH, "body is not JSON (nested too deeply)"),
    ],
)
async def test_any_encoding_becomes_an_outcome(
    hostile: Hostile, mode: HostileMode, outcome: Outcome, error: str | None
) -> None:
    hostile.set_mode(mode)
    result = await probe(hostile.url, expect_json=UP)
    assert result.outcome is outcome, result.error
    if error is None:
        assert result.error is None
    else:
        assert result.error is not None and result.error.startswith(error), result.error
    assert result.status == 200


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


OK_BODY = b'{"status":"UP"}'


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("identity", OK_BODY),
        ("GZIP", gzip.compress(OK_BODY)),
        ("x-gzip", gzip.compress(OK_BODY)),
        ("deflate", _raw_deflate(OK_BODY)),  # without the zlib wrapper, as some servers send
        ("gzip, gzip", gzip.compress(gzip.compress(OK_BODY))),
        ("deflate, gzip", gzip.compress(zlib.compress(OK_BODY))),
    ],
    ids=["identity", "GZIP", "x-gzip", "raw-deflate", "gzip-gzip", "deflate-gzip"],
)
async def test_valid_encodings_are_decoded(hostile: Hostile, coding: str, body: bytes) -> None:
    hostile.set_answer(200, body, {"Content-Encoding": coding})
    result = await probe(hostile.url, expect_json=UP)
    assert result.outcome is Outcome.OK, result.error


async def test_a_stacked_bomb_is_bounded_at_every_stage(hostile: Hostile) -> None:
    # The inner stage alone would inflate to 100 MB; the outer one is small.
    hostile.set_answer(200, gzip.compress(bomb("gzip")), {"Content-Encoding": "gzip, gzip"})
    result, peak = await probe_peak(hostile.url, expect_json=UP)
    assert result.error == "body larger than max_body_bytes=65536"
    assert peak < MEMORY_BOUND


@pytest.mark.parametrize(
    ("body", "coding"),
    [(b"not gzip at all", "gzip"), (bomb("gzip"), "gzip"), (bomb("deflate"), "deflate")],
    ids=["bad-gzip", "gzip-bomb", "deflate-bomb"],
)
async def test_redirect_bodies_are_never_decoded(
    hostile: Hostile, body: bytes, coding: str
) -> None:
    hostile.set_answer(302, body, {"Location": "/again", "Content-Encoding": coding})
    result, peak = await probe_peak(hostile.url, follow_redirects=True, expect_json=UP)
    assert result.outcome is Outcome.HTTP_OTHER
    assert result.error == "too many redirects"
    assert hostile.requests == 21, "the first request and 20 redirects"
    assert peak < MEMORY_BOUND


@pytest.mark.parametrize("mode", ["bad_gzip", "bad_deflate", "br", "truncated_gzip"])
async def test_a_status_only_probe_does_not_judge_the_encoding(
    hostile: Hostile, mode: HostileMode
) -> None:
    hostile.set_mode(mode)
    result = await probe(hostile.url)
    assert result.outcome is Outcome.OK, result.error


async def test_probes_ask_for_identity(hostile: Hostile) -> None:
    # The server echoes nothing, so look at what reached it through a raw answer that
    # depends on nothing; the request itself is checked by a real upstream below.
    seen: list[bytes] = []
    original = hostile._read_request

    def spy(conn: socket.socket) -> str | None:
        data = conn.recv(65536, socket.MSG_PEEK)
        seen.append(data)
        return original(conn)

    # One server's method, wrapped for this test: mypy forbids assigning to a method.
    hostile._read_request = spy  # type: ignore[method-assign]
    assert (await probe(hostile.url)).ok
    assert b"accept-encoding: identity" in seen[0].lower()
    assert b"connection: close" in seen[0].lower()


@pytest.mark.parametrize("given", [None, "Host", "host"])
async def test_a_host_header_from_the_config_replaces_the_urls(
    hostile: Hostile, given: str | None
) -> None:
    """A virtual host behind the URL's address: the config's `Host` (any case) is the one
    sent, never beside the URL's (h11 would refuse two and every probe would fail)."""
    seen: list[bytes] = []
    original = hostile._read_request

    def spy(conn: socket.socket) -> str | None:
        seen.append(conn.recv(65536, socket.MSG_PEEK))
        return original(conn)

    hostile._read_request = spy  # type: ignore[method-assign]
    headers = {} if given is None else {given: "app.example"}
    result = await probe(hostile.url, headers=headers)
    assert result.ok, result.error
    hosts = [
        line.split(b":", 1)[1].strip()
        for line in seen[0].split(b"\r\n")
        if line.lower().startswith(b"host:")
    ]
    want = hostile.url.split("/")[2].encode() if given is None else b"app.example"
    assert hosts == [want], seen[0]


@pytest.mark.parametrize("mode", ["gzip_bomb", "deflate_bomb"])
async def test_a_zip_bomb_is_bounded_after_decoding(hostile: Hostile, mode: HostileMode) -> None:
    hostile.set_mode(mode)
    bomb(mode.removesuffix("_bomb"))  # made before measuring: the server's, not the probe's
    result, peak = await probe_peak(hostile.url, expect_json=UP)
    assert result.outcome is Outcome.BODY_MISMATCH
    assert result.error == "body larger than max_body_bytes=65536"
    assert peak < MEMORY_BOUND, f"{mode}: the probe held {peak} bytes"


# ---- expect_json --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expect", "body", "error"),
    [
        ({"up": True}, {"up": 1}, "up is 1, expected true"),
        ({"up": False}, {"up": 0}, "up is 0, expected false"),
        ({"n": 1}, {"n": True}, "n is true, expected 1"),
        ({"v": 1}, {"v": "1"}, 'v is "1", expected 1'),
        ({"status": "UP"}, {"status": ["UP"]}, 'status is an array, expected "UP"'),
        ({"db": {"ok": True}}, {"db": {"ok": 1}}, "db.ok is 1, expected true"),
        ({"tags": ["a", True]}, {"tags": ["a", 1]}, "tags[1] is 1, expected true"),
        ({"status": "UP"}, {"other": 1}, "status is missing"),
        ({"status": "UP"}, ["UP"], "body is an array, expected an object"),
        ({"up": True}, {"up": True, "extra": 1}, None),
        ({"n": 1}, {"n": 1.0}, None),  # one JSON number
        ({"db": {"ok": True}}, {"db": {"ok": True, "ms": 3}}, None),
    ],
)
async def test_expect_json_types_must_match(
    hostile: Hostile, expect: dict[str, object], body: object, error: str | None
) -> None:
    hostile.set_answer(200, json.dumps(body).encode())
    result = await probe(hostile.url, expect_json=expect)
    if error is None:
        assert result.outcome is Outcome.OK, result.error
    else:
        assert result.outcome is Outcome.BODY_MISMATCH
        assert result.error == f"body does not match expect_json: {error}"


async def test_a_mismatch_never_shows_a_secret_value(hostile: Hostile) -> None:
    hostile.set_answer(200, b'{"api_key": "sk-live-0123456789"}')
    result = await probe(hostile.url, expect_json={"api_key": "expected-key"})
    assert result.error == "body does not match expect_json: api_key is ***, expected ***"


# ---- the summary of a failing answer ------------------------------------------------

SPRING = b'{"status":"DOWN","components":{"db":{"status":"DOWN"}}}'
SPRING_MANY = json.dumps(
    {
        "status": "DOWN",
        "components": {
            "diskSpace": {"status": "UP", "details": {"free": 1}},
            "db": {"status": "DOWN", "details": {"error": "Connection refused"}},
            "redis": {"status": "UP"},
        },
    }
).encode()
IETF = json.dumps(
    {
        "status": "fail",
        "checks": {"postgres:connections": [{"status": "fail", "output": "too many"}]},
    }
).encode()
NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body></html>"
)


@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (503, SPRING, {}, "HTTP 503 status=DOWN db=DOWN"),
        (503, SPRING_MANY, {}, "HTTP 503 status=DOWN db=DOWN diskSpace=UP redis=UP"),
        (503, IETF, {}, "HTTP 503 status=fail postgres:connections=fail"),
        (500, b'{"error":"database unavailable"}', {}, 'HTTP 500 error="database unavailable"'),
        (502, NGINX_502, {"Content-Type": "text/html"}, "HTTP 502 Bad Gateway"),
        (503, b"upstream overloaded\n\x1b[31mretry later\x1b[0m", {}, None),
        (404, b"", {}, "HTTP 404"),
        (503, gzip.compress(SPRING), {"Content-Encoding": "gzip"}, "HTTP 503 status=DOWN db=DOWN"),
        (503, b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"}, "HTTP 503"),
    ],
    ids=[
        "spring",
        "spring-many",
        "ietf-health",
        "error-field",
        "nginx-html",
        "text-escapes",
        "empty",
        "gzip",
        "bad-gzip",
    ],
)
async def test_a_failing_answer_is_summarised(
    hostile: Hostile, status: int, body: bytes, headers: dict[str, str], error: str | None
) -> None:
    hostile.set_answer(status, body, headers)
    result = await probe(hostile.url, expect_json=UP)
    assert result.status == status
    if error is None:  # text with terminal escapes: printable characters only
        assert result.error is not None
        assert result.error.startswith("HTTP 503 upstream overloaded")
        assert "\x1b" not in result.error and "\n" not in result.error
    else:
        assert result.error == error


async def test_a_summary_is_bounded(hostile: Hostile) -> None:
    doc = {"status": "DOWN", "components": {f"c{i}": {"status": "DOWN"} for i in range(500)}}
    hostile.set_answer(503, json.dumps(doc).encode())
    result = await probe(hostile.url)
    assert result.error is not None
    assert result.error.startswith("HTTP 503 status=DOWN c0=DOWN c1=DOWN")
    assert len(result.error) <= len("HTTP 503 ") + 160


@pytest.mark.parametrize(
    ("body", "summary"),
    [
        (b'{"status":"DOWN","token":"tk-0123456789abcdef"}', "status=DOWN token=***"),
        (
            b'{"status":"DOWN","error":"login failed: password=tk-0123456789abcdef"}',
            'status=DOWN error="login failed: password=***"',
        ),
        (
            b'{"status":"DOWN","dsn":"postgres://app:tk-0123456789abcdef@db:5432/app"}',
            "status=DOWN dsn=postgres://***@db:5432/app",
        ),
        (
            b"unauthorized: Authorization: Bearer tk-0123456789abcdef",
            "unauthorized: Authorization: ***",
        ),
        (
            b'{"status":"DOWN","error":{"code":7,"client_secret":"tk-0123456789abcdef"}}',
            'status=DOWN error={"code":7,"client_secret":"***"}',
        ),
    ],
    ids=["token-field", "password-in-text", "url-userinfo", "bearer-text", "nested-secret"],
)
async def test_a_summary_never_carries_a_secret(
    hostile: Hostile, body: bytes, summary: str
) -> None:
    hostile.set_answer(503, body)
    result = await probe(hostile.url)
    assert result.error == f"HTTP 503 {summary}"
    assert "tk-0123456789abcdef" not in result.error


async def test_a_summary_redacts_a_configured_secret(hostile: Hostile) -> None:
    Secret("registered-probe-header-value")
    hostile.set_answer(503, b"rejected header registered-probe-header-value")
    result = await probe(hostile.url)
    assert result.error == "HTTP 503 rejected header ***"


# ---- headers that cannot be sent ----------------------------------------------------

# Config validation refuses all of these; the prober is given them directly, as a config
# that slipped past it would: the probe fails, but its error never carries the secret.
SECRET_PART = "SEKRET-probe-wqzk"  # noqa: S105 - a fake, to prove it is hidden
UNSENDABLE: dict[str, tuple[dict[str, str], str]] = {
    "trailing-newline": (
        {"Authorization": f"Bearer {SECRET_PART}\n"},
        "the value of header Authorization is not valid HTTP",
    ),
    "crlf-injection": (
        {"Authorization": f"Bearer {SECRET_PART}\r\nX-Injected: 1"},
        "the value of header Authorization is not valid HTTP",
    ),
    "nul": ({"X-Api-Key": f"{SECRET_PART}\x00"}, "the value of header X-Api-Key is not valid HTTP"),
    "non-ascii": (
        {"X-Api-Key": f"{SECRET_PART}-é"},
        "the value of header X-Api-Key is not valid HTTP",
    ),
    "leading-space": (
        {"X-Api-Key": f" {SECRET_PART}"},
        "the value of header X-Api-Key is not valid HTTP",
    ),
    "name-holds-the-line": (
        {f"Authorization: Bearer {SECRET_PART}": "x"},
        "a header name is not valid HTTP",
    ),
}


@pytest.mark.parametrize(("headers", "reason"), list(UNSENDABLE.values()), ids=list(UNSENDABLE))
async def test_a_header_that_cannot_be_sent_is_never_quoted(
    hostile: Hostile, headers: dict[str, str], reason: str
) -> None:
    result = await probe(hostile.url, headers=headers)
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error == f"cannot send this request: {reason}"
    assert result.status is None
    assert "SEKRET" not in repr(result) and "wqzk" not in repr(result)
    # Not a byte left: the smuggled `X-Injected` never reached the server.
    assert hostile.requests == 0
    assert (await probe(hostile.url, headers={"Authorization": "Bearer fine"})).ok
    assert hostile.requests == 1


@pytest.mark.parametrize(
    "headers",
    [h for name, (h, _) in UNSENDABLE.items() if name != "non-ascii"],
    ids=[name for name in UNSENDABLE if name != "non-ascii"],
)
async def test_an_injected_transport_never_quotes_a_header_either(
    hostile: Hostile, headers: dict[str, str]
) -> None:
    # httpx's own HTTP/1.1 (h11 again, through httpcore) refuses them with the same quote.
    # Non-ASCII is left out: httpx refuses it when the client is made, before any probe.
    import httpx  # noqa: PLC0415 - the wire's tests never load it

    prober = HttpProber(
        [hostile.url], ProbeSpec(timeout=2.0, headers=headers), transport=httpx.AsyncHTTPTransport()
    )
    try:
        result = await prober.probe()
    finally:
        await prober.aclose()
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error == (
        f"cannot send this request (127.0.0.1:{hostile.port}): "
        "a header name or value is not valid HTTP"
    )
    assert "SEKRET" not in repr(result) and "wqzk" not in repr(result)
    assert hostile.requests == 0


# ---- connection failures ------------------------------------------------------------


async def test_connection_refused_reads_plainly() -> None:
    port = free_port()
    result = await probe(f"http://127.0.0.1:{port}/healthz")
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error == f"connection refused (127.0.0.1:{port})"


async def test_a_failed_dns_lookup_reads_plainly() -> None:
    result = await probe("http://guardd-probe-test.invalid/healthz")
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error is not None
    assert result.error.startswith("DNS lookup failed (guardd-probe-test.invalid): "), result.error


async def test_tls_to_a_plain_http_server_reads_plainly() -> None:
    with Upstream("green") as plain:
        result = await probe(f"https://127.0.0.1:{plain.port}/healthz")
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error == f"TLS handshake failed (127.0.0.1:{plain.port}): wrong version number"


async def test_a_protocol_error_reads_plainly(hostile: Hostile) -> None:
    hostile.set_mode("many_headers")
    result = await probe(hostile.url)
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error == f"protocol error (127.0.0.1:{hostile.port}): receive buffer too long"


async def test_a_reset_reads_plainly(hostile: Hostile) -> None:
    hostile.set_mode("reset")
    result = await probe(hostile.url, expect_json=UP)
    assert result.outcome is Outcome.CONNECT_ERROR
    assert result.error == f"connection reset by peer (127.0.0.1:{hostile.port})"


# ---- fresh connections --------------------------------------------------------------


async def test_every_probe_opens_a_fresh_connection() -> None:
    with Hostile("ok", keepalive=True) as server:
        prober = HttpProber([server.url], ProbeSpec(timeout=2.0))
        kept = HttpProber([server.url], ProbeSpec(timeout=2.0, keepalive=True))
        try:
            for _ in range(3):
                assert (await prober.probe()).ok
            assert server.connections == 3
            for _ in range(3):
                assert (await kept.probe()).ok
            assert server.connections == 4, "keepalive = true reuses one connection"
            # The listener dies; the kept connection still answers: the documented caveat.
            server.close_listener()
            fresh = await prober.probe()
            assert fresh.outcome is Outcome.CONNECT_ERROR
            assert fresh.error == f"connection refused (127.0.0.1:{server.port})"
            assert (await kept.probe()).ok
        finally:
            await prober.aclose()
            await kept.aclose()


# ---- URL schemes --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["HTTP", "Http", "hTtP"])
async def test_url_schemes_are_case_insensitive(
    hostile: Hostile, scheme: str, tmp_path: Path
) -> None:
    url = f"{scheme}://127.0.0.1:{hostile.port}/healthz"
    assert (await probe(url, expect_json=UP)).ok
    config = tmp_path / "case.toml"
    config.write_text(
        f'[upstreams.blue]\nurl = "{url}"\n[upstreams.green]\nurls = ["{url}?green"]\n'
        f'[switch]\nkind = "state-file"\npath = "{tmp_path / "state.json"}"\n'
        f'verify_url = "HtTpS://127.0.0.1/healthz"\n'
    )
    with anyio.fail_after(60):
        done = await anyio.run_process([*GUARDD, "check-config", str(config)], check=False)
    assert done.returncode == 0, done.stderr
    assert b"ok: instance=case" in done.stdout


# ---- a library another thread is still importing ------------------------------------


async def test_httpx_half_imported_by_another_thread_changes_no_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx is looked up, never imported, by the prober: while another thread imports it
    (a notification sink's first delivery), `sys.modules` holds a module without its names
    yet. A failing answer, summarised, and a refused connection are outcomes all the same."""
    half = types.ModuleType("httpx")
    half.__spec__ = importlib.machinery.ModuleSpec("httpx", None)
    half.__spec__._initializing = True  # type: ignore[attr-defined]  # as the import system sets it
    monkeypatch.setitem(sys.modules, "httpx", half)
    with Upstream("green") as server:
        server.set_mode("http_503")
        failing = await probe(server.url, expect_json=UP)
    assert failing.outcome is Outcome.HTTP_5XX, failing
    port = free_port()
    refused = await probe(f"http://127.0.0.1:{port}/healthz")
    assert refused.error == f"connection refused (127.0.0.1:{port})"
