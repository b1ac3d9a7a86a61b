"""The sample payloads of the polled signals: what `on_sample` emits, `apply_sample` reads.

A live adapter asks a real server (a fake Prometheus, a real `/metrics` exporter, over real
HTTP on loopback) through good answers, failures and recoveries; every payload it emits
goes through JSON (as the recorder writes it) into a fresh adapter at the same monotonic
time. After every step both adapters must read alike: the same `reading()` now and later,
the same status, so replay sees a failed query as the gap it was, never a healthy value.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from guardd.signals.prometheus import PrometheusSignal, PrometheusSpec
from guardd.signals.scrape import ScrapeSignal, ScrapeSpec
from tests.harness.exporter import Exporter, free_port
from tests.harness.fake_prometheus import FakePrometheus
from tests.signals.access_log_lib import FixedClock

pytestmark = pytest.mark.anyio

FAILED = 'agent_runs_total{result="failed"}'
RUNS = "agent_runs_total"


class Tape:
    """The payloads an adapter emitted, each with the adapter's monotonic time."""

    def __init__(self, clock: FixedClock) -> None:
        self.clock = clock
        self.samples: list[tuple[str, dict[str, Any], float]] = []

    def __call__(self, color: str, data: dict[str, Any]) -> None:
        # Through JSON, as the recorder writes it and replay reads it back.
        self.samples.append((color, json.loads(json.dumps(data)), self.clock.mono))


def _alike(live: Any, replica: Any, colors: tuple[str, ...], horizons: tuple[float, ...]) -> None:
    for color in colors:
        for later in horizons:
            now = live.clock.monotonic() + later
            assert replica.reading(color, now) == live.reading(color, now), (color, later)
    assert replica.status() == live.status()
    assert replica.problem == live.problem


# ---- prometheus ------------------------------------------------------------------------

PROM_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("value", {"value": 0.25}),
    ("value", {"value": 0.5}),
    ("empty", {}),
    ("value", {"value": 0.125}),
    ("nan", {"value": "NaN"}),
    ("http", {}),
    ("error", {"error": "1:5: parse error"}),
    ("value", {"value": 0.75}),
    ("invalid", {}),
    ("series", {"n": 3}),
    ("hang", {}),
    ("value", {"value": 0.0}),
    ("value", {"value": 0.0, "only": 'color="blue"'}),
    ("hang", {"only": 'color="green"'}),
]


async def test_prometheus_samples_replay_to_the_same_readings() -> None:
    every, timeout = 1.0, 0.3
    live_clock, replica_clock = FixedClock(), FixedClock()
    with FakePrometheus() as fake:
        spec = PrometheusSpec(
            url=fake.url, query='up{color="{color}"}', instance="web", every=every, timeout=timeout
        )
        live = PrometheusSignal("q", spec, live_clock)
        replica = PrometheusSignal("q", spec, replica_clock)
        tape = Tape(live_clock)
        live.on_sample = tape
        outcomes: set[str] = set()
        async with httpx.AsyncClient(headers={"Accept-Encoding": "identity"}) as client:
            for mode, params in PROM_STEPS:
                fake.set_mode(mode, **params)
                for color, state in live.colors.items():
                    live_clock.mono += every
                    replica_clock.mono = live_clock.mono
                    before = len(tape.samples)
                    await live.query_once(client, state)
                    assert len(tape.samples) == before + 1, "one payload per query"
                    c, data, at = tape.samples[-1]
                    assert c == color and at == live_clock.mono
                    outcomes.add(data["outcome"])
                    replica.apply_sample(c, data, at)
                    _alike(live, replica, ("blue", "green"), (0.0, 0.5, 2.5, 10.0))
    # Prometheus gone: unreachable, and the reading is a gap in the replica as well.
    for state in live.colors.values():
        async with httpx.AsyncClient() as client:
            live_clock.mono += every
            replica_clock.mono = live_clock.mono
            await live.query_once(client, state)
        replica.apply_sample(*tape.samples[-1])
    _alike(live, replica, ("blue", "green"), (0.0, 1.0))
    outcomes.add(tape.samples[-1][1]["outcome"])
    assert outcomes == {
        "ok", "empty", "nan", "http", "promql", "invalid", "many", "timeout", "unreachable"
    }  # fmt: skip
    reading = replica.reading("green", replica_clock.mono)
    assert reading is not None and reading.stats == {"value": None}
    assert replica.queries == live.queries
    assert replica.problem is not None
    # What each failed payload says is the adapter's own (redacted, short) problem text.
    assert {"outcome": "http", "error": "HTTP 502"} in [d for _, d, _ in tape.samples]


def test_a_prometheus_payload_that_is_not_one_is_refused() -> None:
    spec = PrometheusSpec(url="http://127.0.0.1:9", query="up", instance="web")
    sig = PrometheusSignal("q", spec, FixedClock())
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "outcome: "),
        ({"outcome": "sure"}, "outcome: 'sure'"),
        ({"outcome": "ok"}, "value: "),
        ({"outcome": "ok", "value": True}, "value: "),
        ({"outcome": "ok", "value": float("nan")}, "value: "),
        ({"outcome": "timeout", "error": 3}, "error: "),
    ]
    for data, says in cases:
        with pytest.raises(ValueError, match=says):
            sig.apply_sample("green", data, 1001.0)
    assert sig.queries == dict.fromkeys(sig.queries, 0), "nothing refused was counted"
    sig.apply_sample("purple", {"outcome": "ok", "value": 1.0}, 1001.0)  # not a color it asks
    assert sig.queries["ok"] == 0


