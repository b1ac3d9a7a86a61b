"""Hostile and broken upstreams: each is classified, bounded in time and memory, and acted on.

Probe-level cases drive `HttpProber` against real misbehaving servers on loopback; the
daemon-level ones point a running guardd's green probe at them and watch it roll back.
"""

from __future__ import annotations

import signal
import ssl
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from guardd.core.types import Outcome
from guardd.probes.http import HttpProber, ProbeSpec
from tests.faults.util import FaultLab, figure, metric, metrics_port, rss_kib, scrape, status
from tests.harness.daemon import wait_until
from tests.harness.hostile import HUGE_BYTES, Hostile, HostileMode
from tests.harness.nginx import free_port

TIMEOUT = 1.0
# Scheduling slack on a busy two-core machine; the bound itself is `probe.timeout`.
SLACK = 0.5
# A probe holds at most max_body_bytes of a body, however big the body is.
MEMORY_BOUND = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A private certificate authority for the TLS cases."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    """The CA's certificate as a PEM file, as `probe.ca_file` takes it."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    """A server context whose certificate is issued for `name` only."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    """A hostile server, stopped (every held connection released) after the test."""
    with Hostile("ok") as server:
        yield server


async def probe_once(url: str, **spec: object) -> tuple[Outcome, float, str | None, int]:
    """One probe of `url`: its outcome, wall seconds, error, and peak traced allocation."""
    prober = HttpProber([url], ProbeSpec(timeout=TIMEOUT, **spec))  # type: ignore[arg-type]
    try:
        tracemalloc.start()
        started = time.monotonic()
        result = await prober.probe()
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await prober.aclose()
    return result.outcome, elapsed, result.error, peak


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "expect_json", "outcome"),
    [
        ("silent", None, Outcome.TIMEOUT),
        ("dribble", None, Outcome.TIMEOUT),
        ("dribble", {"status": "UP"}, Outcome.TIMEOUT),
        # Without body expectations only the status is judged; the body is cut off at
        # max_body_bytes either way.
        ("huge", None, Outcome.OK),
        ("huge", {"status": "UP"}, Outcome.BODY_MISMATCH),
        # h11 refuses a header block past its limit: the exchange breaks below HTTP.
        ("many_headers", None, Outcome.CONNECT_ERROR),
        ("redirect_loop", None, Outcome.HTTP_OTHER),
        ("reset", {"status": "UP"}, Outcome.CONNECT_ERROR),
    ],
)
async def test_hostile_upstream_is_classified_and_bounded(
    hostile: Hostile, mode: HostileMode, expect_json: dict[str, str] | None, outcome: Outcome
) -> None:
    hostile.set_mode(mode)
    got, elapsed, error, peak = await probe_once(hostile.url, expect_json=expect_json)
    assert got is outcome, error
    assert elapsed <= TIMEOUT + SLACK, f"{mode}: {elapsed:.2f}s > timeout"
    assert peak < MEMORY_BOUND, f"{mode}: the probe held {peak} bytes"
    assert hostile.requests == 1, "one probe, one request (no retries, no redirects)"
    figure(
        "hostile_probe",
        mode=mode,
        expect_json=expect_json is not None,
        outcome=got.value,
        seconds=round(elapsed, 3),
        peak_kib=peak // 1024,
    )
    if mode == "huge":
        assert hostile.bytes_sent < HUGE_BYTES // 10, "the body was not read to its end"


@pytest.mark.anyio
async def test_redirects_are_followed_only_when_asked(hostile: Hostile) -> None:
    hostile.set_mode("redirect_loop")
    got, elapsed, error, _ = await probe_once(hostile.url, follow_redirects=True)
    assert got is Outcome.HTTP_OTHER and error == "too many redirects"
    assert elapsed <= TIMEOUT + SLACK
    assert hostile.requests > 1, "followed when asked"


