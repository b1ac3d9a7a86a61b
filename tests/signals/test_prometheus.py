"""The prometheus signal: its answers parsed, hostile servers bounded, a real Prometheus read.

The pure parts (the query template, the answer's parsing, the reading) are tested without
I/O; hostile answers come from a fake Prometheus over real HTTP on loopback; the values
come from Debian's real `prometheus` scraping two real app processes, one Prometheus for
the whole module.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from guardd import config
from guardd.clock import SystemClock
from guardd.exceptions import ConfigError
from guardd.render import render_status
from guardd.signals import build
from guardd.signals.prometheus import (
    MAX_ANSWER_BYTES,
    OUTCOMES,
    PrometheusSignal,
    PrometheusSpec,
    QueryFailed,
    parse_answer,
)
from tests.harness.app_metrics import MetricsApp
from tests.harness.fake_prometheus import FakePrometheus
from tests.harness.prometheus import PrometheusServer
from tests.signals.access_log_lib import FixedClock, until

pytestmark = pytest.mark.anyio

RATIO = (
    'sum(rate(http_requests_total{color="{color}",code=~"5.."}[10s]))'
    ' / sum(rate(http_requests_total{color="{color}"}[10s]))'
)


def spec(url: str = "http://127.0.0.1:9", query: str = RATIO, **kw: Any) -> PrometheusSpec:
    return PrometheusSpec(url=url, query=query, instance=kw.pop("instance", "web"), **kw)


@asynccontextmanager
async def running(signal: PrometheusSignal) -> AsyncIterator[PrometheusSignal]:
    """The signal, started and querying; cancelled on exit."""
    async with anyio.create_task_group() as tg:
        await tg.start(signal.run)
        yield signal
        tg.cancel_scope.cancel()


class _Tracked(httpx.AsyncByteStream):
    """A response body that says when it is closed."""

    def __init__(self, inner: httpx.AsyncByteStream, closed: Callable[[], None]) -> None:
        self.inner = inner
        self.closed = closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.closed()


class InFlight(httpx.AsyncBaseTransport):
    """httpx's own transport, counting the exchanges of each query open at once (from the
    request until its answer's body is closed, or the request is given up)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.open: Counter[str] = Counter()
        self.most = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        query = request.url.params["query"]
        self.open[query] += 1
        self.most = max(self.most, self.open[query])

        def closed() -> None:
            self.open[query] -= 1

        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            closed()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tracked(response.stream, closed),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def value(signal: PrometheusSignal, color: str) -> float | None:
    reading = signal.reading(color, signal.clock.monotonic())
    assert reading is not None
    return reading.stats["value"]


# ---- the template, the answer, the reading (no I/O) ---------------------------------------


def test_only_color_and_instance_are_replaced_promql_braces_stay() -> None:
    s = spec(query='sum(x{color="{color}",guard="{instance}",le="{le}"}) by (code) / {0}')
    assert s.query_for("green") == 'sum(x{color="green",guard="web",le="{le}"}) by (code) / {0}'
    assert s.query_for("blue").count("{") == 3


def test_the_ratio_query_keeps_its_label_matchers() -> None:
    assert spec().query_for("green") == (
        'sum(rate(http_requests_total{color="green",code=~"5.."}[10s]))'
        ' / sum(rate(http_requests_total{color="green"}[10s]))'
    )


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"url": "ftp://x"}, "url: must be an http"),
        ({"url": "http://"}, "url:"),
        ({"query": "  "}, "query: must not be empty"),
        ({"every": 0}, "every: must be a positive"),
        ({"timeout": math.inf}, "timeout: must be a positive"),
    ],
)
def test_a_spec_says_which_key_is_wrong(kw: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match="^" + error):
        spec(**kw)


def answer(kind: str, result: Any, status: str = "success") -> bytes:
    return json.dumps({"status": status, "data": {"resultType": kind, "result": result}}).encode()


