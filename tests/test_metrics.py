"""guardd's metrics: the docs/contract.md §5 names, their behaviour, the endpoint, a scrape."""

from __future__ import annotations

import selectors
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from guardd.metrics import (
    COLORS,
    PROBE_OUTCOMES,
    ROLLBACK_SEVERITIES,
    STATES,
    STORAGE_KINDS,
    GuardMetrics,
    MetricsServer,
    parse_listen,
)
from tests.harness.prometheus import PrometheusServer

pytestmark = pytest.mark.anyio

GUARD = "threader"

# docs/contract.md §5, plus the two storage/liveness metrics the contract is getting: name -> (type,
# labels besides `guard`).
CONTRACT_METRICS = {
    "guardd_probe_total": ("counter", {"color", "outcome"}),
    "guardd_probe_duration_seconds": ("histogram", {"color"}),
    "guardd_upstream_healthy": ("gauge", {"color"}),
    "guardd_consecutive_failures": ("gauge", {"color"}),
    "guardd_window_error_ratio": ("gauge", {"color"}),
    "guardd_active_color": ("gauge", {"color"}),
    "guardd_state": ("gauge", {"state"}),
    "guardd_rollbacks_total": ("counter", {"severity"}),
    "guardd_switch_duration_seconds": ("histogram", set()),
    "guardd_qos_locked": ("gauge", set()),
    "guardd_notifications_total": ("counter", {"sink", "outcome"}),
    "guardd_build_info": ("gauge", {"version"}),
    "guardd_storage_errors_total": ("counter", {"kind"}),
    "guardd_decision_ticks_total": ("counter", set()),
}


