"""Prometheus metrics of one guard, and the HTTP endpoint that serves them.

Callers speak in guardd's terms (a probe was done, the state changed); only this module knows
prometheus_client. Every series carries `guard="<instance>"` so that several guards can share
one Prometheus without relabelling, and each `GuardMetrics` writes to its own registry so that
tests and embedded demos never collide on the process-wide default one.
"""

from __future__ import annotations

import gzip
import math
import selectors
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from guardd.core import types
from guardd.core.rules import Verdict
from guardd.core.types import NOTIFICATION_OUTCOMES, Outcome, State

if TYPE_CHECKING:
    from guardd.core.window import SlidingWindow
    from guardd.probes.http import ProbeResult

__all__ = [
    "COLORS",
    "NOTIFICATION_OUTCOMES",
    "PROBE_OUTCOMES",
    "ROLLBACK_SEVERITIES",
    "STATES",
    "STORAGE_KINDS",
    "GuardMetrics",
    "MetricsServer",
    "parse_listen",
]

# Label values, from the shared vocabulary; typed as text, since callers' input is checked.
COLORS: tuple[str, ...] = types.COLORS
PROBE_OUTCOMES = tuple(o.value for o in Outcome)
STATES = tuple(s.value for s in State)
ROLLBACK_SEVERITIES = ("P0", "P1", "manual")
STORAGE_KINDS = ("journal", "state", "outbox", "lock")

# Probes time out within seconds, but the P1 latency rule looks as far as 30s.
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A switch is a test command, a reload and a verification through the front door.
SWITCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


_Child = TypeVar("_Child")

#: What became of an access-log line, and the status classes of requests (contract §5).
TRAFFIC_LINE_OUTCOMES = ("ok", "unparsed", "unattributed", "oversize", "shed", "late")
TRAFFIC_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class TrafficSource(Protocol):
    """What the traffic series read of an access-log signal: monotonic totals, and the
    error ratio of a color's window (None: no request in it)."""

    @property
    def lines(self) -> Mapping[str, int]: ...

    @property
    def requests(self) -> Mapping[tuple[str, str], int]: ...

    def error_ratio(self, color: str) -> float | None: ...


class _TrafficCollector:
    """The `guardd_traffic_*` series, read from the running signals at each scrape.

    Summed over every access-log signal (usually one). The counters come from the
    signals' own totals, so a reload that replaces a signal is a counter reset, which
    `rate()` handles. `guardd_traffic_error_ratio` is absent for a color with no request
    in the window: no traffic is not a ratio of 0.
    """

    def __init__(self, guard: str) -> None:
        self.guard = guard
        self.sources: Callable[[], Iterable[TrafficSource]] = tuple

    def collect(self) -> Iterable[Metric]:
        lines = CounterMetricFamily(
            "guardd_traffic_lines",
            "Access-log lines read, by what became of them.",
            labels=("guard", "outcome"),
        )
        requests = CounterMetricFamily(
            "guardd_traffic_requests",
            "Requests nginx logged, attributed to a color, by status class.",
            labels=("guard", "color", "class"),
        )
        ratio = GaugeMetricFamily(
            "guardd_traffic_error_ratio",
            "5xx over requests of the color in the signal's window (absent with none).",
            labels=("guard", "color"),
        )
        sources = list(self.sources())
        for outcome in TRAFFIC_LINE_OUTCOMES:
            lines.add_metric((self.guard, outcome), sum(s.lines.get(outcome, 0) for s in sources))
        for color in COLORS:
            for cls in TRAFFIC_CLASSES:
                total = sum(s.requests.get((color, cls), 0) for s in sources)
                requests.add_metric((self.guard, color, cls), total)
            ratios = [r for s in sources if (r := s.error_ratio(color)) is not None]
            if ratios:
                ratio.add_metric((self.guard, color), max(ratios))
        return [lines, requests, ratio]


class _UpstreamGauges(NamedTuple):
    """The bound gauges that describe one color's health."""

    healthy: Gauge
    consecutive_failures: Gauge
    error_ratio: Gauge


