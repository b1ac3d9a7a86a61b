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
from typing import Any

import pytest
import trustme

from guardd.core.types import Outcome
from guardd.probes.http import HttpProber, ProbeSpec
from tests.faults.util import (
    FaultLab,
    MakeFaultLab,
    figure,
    metric,
    metrics_port,
    rss_kib,
    scrape,
    status,
)
from tests.harness.daemon import Daemon, log_lines, wait_until
from tests.harness.hostile import HUGE_BYTES, Hostile, HostileMode, bomb
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


async def probe_once(url: str, **spec: Any) -> tuple[Outcome, float, str | None, int]:
    """One probe of `url`: its outcome, wall seconds, error, and peak traced allocation."""
    prober = HttpProber([url], ProbeSpec(timeout=TIMEOUT, **spec))
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
def test_daemon_rolls_back_from_a_hostile_green(
    make_lab: MakeFaultLab, mode: HostileMode, outcome: str
) -> None:
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
    make_lab: MakeFaultLab, ca: trustme.CA, ca_file: Path
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
        # A color not seen healthy since its URL changed is rolled back only while the
        # front door fails too: green fails for real behind nginx as well.
        lab.green.set_mode("http_503")
        d.signal(signal.SIGHUP)  # probe the new URL
        d.wait_event("config_reloaded")
        done = d.wait_event("rollback_completed", timeout=30)
        assert done["evidence"]["color"] == "green"
        assert "localhost" in (status(lab)["upstreams"]["green"]["last_error"] or "")
        assert wrong.requests == 0
        assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
        assert d.stop() == 0


# ---- whatever green sends, the daemon goes on -----------------------------------------


@pytest.mark.nginx
@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("bad_gzip", "body is labelled Content-Encoding: gzip but does not decode"),
        ("bad_deflate", "body is labelled Content-Encoding: deflate but does not decode"),
        ("truncated_gzip", "gzip body ends early (truncated)"),
        ("br", "body is Content-Encoding: br, which guardd does not decode"),
    ],
)
def test_daemon_rolls_back_from_an_undecodable_green(
    make_lab: MakeFaultLab, mode: HostileMode, error: str
) -> None:
    with Hostile("ok") as server:
        lab: FaultLab = make_lab(green_probe_url=server.url)
        d = lab.daemon()
        server.set_mode(mode)
        done = d.wait_event("rollback_completed", timeout=30)
        assert done["evidence"]["color"] == "green"
        assert done["evidence"]["last_error"].startswith(error), done["evidence"]
        assert status(lab)["upstreams"]["green"]["last_error"].startswith(error)
        assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
        assert d.proc is not None and d.proc.poll() is None, "guardd is still running"
        assert d.stop() == 0


@pytest.mark.nginx
@pytest.mark.parametrize("mode", ["gzip_bomb", "deflate_bomb"])
def test_daemon_memory_is_bounded_by_a_zip_bomb(make_lab: MakeFaultLab, mode: HostileMode) -> None:
    bomb(mode.removesuffix("_bomb"))  # made before the clock starts
    with Hostile("ok") as server:
        lab: FaultLab = make_lab(green_probe_url=server.url)
        d = lab.daemon()
        # Idle: a few rounds of healthy probes settle the allocator.
        served = server.requests
        wait_until(lambda: server.requests >= served + 10, 30, "10 healthy probes")
        before = rss_kib(d.pid)
        server.set_mode(mode)
        served = server.requests
        wait_until(lambda: server.requests >= served + 20, 60, f"20 {mode} answers")
        grown = rss_kib(d.pid) - before
        figure("zip_bomb_rss", mode=mode, rss_before_kib=before, rss_growth_kib=grown)
        # Each answer inflates to 100 MB; guardd decodes at most max_body_bytes of it.
        assert grown < 8 * 1024, f"{mode}: RSS grew by {grown} KiB"
        green = status(lab)["upstreams"]["green"]
        assert green["last_error"] == "body larger than max_body_bytes=65536"
        assert d.stop() == 0