def families(metrics: GuardMetrics) -> dict[str, Metric]:
    """Parse the exposition the way a scraper would, keyed by family name."""
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(metrics: GuardMetrics, sample: str, **labels: str) -> float:
    """Return the one exposed sample named `sample` whose labels include `labels`."""
    found = [
        s.value
        for f in families(metrics).values()
        for s in f.samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{sample}{labels}: expected one sample, found {found}"
    return found[0]


@pytest.fixture
def metrics() -> GuardMetrics:
    return GuardMetrics(GUARD, "0.1.0", CollectorRegistry())


def test_every_contract_metric_has_its_type_labels_and_guard(metrics: GuardMetrics) -> None:
    """Each §5 name is exposed with the documented type and labels, plus guard="threader"."""
    metrics.declare_sinks(["slack"])
    exposed = families(metrics)

    for name, (kind, labels) in CONTRACT_METRICS.items():
        # The parser names counter families without their `_total` suffix.
        family = exposed[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels | {"guard"}, sample
            assert sample.labels["guard"] == GUARD


def test_every_series_carries_the_guard_label(metrics: GuardMetrics) -> None:
    """Process and platform metrics carry `guard` too, so one Prometheus can tell guards apart."""
    exposed = families(metrics)

    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= set(exposed)
    for family in exposed.values():
        for sample in family.samples:
            assert sample.labels.get("guard") == GUARD, sample


def test_build_info_is_one_with_the_version(metrics: GuardMetrics) -> None:
    assert value(metrics, "guardd_build_info", version="0.1.0") == 1


def test_known_series_exist_at_zero_before_anything_happens(metrics: GuardMetrics) -> None:
    """`increase()` only sees the first event of a series that was already there at 0."""
    for color in COLORS:
        for outcome in PROBE_OUTCOMES:
            assert value(metrics, "guardd_probe_total", color=color, outcome=outcome) == 0
        assert value(metrics, "guardd_probe_duration_seconds_count", color=color) == 0
    for state in STATES:
        assert value(metrics, "guardd_state", state=state) == 0
    for severity in ROLLBACK_SEVERITIES:
        assert value(metrics, "guardd_rollbacks_total", severity=severity) == 0
    for kind in STORAGE_KINDS:
        assert value(metrics, "guardd_storage_errors_total", kind=kind) == 0
    assert value(metrics, "guardd_decision_ticks_total") == 0
    assert value(metrics, "guardd_switch_duration_seconds_count") == 0
    assert value(metrics, "guardd_qos_locked") == 0


def test_probes_are_counted_per_color_and_outcome_and_timed(metrics: GuardMetrics) -> None:
    metrics.observe_probe("green", "http_5xx", 0.02)
    metrics.observe_probe("green", "http_5xx", 0.2)
    metrics.observe_probe("blue", "ok", 0.003)

    assert value(metrics, "guardd_probe_total", color="green", outcome="http_5xx") == 2
    assert value(metrics, "guardd_probe_total", color="blue", outcome="ok") == 1
    assert value(metrics, "guardd_probe_total", color="green", outcome="ok") == 0
    assert value(metrics, "guardd_probe_duration_seconds_count", color="green") == 2
    assert value(metrics, "guardd_probe_duration_seconds_sum", color="green") == pytest.approx(0.22)
    assert value(metrics, "guardd_probe_duration_seconds_bucket", color="green", le="0.025") == 1
    assert value(metrics, "guardd_probe_duration_seconds_bucket", color="blue", le="0.005") == 1


def test_rollbacks_switches_ticks_and_storage_errors_are_counted(metrics: GuardMetrics) -> None:
    metrics.rollback_completed("P0")
    metrics.rollback_completed("manual")
    metrics.rollback_completed("P0")
    metrics.observe_switch(1.5)
    metrics.storage_error("journal")
    metrics.decision_tick()
    metrics.decision_tick()

    assert value(metrics, "guardd_rollbacks_total", severity="P0") == 2
    assert value(metrics, "guardd_rollbacks_total", severity="P1") == 0
    assert value(metrics, "guardd_rollbacks_total", severity="manual") == 1
    assert value(metrics, "guardd_switch_duration_seconds_count") == 1
    assert value(metrics, "guardd_switch_duration_seconds_sum") == 1.5
    assert value(metrics, "guardd_storage_errors_total", kind="journal") == 1
    assert value(metrics, "guardd_storage_errors_total", kind="outbox") == 0
    assert value(metrics, "guardd_decision_ticks_total") == 2


def test_notifications_are_counted_per_sink_with_all_outcomes_present(
    metrics: GuardMetrics,
) -> None:
    metrics.notification("slack", "retried")
    metrics.notification("slack", "sent")
    metrics.notification("slack", "sent")

    assert value(metrics, "guardd_notifications_total", sink="slack", outcome="sent") == 2
    assert value(metrics, "guardd_notifications_total", sink="slack", outcome="retried") == 1
    # A sink's first notification brings its other outcomes to life at 0.
    assert value(metrics, "guardd_notifications_total", sink="slack", outcome="dropped") == 0


def test_upstream_gauges_follow_the_policy(metrics: GuardMetrics) -> None:
    metrics.set_upstream("green", healthy=False, consecutive_failures=3, error_ratio=0.8)
    metrics.set_upstream("blue", healthy=True, consecutive_failures=0, error_ratio=0.0)

    assert value(metrics, "guardd_upstream_healthy", color="green") == 0
    assert value(metrics, "guardd_consecutive_failures", color="green") == 3
    assert value(metrics, "guardd_window_error_ratio", color="green") == 0.8
    assert value(metrics, "guardd_upstream_healthy", color="blue") == 1

    metrics.set_qos_locked(True)
    assert value(metrics, "guardd_qos_locked") == 1
    metrics.set_qos_locked(False)
    assert value(metrics, "guardd_qos_locked") == 0


def test_active_color_is_one_hot(metrics: GuardMetrics) -> None:
    def active() -> dict[str, float]:
        return {c: value(metrics, "guardd_active_color", color=c) for c in COLORS}

    metrics.set_active("blue")
    assert active() == {"blue": 1, "green": 0}
    metrics.set_active("green")
    assert active() == {"blue": 0, "green": 1}
    metrics.set_active(None)
    assert active() == {"blue": 0, "green": 0}


@pytest.mark.parametrize("state", STATES)
def test_state_is_one_hot(metrics: GuardMetrics, state: str) -> None:
    metrics.set_state("hold" if state != "hold" else "steady")
    metrics.set_state(state)

    assert {s: value(metrics, "guardd_state", state=s) for s in STATES} == {
        s: (1 if s == state else 0) for s in STATES
    }


def test_values_outside_the_contract_are_refused(metrics: GuardMetrics) -> None:
    """A typo must fail in tests, not become a new series in production."""
    with pytest.raises(ValueError, match="purple"):
        metrics.observe_probe("purple", "ok", 0.1)
    with pytest.raises(ValueError, match="http_418"):
        metrics.observe_probe("blue", "http_418", 0.1)
    with pytest.raises(ValueError, match="purple"):
        metrics.set_active("purple")
    with pytest.raises(ValueError, match="purple"):
        metrics.set_upstream("purple", healthy=True, consecutive_failures=0, error_ratio=0.0)
    with pytest.raises(ValueError, match="sleeping"):
        metrics.set_state("sleeping")
    with pytest.raises(ValueError, match="P2"):
        metrics.rollback_completed("P2")
    with pytest.raises(ValueError, match="disk"):
        metrics.storage_error("disk")
    with pytest.raises(ValueError, match="lost"):
        metrics.notification("slack", "lost")

    assert "purple" not in metrics.render().decode()


def test_guards_in_separate_registries_do_not_collide() -> None:
    """No global state: two guards in one process, and the default registry stays untouched."""
    threader = GuardMetrics("threader", "0.1.0")
    checkout = GuardMetrics("checkout", "0.1.0")
    threader.rollback_completed("P0")

    assert value(threader, "guardd_rollbacks_total", severity="P0") == 1
    assert value(checkout, "guardd_rollbacks_total", severity="P0") == 0
    assert 'guard="threader"' not in checkout.render().decode()
    assert prometheus_client.REGISTRY.get_sample_value("guardd_build_info") is None


def test_a_registry_takes_one_guard_only() -> None:
    registry = CollectorRegistry()
    GuardMetrics("threader", "0.1.0", registry)

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GuardMetrics("checkout", "0.1.0", registry)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9105", ("127.0.0.1", 9105)),
        ("[::1]:9105", ("::1", 9105)),
        ("localhost:0", ("localhost", 0)),
        (":9105", ("0.0.0.0", 9105)),
    ],
)
def test_parse_listen_accepts_host_port(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9105", "127.0.0.1", "::1:9105", "host:port", "h:70000"])
def test_parse_listen_refuses_the_rest(listen: str) -> None:
    with pytest.raises(ValueError, match="9105"):
        parse_listen(listen)


@pytest.mark.parametrize(("listen", "host"), [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "[::1]")])
async def test_server_serves_metrics_over_http_and_404_elsewhere(
    metrics: GuardMetrics, listen: str, host: str
) -> None:
    """Served from its own thread: the event loop awaits the answer instead of producing it."""
    metrics.set_active("green")
    with MetricsServer(listen, metrics.registry) as server:
        assert server.port != 0
        base = f"http://{host}:{server.port}"
        async with httpx.AsyncClient(timeout=10) as client:
            scrape = await client.get(f"{base}/metrics")
            other = await client.get(f"{base}/")
            openmetrics = await client.get(
                f"{base}/metrics", headers={"Accept": "application/openmetrics-text"}
            )

    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    assert scrape.headers["content-encoding"] == "gzip"  # httpx asks for it and unpacks it
    parsed = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    assert parsed["guardd_active_color"].samples[1].labels == {"guard": GUARD, "color": "green"}
    assert parsed["guardd_active_color"].samples[1].value == 1
    assert other.status_code == 404
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_server_refuses_a_taken_port_and_closes_twice(metrics: GuardMetrics) -> None:
    with MetricsServer("127.0.0.1:0", metrics.registry) as first:
        second = MetricsServer(f"127.0.0.1:{first.port}", metrics.registry)
        with pytest.raises(OSError, match="in use"):
            second.start()
        second.close()
    first.close()

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{first.port}/metrics", timeout=5)