class GuardMetrics:
    """Every metric of one guard, bound to its `guard` label in one registry."""

    registry: CollectorRegistry

    def __init__(self, guard: str, version: str, registry: CollectorRegistry | None = None) -> None:
        self.guard = guard
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry

        probes = Counter("guardd_probe", "Probes done.", ("guard", "color", "outcome"), registry=r)
        probe_seconds = Histogram(
            "guardd_probe_duration_seconds",
            "Probe latency.",
            ("guard", "color"),
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        healthy = Gauge(
            "guardd_upstream_healthy",
            "1 if the color is healthy, 0 if not.",
            ("guard", "color"),
            registry=r,
        )
        failures = Gauge(
            "guardd_consecutive_failures",
            "Current run of failed probes.",
            ("guard", "color"),
            registry=r,
        )
        error_ratio = Gauge(
            "guardd_window_error_ratio",
            "Failed-probe ratio (every failed outcome, not only 5xx) over the policy window.",
            ("guard", "color"),
            registry=r,
        )
        active = Gauge(
            "guardd_active_color",
            "1 for the active color, 0 for the other.",
            ("guard", "color"),
            registry=r,
        )
        state = Gauge(
            "guardd_state",
            "1 for the current state, 0 for the others.",
            ("guard", "state"),
            registry=r,
        )
        rollbacks = Counter(
            "guardd_rollbacks", "Rollbacks completed.", ("guard", "severity"), registry=r
        )
        switch_seconds = Histogram(
            "guardd_switch_duration_seconds",
            "Time from decision to a verified switch.",
            ("guard",),
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        qos_locked = Gauge(
            "guardd_qos_locked", "1 while the QoS lock is held.", ("guard",), registry=r
        )
        target_healthy = Gauge(
            "guardd_rollback_target_healthy",
            "1 while an automatic rollback could go ahead: the rollback target is up.",
            ("guard",),
            registry=r,
        )
        self._notifications_family = Counter(
            "guardd_notifications",
            "Notifications by sink and outcome.",
            ("guard", "sink", "outcome"),
            registry=r,
        )
        storage_errors = Counter(
            "guardd_storage_errors",
            "Failed writes of the journal, state, outbox or lock.",
            ("guard", "kind"),
            registry=r,
        )
        ticks = Counter(
            "guardd_decision_ticks", "Rounds of the decision loop.", ("guard",), registry=r
        )
        loop_errors = Counter(
            "guardd_loop_errors",
            "Unexpected exceptions caught in a probe or front-door loop, which went on.",
            ("guard", "loop"),
            registry=r,
        )
        self._loop_errors_family = loop_errors
        self._loop_errors: dict[str, Counter] = {}
        self._rule_firing = Gauge(
            "guardd_rule_firing",
            "1 while the rule fires on the color (dry-run rules included), else 0.",
            ("guard", "rule", "color"),
            registry=r,
        )
        self._rule_inconclusive = Gauge(
            "guardd_rule_inconclusive",
            "1 while the rule cannot judge the color (too few samples, stale signal), else 0.",
            ("guard", "rule", "color"),
            registry=r,
        )
        # Per (rule, color): its two bound gauges and the state they show.
        self._rules: dict[tuple[str, str], tuple[Gauge, Gauge, str]] = {}
        # What the per-tick gauges show, so that a tick which changes nothing sets nothing.
        self._shown: dict[str, object] = {}
        self._verdicts: tuple[tuple[types.Color, Verdict], ...] | None = None
        self._traffic = _TrafficCollector(guard)
        r.register(self._traffic)
        build_info = Gauge(
            "guardd_build_info",
            "Always 1; the version is in the label.",
            ("guard", "version"),
            registry=r,
        )
        r.register(_GuardLabelled(ProcessCollector(registry=None), guard))
        r.register(_GuardLabelled(PlatformCollector(registry=None), guard))

        # Bind every child now: series exist with 0 from the first scrape (so `increase()`
        # sees the first event), and the hot path is a dict lookup instead of `labels()`.
        self._probe_counts = {
            (color, outcome): probes.labels(guard, color, outcome)
            for color in COLORS
            for outcome in PROBE_OUTCOMES
        }
        self._probe_seconds = {color: probe_seconds.labels(guard, color) for color in COLORS}
        self._upstreams = {
            color: _UpstreamGauges(
                healthy.labels(guard, color),
                failures.labels(guard, color),
                error_ratio.labels(guard, color),
            )
            for color in COLORS
        }
        self._active = {color: active.labels(guard, color) for color in COLORS}
        self._states = {name: state.labels(guard, name) for name in STATES}
        self._rollbacks = {sev: rollbacks.labels(guard, sev) for sev in ROLLBACK_SEVERITIES}
        self._switch_seconds = switch_seconds.labels(guard)
        self._qos_locked = qos_locked.labels(guard)
        self._target_healthy = target_healthy.labels(guard)
        self._notifications: dict[tuple[str, str], Counter] = {}
        self._storage_errors = {kind: storage_errors.labels(guard, kind) for kind in STORAGE_KINDS}
        self._ticks = ticks.labels(guard)
        build_info.labels(guard, version).set(1)
        for color in COLORS:
            self._loop_errors[f"probe_{color}"] = loop_errors.labels(guard, f"probe_{color}")

    def observe_probe(self, color: str, outcome: str, seconds: float) -> None:
        """Count one probe of `color` and record how long it took."""
        try:
            count = self._probe_counts[color, outcome]
            latency = self._probe_seconds[color]
        except KeyError:
            raise ValueError(
                f"unknown probe color/outcome {color!r}/{outcome!r}: "
                f"expected one of {COLORS} and {PROBE_OUTCOMES}"
            ) from None
        count.inc()
        latency.observe(seconds)

    def probe_round(self, color: str, result: ProbeResult, window: SlidingWindow) -> None:
        """One probe round of `color` and its window after it: `observe_probe`, then
        `set_upstream` from the window (healthy: no failure in a row; its failure ratio)."""
        self.observe_probe(color, result.outcome.value, result.latency_s)
        failures = window.consecutive_failures
        self.set_upstream(
            color,
            healthy=failures == 0,
            consecutive_failures=failures,
            error_ratio=window.failure_ratio,
        )

    def set_upstream(
        self, color: str, *, healthy: bool, consecutive_failures: int, error_ratio: float
    ) -> None:
        """Publish the policy's current view of one color."""
        gauges = _lookup(self._upstreams, color, "color")
        shown = (healthy, consecutive_failures, error_ratio)
        if self._shown.get(f"upstream_{color}") == shown:
            return
        self._shown[f"upstream_{color}"] = shown
        gauges.healthy.set(1 if healthy else 0)
        gauges.consecutive_failures.set(consecutive_failures)
        gauges.error_ratio.set(error_ratio)

    def set_active(self, color: str | None) -> None:
        """Mark `color` as the one serving traffic; None when guardd cannot tell."""
        if color is not None:
            _lookup(self._active, color, "color")
        if self._shown.get("active", "") == color:
            return
        self._shown["active"] = color
        for name, gauge in self._active.items():
            gauge.set(1 if name == color else 0)

    def set_state(self, state: str) -> None:
        """Mark `state` as the current one and every other state as not."""
        _lookup(self._states, state, "state")
        if self._shown.get("state") == state:
            return
        self._shown["state"] = state
        for name, gauge in self._states.items():
            gauge.set(1 if name == state else 0)

    def rollback_completed(self, severity: str) -> None:
        """Count one completed rollback ("P0", "P1" or "manual")."""
        _lookup(self._rollbacks, severity, "rollback severity").inc()

    def observe_switch(self, seconds: float) -> None:
        """Record the time from a decision to a verified switch."""
        self._switch_seconds.observe(seconds)

    def set_qos_locked(self, locked: bool | None) -> None:
        """Publish whether the QoS lock is held: 1, 0, or NaN when it cannot be told (a
        fleet node that cannot read the fleet's lock), so that `== 0` never means allowed
        then."""
        if "qos_locked" in self._shown and self._shown["qos_locked"] is locked:
            return
        self._shown["qos_locked"] = locked
        self._qos_locked.set(math.nan if locked is None else (1 if locked else 0))

    def set_rollback_target_healthy(self, healthy: bool) -> None:
        """Publish whether the rollback target could take traffic (0: protection lost)."""
        if self._shown.get("target_healthy") is healthy:
            return
        self._shown["target_healthy"] = healthy
        self._target_healthy.set(1 if healthy else 0)

    def declare_sinks(self, sinks: Iterable[str]) -> None:
        """Create the notification series of `sinks` at 0 before anything is sent."""
        counter = self._notifications_family
        for sink in sinks:
            for outcome in NOTIFICATION_OUTCOMES:
                key = (sink, outcome)
                if key not in self._notifications:
                    self._notifications[key] = counter.labels(self.guard, sink, outcome)

    def notification(self, sink: str, outcome: str) -> None:
        """Count one notification to `sink` that was sent, retried or dropped."""
        try:
            child = self._notifications[sink, outcome]
        except KeyError:
            if outcome not in NOTIFICATION_OUTCOMES:
                raise ValueError(
                    f"unknown notification outcome {outcome!r}: "
                    f"expected one of {NOTIFICATION_OUTCOMES}"
                ) from None
            # Sinks come from the configuration, so they are bound on first use.
            self.declare_sinks((sink,))
            child = self._notifications[sink, outcome]
        child.inc()

    def storage_error(self, kind: str) -> None:
        """Count one failed write of the journal, state, outbox or lock."""
        _lookup(self._storage_errors, kind, "storage kind").inc()

    def loop_error(self, loop: str) -> None:
        """Count one unexpected exception caught in `loop` (e.g. `probe_green`)."""
        child = self._loop_errors.get(loop)
        if child is None:
            # Loops other than the probe loops are bound on first use.
            child = self._loop_errors[loop] = self._loop_errors_family.labels(self.guard, loop)
        child.inc()

    def set_verdicts(self, verdicts: Mapping[types.Color, Verdict]) -> None:
        """`set_rules` from the verdict on each color; the very verdicts shown last time
        (the machine gives them again while nothing changed) change nothing."""
        shown = tuple(verdicts.items())
        last = self._verdicts
        if (
            last is not None
            and len(last) == len(shown)
            and all(c == lc and v is lv for (c, v), (lc, lv) in zip(shown, last, strict=True))
        ):
            return  # the very same objects (comparing values would cost more than setting)
        self.set_rules((st.rule, color, st.state) for color, v in shown for st in v.states)
        self._verdicts = shown

    def set_rules(self, states: Iterable[tuple[str, str, str]]) -> None:
        """Publish each rule's state on each color: (rule, color, state) with state `ok`,
        `pending`, `firing` or `inconclusive`. Series of rules no longer given (a reload
        removed them) are dropped, so that a rule that is gone does not seem to fire."""
        self._verdicts = None
        shown = self._rules
        seen: dict[tuple[str, str], tuple[Gauge, Gauge, str]] = {}
        for rule, color, state in states:
            key = (rule, color)
            entry = seen.get(key) or shown.get(key)
            if entry is None:
                # Bound once; a tick then sets a gauge only when the rule's state changed.
                entry = (
                    self._rule_firing.labels(self.guard, rule, color),
                    self._rule_inconclusive.labels(self.guard, rule, color),
                    "",
                )
            if entry[2] != state:
                entry[0].set(state == "firing")
                entry[1].set(state == "inconclusive")
                entry = (entry[0], entry[1], state)
            seen[key] = entry
        for rule, color in shown.keys() - seen.keys():
            self._rule_firing.remove(self.guard, rule, color)
            self._rule_inconclusive.remove(self.guard, rule, color)
        self._rules = seen

    def watch_traffic(self, sources: Callable[[], Iterable[TrafficSource]]) -> None:
        """Read the `guardd_traffic_*` series from `sources()` at each scrape."""
        self._traffic.sources = sources

    def decision_tick(self) -> None:
        """Count one round of the decision loop, so a stalled loop shows."""
        self._ticks.inc()

    def render(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _lookup(children: dict[str, _Child], key: str, what: str) -> _Child:
    """Return the child bound to `key`, or say which keys the contract allows."""
    try:
        return children[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}: expected one of {tuple(children)}") from None


class _GuardLabelled:
    """A collector that adds `guard` to the samples of one that knows nothing of guards."""

    def __init__(self, collector: Collector, guard: str) -> None:
        self._collector = collector
        self._guard = guard

    def collect(self) -> Iterable[Metric]:
        """Yield the wrapped collector's families with the guard label added."""
        for family in self._collector.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, "guard": self._guard})
                for sample in family.samples
            ]
            yield labelled


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into a host and a port; an empty host means all."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{listen!r}: expected host:port, e.g. 127.0.0.1:9105 or [::1]:9105")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{listen!r}: put an IPv6 address in brackets, e.g. [::1]:9105")
    return host or "0.0.0.0", int(port_text)  # noqa: S104 - ":9105" asks for all  # nosec B104