# ---- scrape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [{"ratio": (FAILED, RUNS)}, {"value": 'app_queue_depth{queue=~"a|b"}'}],
    ids=["ratio", "value"],
)
async def test_scrape_samples_replay_to_the_same_readings(kind: dict[str, Any]) -> None:
    live_clock, replica_clock = FixedClock(), FixedClock()
    with Exporter() as blue, Exporter() as green:
        blue.runs_per_scrape(ok=5, failed=0)
        green.runs_per_scrape(ok=3, failed=1)
        spec = ScrapeSpec(
            urls={"blue": blue.url, "green": green.url},
            every_s=1.0,
            timeout_s=0.3,
            window_s=5.0,
            **kind,
        )
        live = ScrapeSignal("runs", spec, live_clock)
        replica = ScrapeSignal("runs", spec, replica_clock)
        tape = Tape(live_clock)
        live.on_sample = tape

        def step_green(*, restart: bool = False, mode: Any = "ok") -> None:
            if restart:
                green.restart()
            green.set_mode(mode)

        plan: list[dict[str, Any]] = [
            *[{}] * 4,
            {"mode": "invalid"},
            {"mode": "http_500"},
            *[{}] * 3,
            {"restart": True},
            *[{}] * 7,  # longer than the window: old scrapes leave it
            {"mode": "hang"},
        ]
        outcomes: set[str] = set()
        async with httpx.AsyncClient(headers={"Accept-Encoding": "identity"}) as client:
            for change in plan:
                step_green(**change)
                for color in ("blue", "green"):
                    live_clock.mono += 1.0
                    replica_clock.mono = live_clock.mono
                    await live.scrape_once(client, color)
                    c, data, at = tape.samples[-1]
                    assert c == color and at == live_clock.mono
                    outcomes.add(data["outcome"])
                    replica.apply_sample(c, data, at)
                    _alike(live, replica, ("blue", "green"), (0.0, 2.0, 6.0))
            green.set_mode("ok")
    assert outcomes == {"ok", "invalid", "http", "timeout"}
    assert len(tape.samples) == 2 * len(plan)
    # The payload holds numbers per selector, not the exposition.
    assert max(len(json.dumps(d)) for _, d, _ in tape.samples) < 300
    assert replica.errors == live.errors
    green_now = replica.reading("green", replica_clock.mono)
    assert green_now is not None and green_now.stats == {"value": None}, "a gap, not healthy"


async def test_a_refused_scrape_is_recorded_as_a_gap() -> None:
    clock = FixedClock()
    url = f"http://127.0.0.1:{free_port()}/metrics"
    spec = ScrapeSpec(urls={"green": url}, value="app_queue_depth", every_s=1.0)
    live, replica = ScrapeSignal("q", spec, clock), ScrapeSignal("q", spec, FixedClock())
    tape = Tape(clock)
    live.on_sample = tape
    replica.apply_sample("green", {"outcome": "ok", "steps": [0.0], "sums": [7.0]}, 999.0)
    async with httpx.AsyncClient() as client:
        await live.scrape_once(client, "green")
    color, data, at = tape.samples[0]
    assert data["outcome"] == "connect" and data["error"].startswith("connect: ")
    replica.apply_sample(color, data, at)
    reading = replica.reading("green", at)
    assert reading is not None and reading.stats == {"value": None}
    assert replica.problem == live.problem is not None


def test_a_scrape_payload_that_is_not_one_is_refused() -> None:
    spec = ScrapeSpec(urls={"green": "http://127.0.0.1:9/metrics"}, ratio=(FAILED, RUNS))
    sig = ScrapeSignal("runs", spec, FixedClock())
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "outcome: "),
        ({"outcome": "ok", "steps": [1.0], "sums": [1.0, 2.0]}, "steps: must be 2"),
        ({"outcome": "ok", "steps": [1.0, "x"], "sums": [1.0, 2.0]}, "steps: "),
        ({"outcome": "ok", "steps": [1.0, 2.0], "sums": [1.0]}, "sums: must be 2"),
        ({"outcome": "ok", "steps": [1.0, 2.0], "sums": [True, None]}, "sums: "),
        ({"outcome": "timeout"}, "error: "),
        ({"outcome": "weird", "error": "x"}, "outcome: 'weird'"),
    ]
    for data, says in cases:
        with pytest.raises(ValueError, match=says):
            sig.apply_sample("green", data, 1001.0)
    assert sig.colors["green"].scrapes == 0 and sig.errors == dict.fromkeys(sig.errors, 0)


async def test_credentials_never_reach_a_payload() -> None:
    password = "s3cr3t-pa55word"  # noqa: S105 - the secret the payload must not carry
    port = free_port()
    clock = FixedClock()
    prom = PrometheusSignal(
        "q",
        PrometheusSpec(url=f"http://user:{password}@127.0.0.1:{port}", query="up", instance="w"),
        clock,
    )
    scrape = ScrapeSignal(
        "s",
        ScrapeSpec(urls={"green": f"http://user:{password}@127.0.0.1:{port}/m"}, value="up"),
        clock,
    )
    tape = Tape(clock)
    prom.on_sample = scrape.on_sample = tape
    async with httpx.AsyncClient() as client:
        await prom.query_once(client, prom.colors["green"])
        await scrape.scrape_once(client, "green")
    assert [d["outcome"] for _, d, _ in tape.samples] == ["unreachable", "connect"]
    assert password not in json.dumps(tape.samples)
    # A payload read back from a history is redacted again before it is shown.
    prom.apply_sample("green", {"outcome": "unreachable", "error": f"pw {password}"}, 1.0)
    assert password not in json.dumps(prom.status())