def test_the_server_thread_sleeps_until_a_scrape_or_close(
    metrics: GuardMetrics, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """No wake-up of its own: every wait of the serving thread is without a timeout, a
    connection gone before it is accepted holds nothing, and `close` wakes it."""
    waits: list[float | None] = []

    class Recording(selectors.DefaultSelector):
        def select(self, timeout: float | None = None) -> list[Any]:
            waits.append(timeout)
            return super().select(timeout)

    monkeypatch.setattr(selectors, "DefaultSelector", Recording)
    with MetricsServer("127.0.0.1:0", metrics.registry) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert httpx.get(url, timeout=30).status_code == 200
        for _ in range(3):
            gone = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            # Linger 0: the close resets the connection, maybe before it is accepted.
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.close()
        assert httpx.get(url, timeout=30).status_code == 200
    assert waits
    assert set(waits) == {None}
    # A reset connection is not logged as a crash.
    assert "Traceback" not in capfd.readouterr().err
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


def test_real_prometheus_scrapes_the_active_color(metrics: GuardMetrics, tmp_path: Path) -> None:
    """The PromQL an operator would type finds the active color, labelled with the guard."""
    metrics.set_active("blue")
    with (
        MetricsServer("127.0.0.1:0", metrics.registry) as server,
        PrometheusServer([f"127.0.0.1:{server.port}"], tmp_path) as prometheus,
    ):
        result = prometheus.wait_for_query(
            'guardd_active_color{color="blue"} == 1', lambda r: len(r) == 1
        )

    labels = result[0]["metric"]
    assert labels["guard"] == GUARD
    assert labels["job"] == "guardd"
    assert result[0]["value"][1] == "1"