class _MetricsHandler(BaseHTTPRequestHandler):
    """Answers GET /metrics with the registry, and 404 to anything else."""

    server: _MetricsHTTPServer
    # A client that stops talking must not pin a thread for ever.
    timeout = 30

    def do_GET(self) -> None:
        """Serve the exposition in the format the scraper asked for."""
        if urlsplit(self.path).path != "/metrics":
            self._reply(HTTPStatus.NOT_FOUND, b"not found; try /metrics\n", "text/plain")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            self._reply(HTTPStatus.OK, gzip.compress(body), content_type, gzipped=True)
        else:
            self._reply(HTTPStatus.OK, body, content_type)

    def _reply(
        self, status: HTTPStatus, body: bytes, content_type: str, *, gzipped: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        """Stay quiet: a scrape every few seconds is not news, and stderr is the daemon's log."""


_ACCEPT_WAIT_S = 1.0


def _serve(httpd: _MetricsHTTPServer, wake: socket.socket) -> None:
    """Serve scrapes until `wake` is readable; each scrape in its own thread."""
    with selectors.DefaultSelector() as selector:
        selector.register(httpd, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        while True:
            ready = {key.fileobj for key, _ in selector.select()}
            if wake in ready:
                return
            httpd.handle_request()


class _MetricsHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one registry, IPv4 or IPv6."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self.registry = registry
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        super().__init__((str(sockaddr[0]), address[1]), _MetricsHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        """A scraper that resets or drops its connection is not news; anything else is
        a bug, printed as socketserver does (stderr is the daemon's log)."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup, which can hang on a broken resolver."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class MetricsServer:
    """Serves GET /metrics of a registry from a daemon thread, off the asyncio loop.

    The thread sleeps until a scrape connects or `close` wakes it: socketserver's
    `serve_forever` wakes every poll interval to look for a shutdown, and every
    wake-up of an idle daemon takes the interpreter's lock from the guard's loop
    (fifty instances on a host add up).
    """

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self.registry = registry
        self._httpd: _MetricsHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    @property
    def port(self) -> int:
        """The bound port: the configured one, or the one picked for port 0."""
        if self._httpd is None:
            return self._requested_port
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Bind and start serving; raises OSError if the address is taken."""
        if self._httpd is not None:
            raise RuntimeError("metrics server already started")
        self._httpd = httpd = _MetricsHTTPServer((self.host, self._requested_port), self.registry)
        # `handle_request` waits this long for the connection it was woken for: one
        # gone before it is accepted must not hold the thread (and `close`) forever.
        httpd.timeout = _ACCEPT_WAIT_S
        self._wake = wake = socket.socketpair()
        self._thread = threading.Thread(
            target=_serve, args=(httpd, wake[0]), name=f"guardd-metrics-{self.listen}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the socket; safe to call twice."""
        httpd, thread, wake = self._httpd, self._thread, self._wake
        self._httpd = self._thread = self._wake = None
        if httpd is None:
            return
        if wake is not None:
            wake[1].send(b"\0")
        if thread is not None:
            thread.join()
        httpd.server_close()
        if wake is not None:
            for end in wake:
                end.close()

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
