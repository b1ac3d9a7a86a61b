"""What a probe's own HTTP/1.1 wire must survive beyond the hostile suite's cases.

Each drives `HttpProber` against a real misbehaving server on loopback: an answer split
across hundreds of reads, a chunked body whose one chunk is 100 MiB, a TLS handshake the
server never finishes, a kept-alive connection the server says it will close, a connect
that never completes and an IPv6 address literal.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import trustme

from guardd.core.types import Outcome
from guardd.guard import _named
from guardd.probes import wire
from guardd.probes.http import HttpProber, ProbeResult, ProbeSpec
from tests.faults.test_hostile import MEMORY_BOUND, SLACK, TIMEOUT, probe_once, server_tls
from tests.harness.hostile import HUGE_BYTES, Hostile


@pytest.mark.anyio
@pytest.mark.parametrize("expect_json", [None, {"status": "UP"}])
async def test_an_answer_split_across_many_reads_is_put_together(
    expect_json: dict[str, str] | None,
) -> None:
    with Hostile("split") as server:
        got, _, error, _ = await probe_once(server.url, expect_json=expect_json)
        assert got is Outcome.OK, error
        assert server.requests == 1


@pytest.mark.anyio
async def test_a_huge_chunk_is_read_only_up_to_the_bound() -> None:
    with Hostile("huge_chunk") as server:
        got, elapsed, error, peak = await probe_once(server.url, expect_json={"status": "UP"})
        assert got is Outcome.BODY_MISMATCH, error
        assert error == "body larger than max_body_bytes=65536"
        assert elapsed <= TIMEOUT + SLACK
        assert peak < MEMORY_BOUND, f"the probe held {peak} bytes"
        assert server.bytes_sent < HUGE_BYTES // 10, "the chunk was not read to its end"
        # Judged by status only, the body is cut off at the bound all the same.
        got, _, error, peak = await probe_once(server.url)
        assert got is Outcome.OK, error
        assert peak < MEMORY_BOUND


@pytest.mark.anyio
async def test_a_stalled_tls_handshake_times_out() -> None:
    ca = trustme.CA()
    with Hostile("stall_handshake", tls=server_tls(ca, "localhost")) as server:
        got, elapsed, error, _ = await probe_once(
            f"https://localhost:{server.port}/healthz", verify_tls=False
        )
        assert got is Outcome.TIMEOUT, error
        assert error == f"no answer within {TIMEOUT:g}s"
        assert elapsed <= TIMEOUT + SLACK
        assert server.connections_stalled == 1
        assert server.requests == 0


@pytest.mark.anyio
async def test_a_connection_the_server_closes_is_not_kept() -> None:
    with Hostile("ok", keepalive=True) as server:
        prober = HttpProber([server.url], ProbeSpec(timeout=TIMEOUT, keepalive=True))
        try:
            assert (await prober.probe()).ok
            assert (await prober.probe()).ok
            assert server.connections == 1
            # The server closes the idle connection (its keepalive timeout, a restart).
            server.set_mode("answer")
            server.set_answer(200, b"{}", {"Connection": "close"})
            assert (await prober.probe()).ok  # answered, then closed by the server
            server.set_mode("ok")
            result = await prober.probe()
            assert result.ok, result.error
            assert server.connections == 2
        finally:
            await prober.aclose()


# ---- the plain socket an address literal is dialled on ------------------------------


@pytest.mark.anyio
async def test_a_connect_that_never_completes_times_out() -> None:
    """A listener whose accept queue is full drops the SYN: the connect waits, bounded."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Never accepted: the first fills the queue, the second is left waiting.
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            got, elapsed, error, _ = await probe_once(f"http://127.0.0.1:{port}/healthz")
        finally:
            for filler in fillers:
                filler.close()
    assert got is Outcome.TIMEOUT, error
    assert error == f"no answer within {TIMEOUT:g}s"
    assert elapsed <= TIMEOUT + SLACK


@pytest.mark.anyio
async def test_an_ipv6_literal_is_probed() -> None:
    """`http://[::1]:port/`: dialled as an IPv6 address, sent `Host: [::1]:port`."""
    heard: list[bytes] = []
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                heard.append(data)
                body = b'{"status": "UP"}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        got, _, error, _ = await probe_once(
            f"http://[::1]:{port}/healthz", expect_json={"status": "UP"}
        )
        server.join(timeout=10)
    assert got is Outcome.OK, error
    assert heard and f"\r\nHost: [::1]:{port}\r\n".encode() in heard[0], heard


def test_a_field_sent_on_several_lines_is_one_field_its_values_in_order() -> None:
    """RFC 9110 §5.3, as httpx gives it: never only the last line, which would let one
    value hide another (two colors named in `switch.verify_header`)."""
    lines = [(b"X-Color", b"green"), (b"Content-Type", b"text/plain"), (b"x-color", b"blue")]
    assert wire._fields(lines) == {"x-color": "green, blue", "content-type": "text/plain"}


def test_a_value_is_read_as_utf_8_when_it_is_that_else_as_latin_1() -> None:
    """What a mismatch's message quotes is what the server sent: `grün`, never `grÃ¼n`;
    bytes that are no UTF-8 still read, one character each."""
    lines = [(b"X-Color", "grün".encode()), (b"X-Other", b"gr\xfcn \xff\x80")]
    assert wire._fields(lines) == {"x-color": "grün", "x-other": "grün ÿ\x80"}


@pytest.mark.parametrize(
    ("value", "color"),
    [
        ("blue", "blue"),
        (" Blue ", "blue"),
        ("GREEN", "green"),
        ("blue, blue", "blue"),
        ("green, blue", None),
        ("", None),
        (None, None),
        ("bleu", None),
        ("blue;q=1", None),
        ("\tblue ", "blue"),
        ("\u00a0green\u00a0", None),
    ],
)
def test_the_color_an_answer_names(value: str | None, color: str | None) -> None:
    answer = ProbeResult(Outcome.OK, 0.01, served_by=value)
    assert _named(answer) == color