@pytest.mark.anyio
async def test_tls_is_verified_by_default_and_ca_file_is_honoured(
    ca: trustme.CA, ca_file: Path
) -> None:
    with Hostile("ok", tls=server_tls(ca, "localhost")) as good:
        url = f"https://localhost:{good.port}/healthz"
        # A private CA is not trusted unless configured.
        got, _, error, _ = await probe_once(url)
        assert got is Outcome.CONNECT_ERROR
        assert error == (
            f"TLS certificate rejected (localhost:{good.port}): "
            "unable to get local issuer certificate"
        )
        got, _, error, _ = await probe_once(url, ca_file=ca_file)
        assert got is Outcome.OK, error
    with Hostile("ok", tls=server_tls(ca, "wrong.example")) as wrong:
        url = f"https://localhost:{wrong.port}/healthz"
        got, elapsed, error, _ = await probe_once(url, ca_file=ca_file)
        assert got is Outcome.CONNECT_ERROR, error
        assert "localhost" in (error or ""), error  # the name check is what failed
        assert elapsed <= TIMEOUT + SLACK
        assert wrong.requests == 0, "no request is sent over an unverified connection"
        got, _, error, _ = await probe_once(url, verify_tls=False)
        assert got is Outcome.OK, "verify_tls = false is the explicit way out"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "http://guardd-fault-test.invalid/healthz",  # RFC 6761: never resolves
        "http://127.0.0.1:{refused}/healthz",
    ],
    ids=["dns-invalid", "connection-refused"],
)
async def test_unreachable_upstream_is_a_connect_error(url: str) -> None:
    got, elapsed, error, _ = await probe_once(url.format(refused=free_port()))
    assert got is Outcome.CONNECT_ERROR, error
    assert elapsed <= TIMEOUT + SLACK


# ---- through the whole daemon ---------------------------------------------------------


@pytest.mark.nginx
@pytest.mark.parametrize(
    ("mode", "outcome"),
    [
        ("silent", "timeout"),
        ("dribble", "timeout"),
        ("huge", "body_mismatch"),
        ("many_headers", "connect_error"),
        ("reset", "connect_error"),
    ],
)
def test_daemon_rolls_back_from_a_hostile_green(make_lab, mode: HostileMode, outcome: str) -> None:
    with Hostile("ok") as server:
        lab: FaultLab = make_lab(
            green_probe_url=server.url, metrics__listen="127.0.0.1:0", probe__timeout="1s"
        )
        d = lab.daemon()
        port = metrics_port(d)
        assert lab.nginx.served_color() == "green"
        rss_before = rss_kib(d.pid)
        server.set_mode(mode)
        done = d.wait_event("rollback_completed", timeout=30)
        assert done["evidence"]["rule"] == "consecutive_failures"
        assert done["evidence"]["color"] == "green"
        assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
        # Classified in the metrics, each probe bounded by the timeout.
        samples = scrape(port)
        assert metric(samples, "guardd_probe_total", color="green", outcome=outcome) >= 3
        over = metric(samples, "guardd_probe_duration_seconds_count", color="green") - metric(
            samples, "guardd_probe_duration_seconds_bucket", color="green", le="2.5"
        )
        assert over == 0, "a probe ran past timeout + slack"
        green = status(lab)["upstreams"]["green"]
        assert green["consecutive_failures"] >= 3
        if mode == "huge":
            # Keep it up: many 100 MB answers later, the daemon has not grown by one.
            served = server.requests
            wait_until(lambda: server.requests >= served + 20, 30, "20 more huge answers")
            grown = rss_kib(d.pid) - rss_before
            assert grown < 20 * 1024, "RSS grew with the body size"
            figure("hostile_daemon_huge", answers=server.requests, rss_growth_kib=grown)
        assert d.stop() == 0


@pytest.mark.nginx
def test_daemon_rolls_back_from_a_green_with_the_wrong_certificate(
    make_lab, ca: trustme.CA, ca_file: Path
) -> None:
    with Hostile("ok", tls=server_tls(ca, "localhost")) as server:
        lab: FaultLab = make_lab(
            green_probe_url=f"https://localhost:{server.port}/healthz", probe__ca_file=str(ca_file)
        )
        d = lab.daemon()
        wait_until(
            lambda: status(lab)["upstreams"]["green"]["samples"] >= 3,
            10,
            "green probed over verified TLS",
        )
        assert status(lab)["upstreams"]["green"]["healthy"] is True
        assert not [e for e in d.events() if e["event"].startswith("rollback")]
    # Green now presents a certificate for another name.
    with Hostile("ok", tls=server_tls(ca, "wrong.example")) as wrong:
        lab.green_probe_url = f"https://localhost:{wrong.port}/healthz"
        lab.write_config()
        d.signal(signal.SIGHUP)  # probe the new URL
        d.wait_event("config_reloaded")
        done = d.wait_event("rollback_completed", timeout=30)
        assert done["evidence"]["color"] == "green"
        assert "localhost" in (status(lab)["upstreams"]["green"]["last_error"] or "")
        assert wrong.requests == 0
        assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
        assert d.stop() == 0