@pytest.mark.nginx
def test_daemon_rolls_back_a_green_that_stops_accepting_connections(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab()
    # Green becomes a server that keeps connections alive, on green's own port, so that
    # nginx proxies to it too.
    lab.green.stop()
    with Hostile("ok", port=lab.green.port, color="green", keepalive=True) as server:
        d = lab.daemon()
        wait_until(lambda: lab.nginx.served_color() == "green", 10, "nginx serving green")
        assert status(lab)["state"] == "steady"
        server.close_listener()
        # nginx connects afresh for every request: it gets refused and answers 502.
        wait_until(
            lambda: (lab.nginx.front_door() or (0, None))[0] == 502, 10, "nginx answering 502"
        )
        done = d.wait_event("rollback_completed", timeout=30)
        assert done["evidence"]["color"] == "green"
        assert done["evidence"]["last_error"] == f"connection refused (127.0.0.1:{server.port})"
        assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
        assert d.stop() == 0


SPRING_DOWN = b'{"status":"DOWN","components":{"db":{"status":"DOWN"}},"token":"tk-9f8e7d6c5b4a"}'


@pytest.mark.nginx
def test_daemon_journals_what_a_failing_green_said(make_lab: MakeFaultLab) -> None:
    with Hostile("ok") as server:
        lab: FaultLab = make_lab(green_probe_url=server.url, metrics__listen="127.0.0.1:0")
        d = lab.daemon()
        server.set_answer(503, SPRING_DOWN)
        done = d.wait_event("rollback_completed", timeout=30)
        said = "HTTP 503 status=DOWN token=*** db=DOWN"
        assert done["evidence"]["last_error"] == said
        started = d.wait_event("rollback_started")
        assert started["evidence"]["last_error"] == said
        assert status(lab)["upstreams"]["green"]["last_error"] == said
        assert d.stop() == 0
        for text in (d.raw_journal(), d.log()):
            assert "tk-9f8e7d6c5b4a" not in text


@pytest.mark.nginx
def test_daemon_judges_expect_json_types_and_any_scheme_case(make_lab: MakeFaultLab) -> None:
    with Hostile("ok") as server:
        lab: FaultLab = make_lab(
            green_probe_url=f"HtTp://127.0.0.1:{server.port}/healthz",
            probe__expect_json={"status": "UP"},
        )
        d = lab.daemon()
        assert status(lab)["upstreams"]["green"]["healthy"] is True
        lab.write_config(probe__expect_json={"status": "UP", "up": True})
        server.set_answer(200, b'{"status":"UP","up":1}')
        d.signal(signal.SIGHUP)
        d.wait_event("config_reloaded")
        wait_until(
            lambda: status(lab)["upstreams"]["green"]["consecutive_failures"] >= 1,
            10,
            "green failing on up=1",
        )
        assert (
            status(lab)["upstreams"]["green"]["last_error"]
            == "body does not match expect_json: up is 1, expected true"
        )
        assert d.stop() == 0


def raise_in_loop(lab: FaultLab, d: Daemon, loop: str) -> Path:
    """Make every round of `loop` raise, and check the alert that says it goes on.

    Returns the fault file; removing it lets the loop run clean again.
    """
    fault = lab.fault_dir / f"raise_in_{loop}"
    fault.touch()
    alert = d.wait_event("alert", where=lambda e: e.get("loop") == loop)
    assert alert["reason"] == (
        f"unexpected error in the {loop} loop, which goes on: "
        f"InjectedFault: injected fault at raise_in_{loop}"
    )
    return fault


@pytest.mark.nginx
def test_daemon_survives_an_exception_inside_a_probe(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab(metrics__listen="127.0.0.1:0")
    d = lab.daemon()
    port = metrics_port(d)
    fault = raise_in_loop(lab, d, "probe_green")
    # Fail closed: a color guardd cannot probe is not vouched for, and green is rolled back.
    done = d.wait_event("rollback_completed", timeout=30)
    assert done["evidence"]["last_error"].startswith("guardd could not probe: InjectedFault")
    wait_until(
        lambda: metric(scrape(port), "guardd_loop_errors_total", loop="probe_green") >= 5,
        10,
        "five errors counted",
    )
    assert metric(scrape(port), "guardd_probe_total", color="green", outcome="probe_error") >= 5
    fault.unlink()
    wait_until(
        lambda: status(lab)["upstreams"]["green"]["consecutive_failures"] == 0,
        10,
        "green probed again",
    )
    assert d.proc is not None and d.proc.poll() is None
    # One traceback, one alert, however many rounds raised.
    errors = [line for line in log_lines(d) if line.get("event") == "loop_error"]
    assert len(errors) == 1
    assert "Traceback" in errors[0]["exception"] and "InjectedFault" in errors[0]["exception"]
    assert len([e for e in d.events() if e["event"] == "alert" and e.get("loop")]) == 1
    assert d.stop() == 0


def test_daemon_survives_an_exception_inside_the_front_door_loop(make_lab: MakeFaultLab) -> None:
    lab: FaultLab = make_lab(metrics__listen="127.0.0.1:0")
    d = lab.daemon()
    port = metrics_port(d)
    fault = raise_in_loop(lab, d, "front_door")
    wait_until(
        lambda: metric(scrape(port), "guardd_loop_errors_total", loop="front_door") >= 3,
        10,
        "three errors counted",
    )
    # Fail closed: a front door guardd cannot probe is never read as serving.
    front = status(lab)["front_door"]
    assert front["healthy"] is not True
    assert "could not probe the front door" in (front["last_error"] or "")
    fault.unlink()
    wait_until(lambda: status(lab)["front_door"]["healthy"] is True, 10, "front door again")
    assert d.proc is not None and d.proc.poll() is None
    # Green never failed: a front door that could not be probed switched nothing.
    assert not [e for e in d.events() if e["event"] == "rollback_started"]
    assert d.stop() == 0