def series(labels: dict[str, str], v: str) -> dict[str, Any]:
    return {"metric": labels, "value": [1_800_000_000.123, v]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (answer("vector", [series({"color": "green"}, "0.3")]), 0.3),
        (answer("vector", [series({}, "0")]), 0.0),
        (answer("vector", [series({}, "-2.5e-3")]), -0.0025),
        (answer("scalar", [1_800_000_000, "17"]), 17.0),
    ],
)
def test_one_sample_is_the_value(body: bytes, expected: float) -> None:
    assert parse_answer(body) == expected


@pytest.mark.parametrize(
    ("body", "outcome", "says"),
    [
        (answer("vector", []), "empty", "no series"),
        (answer("vector", [series({}, "NaN")]), "nan", "NaN"),
        (answer("vector", [series({}, "+Inf")]), "nan", "+Inf"),
        (answer("scalar", [1, "-Inf"]), "nan", "-Inf"),
        (answer("matrix", [{"metric": {}, "values": [[1, "1"]]}]), "invalid", "matrix"),
        (answer("string", [1, "x"]), "invalid", "string"),
        (answer("vector", [series({}, "x1")]), "invalid", "not a number"),
        (answer("vector", [{"metric": {}, "value": [1, 2]}]), "invalid", "not [timestamp"),
        (answer("vector", {"a": 1}), "invalid", "not a list"),
        (answer("vector", ["x"]), "invalid", "not an object"),
        (b"<html>502</html>", "invalid", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid", "not JSON"),
        (b"[1]", "invalid", "not a JSON object"),
        (b'{"status":"success"}', "invalid", "neither success nor error"),
        (
            b'{"status":"error","errorType":"bad_data","error":"1:14: parse error: unclosed"}',
            "promql",
            "Prometheus refused the query: bad_data: 1:14: parse error: unclosed",
        ),
    ],
)
def test_answers_without_one_value(body: bytes, outcome: str, says: str) -> None:
    with pytest.raises(QueryFailed) as caught:
        parse_answer(body)
    assert caught.value.outcome == outcome
    assert says in caught.value.why


def test_several_series_name_the_labels_of_the_first_few() -> None:
    many = [series({"code": str(c), "color": "green"}, "1") for c in (200, 500, 503, 504)]
    with pytest.raises(QueryFailed) as caught:
        parse_answer(answer("vector", many))
    assert caught.value.outcome == "many"
    why = caught.value.why
    assert why.startswith("4 series where one is expected: ")
    assert '{code="200",color="green"}, {code="500",color="green"}' in why
    assert '{code="503",color="green"}, ...' in why
    assert "504" not in why


def test_a_long_problem_is_cut_short() -> None:
    many = [series({"pod": "p" * 500}, "1")] * 2
    with pytest.raises(QueryFailed) as caught:
        parse_answer(answer("vector", many))
    assert len(caught.value.why) <= 200


def test_before_any_answer_the_reading_is_inconclusive_and_dates_from_the_start() -> None:
    clock = FixedClock(mono=500.0)
    signal = PrometheusSignal("app_5xx", spec(), clock)
    clock.mono = 900.0
    reading = signal.reading("green", 900.0)
    assert reading is not None
    assert reading.samples == 0
    assert reading.stats == {"value": None}
    assert reading.last_at == 500.0
    assert reading.window_s == 10.0
    assert reading.detail["query"] == spec().query_for("green")
    assert signal.reading("purple", 900.0) is None
    assert signal.problem is None
    assert signal.status()["queries"] == dict.fromkeys(OUTCOMES, 0)


def test_credentials_in_the_url_never_reach_the_status() -> None:
    signal = PrometheusSignal("p", spec(url="http://guardd:s3cr3t-pass@prom:9090"), FixedClock())
    shown = json.dumps(signal.status())
    assert "s3cr3t-pass" not in shown
    assert "prom:9090" in shown


def _config(tmp_path: Path, rule: str) -> config.Settings:
    path = tmp_path / "g.toml"
    path.write_text(
        '[upstreams.blue]\nurl = "http://127.0.0.1:9009/healthz"\n'
        '[upstreams.green]\nurl = "http://127.0.0.1:9010/healthz"\n'
        '[switch]\nkind = "state-file"\npath = "/tmp/deploy-state.json"\n'
        '[signals.app_5xx]\nkind = "prometheus"\nurl = "http://127.0.0.1:9090"\n'
        f"query = {json.dumps(RATIO)}\n"
        f'[[rules]]\nsignal = "app_5xx"\nstat = "value"\nabove = 0.2\nseverity = "P0"\n{rule}'
    )
    return config.load(path)


def test_a_rule_over_a_prometheus_signal_needs_its_one_sample(tmp_path: Path) -> None:
    rules = _config(tmp_path, "").config.policy_spec().rules
    assert [(r.signal, r.min_samples) for r in rules] == [("app_5xx", 1)]
    with pytest.raises(
        ConfigError, match=r"g\.toml: rules\[0\]\.min_samples: a prometheus signal gives one"
    ):
        _config(tmp_path, "min_samples = 5\n")


def test_build_substitutes_the_guard_s_instance(tmp_path: Path) -> None:
    settings = _config(tmp_path, "")
    table = settings.config.signals["app_5xx"]
    table = table.model_copy(update={"query": 'up{guard="{instance}",color="{color}"}'})
    signal, problems = build(
        "app_5xx",
        table,
        window_s=30,
        targets=None,
        probe_urls={},
        clock=FixedClock(),
        instance="threader",
    )
    assert problems == []
    assert isinstance(signal, PrometheusSignal)
    assert signal.colors["blue"].query == 'up{guard="threader",color="blue"}'


# ---- a fake Prometheus over real HTTP: hostile answers ------------------------------------


@pytest.fixture
def fake() -> Iterator[FakePrometheus]:
    with FakePrometheus() as server:
        yield server


async def test_each_color_is_asked_its_own_query_and_gets_its_value(fake: FakePrometheus) -> None:
    fake.set_mode("value", value=0.25)
    signal = PrometheusSignal("app_5xx", spec(fake.url, every=0.1, timeout=2), SystemClock())
    async with running(signal):
        await until(lambda: signal.queries["ok"] >= 4, "answers", show=signal.status)
        for color in ("blue", "green"):
            reading = signal.reading(color, signal.clock.monotonic())
            assert reading is not None
            assert reading.samples == 1
            assert reading.stats == {"value": 0.25}
            assert reading.window_s == 0.1
            assert reading.detail == {"query": spec().query_for(color), "value": 0.25}
        assert signal.problem is None
        doc = {**signal.status(), "stale": False}
        for color in ("blue", "green"):
            reading = signal.reading(color, signal.clock.monotonic())
            assert reading is not None
            doc[color] = {"samples": reading.samples, "window_s": 0.1, **reading.stats}
        text = render_status({"signals": {"app_5xx": doc}})
        assert "signal app_5xx (prometheus): querying every 0.1s" in text
        assert "  green value 0.25 (1 samples)" in text
        assert "req/s" not in text
    assert spec().query_for("blue") in fake.queries
    assert spec().query_for("green") in fake.queries


HOSTILE = [
    ("series", {"n": 3}, "many", '3 series where one is expected: {job="app",series="0"}'),
    ("huge", {}, "too_large", f"longer than {MAX_ANSWER_BYTES} bytes"),
    ("hang", {}, "timeout", "no answer within 0.5s"),
    ("dribble", {}, "timeout", "no answer within 0.5s"),
    ("invalid", {}, "invalid", "not JSON"),
    ("gzip", {}, "invalid", "gzip answer, not asked for"),
    ("matrix", {}, "invalid", "a matrix, not a vector or a scalar"),
    ("http", {}, "http", "HTTP 502"),
    ("error", {"error": "1:5: parse error"}, "promql", "bad_data: 1:5: parse error"),
]


@pytest.mark.parametrize(("mode", "params", "outcome", "says"), HOSTILE)
async def test_a_hostile_answer_is_bounded_inconclusive_counted_and_the_problem(
    fake: FakePrometheus, mode: str, params: dict[str, Any], outcome: str, says: str
) -> None:
    fake.set_mode("value", value=0.1)
    flights = InFlight()
    signal = PrometheusSignal(
        "app_5xx", spec(fake.url, every=0.1, timeout=0.5), SystemClock(), transport=flights
    )
    async with running(signal):
        await until(lambda: value(signal, "green") == 0.1, "a first value", show=signal.status)
        fake.set_mode(mode, **params)
        # Twice per color: counted every time, and the reading stays inconclusive.
        await until(lambda: signal.queries[outcome] >= 4, outcome, show=signal.status)
        for color in ("blue", "green"):
            reading = signal.reading(color, signal.clock.monotonic())
            assert reading is not None
            assert (reading.samples, reading.stats) == (0, {"value": None})
        assert signal.problem is not None and says in signal.problem
        status = signal.status()
        assert status["problem"] == signal.problem
        assert status["last"]["green"]["outcome"] == outcome
        assert says in status["last"]["green"]["error"]
        # The source mends: the signal reads again, the problem is gone.
        fake.set_mode("value", value=0.2)
        await until(lambda: value(signal, "green") == 0.2, "a value again", show=signal.status)
        await until(lambda: value(signal, "blue") == 0.2, "blue's value again")
        assert signal.status()["problem"] is None
    # At most one query in flight per color, even when Prometheus hangs.
    assert flights.most == 1 and not +flights.open
    if mode == "huge":
        # The body was not read past the bound (what the kernel's buffers held aside).
        assert fake.bytes_sent < 32 * MAX_ANSWER_BYTES


async def test_one_color_s_hanging_query_does_not_hold_up_the_other(
    fake: FakePrometheus,
) -> None:
    fake.set_mode("hang", only='color="green"')
    flights = InFlight()
    signal = PrometheusSignal(
        "app_5xx", spec(fake.url, every=0.1, timeout=0.5), SystemClock(), transport=flights
    )
    async with running(signal):
        await until(lambda: signal.queries["timeout"] >= 3, "green's timeouts", show=signal.status)
        # Blue was answered round after round meanwhile (every 0.1 s against green's 0.5 s
        # timeouts): had it waited behind green, it would have as many answers as green
        # has timeouts.
        assert signal.queries["ok"] >= 2 * signal.queries["timeout"]
        assert value(signal, "blue") == 0.5
        assert value(signal, "green") is None
        assert signal.problem == "green: no answer within 0.5s"
    assert flights.most == 1


@pytest.mark.parametrize(
    ("mode", "params", "outcome"),
    [("empty", {}, "empty"), ("nan", {"value": "NaN"}, "nan"), ("nan", {"value": "+Inf"}, "nan")],
)
async def test_no_value_is_inconclusive_without_a_problem(
    fake: FakePrometheus, mode: str, params: dict[str, Any], outcome: str
) -> None:
    fake.set_mode(mode, **params)
    signal = PrometheusSignal("app_5xx", spec(fake.url, every=0.1, timeout=2), SystemClock())
    async with running(signal):
        await until(lambda: signal.queries[outcome] >= 4, outcome, show=signal.status)
        assert value(signal, "green") is None
        assert signal.problem is None  # the query ran and said there is no value
        assert signal.queries["ok"] == 0


async def test_a_dead_prometheus_is_unreachable_and_the_problem() -> None:
    with FakePrometheus() as gone:
        url = gone.url
    signal = PrometheusSignal("app_5xx", spec(url, every=0.1, timeout=1), SystemClock())
    async with running(signal):
        await until(lambda: signal.queries["unreachable"] >= 4, "refusals", show=signal.status)
        assert value(signal, "blue") is None
        assert signal.problem is not None and "ConnectError" in signal.problem


# ---- Debian's real Prometheus, scraping two real app processes -----------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrometheusServer, Any]]:
    """Blue and green apps (green answering 30 % 5xx), scraped every second by one
    Prometheus shared by this module's tests."""
    with MetricsApp("blue") as blue, MetricsApp("green") as green:
        green.set_error_share(0.3)
        prom_dir = tmp_path_factory.mktemp("prom")
        with PrometheusServer([blue.target, green.target], prom_dir) as prom:
            prom.wait_for_query(
                "count(rate(http_requests_total[10s])) == 4", lambda r: len(r) == 1, 60
            )
            yield prom, {"blue": blue, "green": green}


async def test_real_prometheus_gives_each_color_its_own_error_ratio(
    lab: tuple[PrometheusServer, Any],
) -> None:
    prom, _ = lab
    signal = PrometheusSignal("app_5xx", spec(prom.url, every=0.5, timeout=5), SystemClock())
    async with running(signal):
        await until(
            lambda: value(signal, "blue") is not None and value(signal, "green") is not None,
            "both colors' values",
            within=30,
            show=signal.status,
        )
        assert value(signal, "blue") == 0.0
        green = signal.reading("green", signal.clock.monotonic())
        assert green is not None and green.stats["value"] is not None
        assert green.stats["value"] == pytest.approx(0.3, abs=0.01)
        assert green.detail["query"] == spec().query_for("green")
        assert green.samples == 1
        assert signal.problem is None


@pytest.mark.parametrize(
    ("query", "outcome", "says"),
    [
        (
            'http_requests_total{color="{color}"}',
            "many",
            '2 series where one is expected: http_requests_total{code="200",color="',
        ),
        ('http_requests_total{color="{color}",code="404"}', "empty", None),
        ('sum(http_requests_total{color="{color}",code="404"}) / 0', "empty", None),
        ("0 * scalar(up) / 0", "nan", None),
        ('sum(rate(http_requests_total{color="{color}"}[10s]) /', "promql", "bad_data: "),
    ],
)
async def test_real_prometheus_refusals_and_non_values(
    lab: tuple[PrometheusServer, Any], query: str, outcome: str, says: str | None
) -> None:
    prom, _ = lab
    signal = PrometheusSignal("q", spec(prom.url, query, every=0.2, timeout=5), SystemClock())
    async with running(signal):
        await until(lambda: signal.queries[outcome] >= 2, outcome, show=signal.status)
        assert value(signal, "green") is None
        if says is None:
            assert signal.problem is None
        else:
            assert signal.problem is not None and says in signal.problem


async def test_prometheus_down_then_back(lab: tuple[PrometheusServer, Any]) -> None:
    prom, _ = lab
    signal = PrometheusSignal("app_5xx", spec(prom.url, every=0.2, timeout=2), SystemClock())
    async with running(signal):
        await until(lambda: value(signal, "green") is not None, "a value", within=30)
        first_at = signal.reading("green", signal.clock.monotonic())
        assert first_at is not None
        prom.stop()
        try:
            await until(lambda: value(signal, "green") is None, "no value", within=30)
            await until(lambda: signal.problem is not None, "the problem", within=30)
            stopped = signal.reading("green", signal.clock.monotonic())
            assert stopped is not None and stopped.samples == 0
            # Staleness counts from the last value, not from the last failed query.
            assert stopped.last_at is not None and stopped.last_at <= signal.clock.monotonic()
            before = signal.queries["unreachable"]
            await until(lambda: signal.queries["unreachable"] >= before + 4, "more refusals")
        finally:
            await anyio.to_thread.run_sync(prom.restart)
        await until(
            lambda: value(signal, "green") is not None and signal.problem is None,
            "values again",
            within=30,
            show=signal.status,
        )
        back = signal.reading("green", signal.clock.monotonic())
        assert back is not None and back.last_at is not None and stopped.last_at is not None
        assert back.last_at > stopped.last_at
