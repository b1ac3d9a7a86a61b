"""The `scrape` signal: selectors, counter increases across resets, real /metrics servers
on loopback (healthy, restarted, hostile), and a real daemon rolling back on a ratio."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guardd.clock import SystemClock
from guardd.signals.scrape import (
    MAX_SERIES,
    ScrapeSignal,
    ScrapeSpec,
    Series,
    increase,
    parse,
    parse_selector,
    select,
    shown_url,
)
from tests.harness.daemon import guardctl, lab, wait_until
from tests.harness.exporter import Exporter, ExporterMode, free_port
from tests.signals.access_log_lib import FixedClock, until

pytestmark = pytest.mark.anyio

FAILED = 'agent_runs_total{result="failed"}'
RUNS = "agent_runs_total"

# ---- selectors (no I/O) ---------------------------------------------------------------


def test_selector_name_and_matchers() -> None:
    s = parse_selector('agent_runs_total{result="failed", host!="a", job=~"ag.*", zone!~"eu-.*"}')
    assert s.name == "agent_runs_total"
    assert s.matches({"result": "failed", "host": "b", "job": "agent", "zone": "us-1"})
    assert not s.matches({"result": "ok", "host": "b", "job": "agent", "zone": "us-1"})
    assert not s.matches({"result": "failed", "host": "a", "job": "agent", "zone": "us-1"})
    assert not s.matches({"result": "failed", "host": "b", "job": "xagent", "zone": "us-1"})
    assert not s.matches({"result": "failed", "host": "b", "job": "agent", "zone": "eu-2"})
    # Regexes are anchored, as in PromQL; an absent label is the empty string.
    assert not parse_selector('m{job=~"ag"}').matches({"job": "agent"})
    assert parse_selector('m{job=""}').matches({})
    assert parse_selector("m").matches({"any": "thing"})
    assert parse_selector(" m { } ").name == "m"
    assert parse_selector('m{a="1",}').matches({"a": "1"})


def test_selector_escapes() -> None:
    s = parse_selector(r'm{path="a\"b\\c\nd"}')
    assert s.matches({"path": 'a"b\\c\nd'})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "does not start with a metric name"),
        ('{result="x"}', "does not start with a metric name"),
        ("9lives", "does not start with a metric name"),
        ('m{result="x"', "expected , or }"),
        ("m{result=x}", 'expected label="value"'),
        ('m{result=="x"}', 'expected label="value"'),
        ('m{a="1" b="2"}', "expected , or }"),
        ('m{a=~"("}', "is not a regular expression"),
        ('m{a="1"} extra', "unexpected 'extra'"),
        ("rate(m[5m])", "unexpected '(m[5m])'"),
    ],
)
def test_bad_selectors_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_selector(text)


def test_spec_names_the_bad_key() -> None:
    urls = {"green": "http://127.0.0.1:1/metrics"}
    with pytest.raises(ValueError, match=r"^ratio\.to: "):
        ScrapeSpec(urls=urls, ratio=(FAILED, "runs{"))
    with pytest.raises(ValueError, match=r"^value: "):
        ScrapeSpec(urls=urls, value="{}")
    with pytest.raises(ValueError, match=r"^ratio: give exactly one"):
        ScrapeSpec(urls=urls, ratio=(FAILED, RUNS), value="g")


def test_a_bad_selector_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        'instance = "x"\n'
        '[upstreams.blue]\nurl = "http://127.0.0.1:1/healthz"\n'
        '[upstreams.green]\nurl = "http://127.0.0.1:2/healthz"\n'
        f'[switch]\nkind = "state-file"\npath = "{tmp_path}/s"\n'
        '[signals.runs]\nkind = "scrape"\nurls = { green = "http://127.0.0.1:1/metrics" }\n'
        "ratio = { of = 'm{a=x}', to = 'agent_runs_total' }\n"
        '[signals.depth]\nkind = "scrape"\nurls = { green = "http://127.0.0.1:1/metrics" }\n'
        'value = "rate(m[5m])"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "guardd.cli", "check-config", "--offline", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert f"{path}: signals.runs." in out.stderr
    assert """ratio.of: 'm{a=x}': expected label="value" at 'a=x}'""" in out.stderr
    assert "value: 'rate(m[5m])': unexpected '(m[5m])' after the selector" in out.stderr


def test_status_never_shows_basic_auth_credentials() -> None:
    url = "http://agent:hunter2-pass@127.0.0.1:9100/metrics"
    sig = ScrapeSignal("runs", ScrapeSpec(urls={"green": url}, value="m"), FixedClock())
    assert sig.status()["urls"] == {"green": "http://***@127.0.0.1:9100/metrics"}
    assert "hunter2" not in json.dumps(sig.status())
    assert shown_url("https://h:1/metrics?x=1") == "https://h:1/metrics?x=1"


TEXT = """\
# HELP agent_runs_total Agent runs.
# TYPE agent_runs_total counter
agent_runs_total{result="ok"} 30
agent_runs_total{result="failed"} 10
agent_runs_created{result="ok"} 1.7e9
# TYPE queue_depth gauge
queue_depth{q="a"} 3
queue_depth{q="b"} 4
"""


def _sums(text: str, *selectors: str) -> list[float]:
    found = select(text_string_to_metric_families(text), tuple(map(parse_selector, selectors)))
    return [sum(s.values()) for s in found]


def test_counters_are_found_with_or_without_total() -> None:
    assert _sums(TEXT, RUNS, "agent_runs", FAILED, 'agent_runs{result="failed"}') == [
        40,
        40,
        10,
        10,
    ]
    assert _sums(TEXT, "queue_depth", 'queue_depth{q="b"}', "absent") == [7, 4, 0]
    # An untyped exposition (no TYPE line) keeps the sample names: the same answers.
    untyped = "\n".join(line for line in TEXT.splitlines() if not line.startswith("#")) + "\n"
    assert _sums(untyped, RUNS, "agent_runs", FAILED) == [40, 40, 10]
    # A series literally named NAME wins over NAME_total (no double count).
    both = "m 1\nm_total 5\n"
    assert _sums(both, "m", "m_total") == [1, 5]


@pytest.mark.parametrize(
    "text",
    [
        "<html><body>Whitelabel Error Page</body></html>\n",
        "hello world\n",
        'm{a="1" 3\n',
        'm{a="1",a="2"} 1\n',
        "m one\n",
        '{"status": "UP"}\n',
    ],
)
def test_invalid_exposition_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any reason; the type is the contract
        parse(text, (parse_selector(RUNS),))


def test_too_many_matching_series_is_invalid() -> None:
    text = "".join(f'm{{n="{i}"}} 1\n' for i in range(MAX_SERIES + 1))
    with pytest.raises(ValueError, match="more than"):
        parse(text, (parse_selector("m"),))


# ---- increase() as Prometheus counts it (no I/O) ---------------------------------------

A = (("result", "ok"),)
B = (("result", "failed"),)


def test_increase_of_a_steady_counter() -> None:
    assert increase([{A: 10.0}, {A: 14.0}, {A: 20.0}]) == 10.0
    assert increase([{A: 10.0}]) == 0.0
    assert increase([]) == 0.0


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # A restart between two scrapes: the new value is the increase of that step.
        ([{A: 100.0}, {A: 104.0}, {A: 3.0}, {A: 7.0}], 4 + 3 + 4),
        # Reset to exactly 0: no increase on that step, never negative.
        ([{A: 100.0}, {A: 0.0}, {A: 2.0}], 2),
        # Two restarts in the window.
        ([{A: 5.0}, {A: 1.0}, {A: 6.0}, {A: 2.0}], 1 + 5 + 2),
        # Only one of two series restarts: the other's increase is untouched.
        ([{A: 100.0, B: 20.0}, {A: 104.0, B: 1.0}, {A: 108.0, B: 2.0}], 4 + 4 + 1 + 1),
        # A series born between two scrapes counts from 0; one that vanishes adds nothing.
        ([{A: 10.0}, {A: 12.0, B: 1.0}, {B: 3.0}], 2 + 1 + 2),
    ],
)
def test_increase_handles_resets_like_prometheus(samples: list[Series], expected: float) -> None:
    assert increase(samples) == expected
    assert increase(samples) >= 0


def _signal(window: float = 10.0, every: float = 1.0) -> tuple[ScrapeSignal, FixedClock]:
    clock = FixedClock(mono=1000.0)
    spec = ScrapeSpec(
        urls={"green": "http://127.0.0.1:1/metrics"},
        ratio=(FAILED, RUNS),
        every_s=every,
        window_s=window,
    )
    return ScrapeSignal("runs", spec, clock), clock


def _feed(sig: ScrapeSignal, clock: FixedClock, ok: float, failed: float) -> None:
    clock.mono += 1.0
    of: Series = {B: failed}
    to: Series = {A: ok, B: failed}
    sig.record("green", clock.mono, (of, to))


def test_ratio_across_a_restart_stays_right() -> None:
    sig, clock = _signal()
    ok = failed = 0.0
    values = []
    for i in range(30):
        if i == 12:
            ok = failed = 0.0  # the app restarted: both counters from 0
        ok, failed = ok + 3, failed + 1
        _feed(sig, clock, ok, failed)
        r = sig.reading("green", clock.mono)
        assert r is not None
        values.append(r.stats["value"])
    assert values[0] is None, "one scrape holds no increase"
    assert all(v == pytest.approx(0.25) for v in values[1:]), values


def test_no_runs_is_inconclusive_and_the_window_is_bounded() -> None:
    sig, clock = _signal(window=5.0)
    for _ in range(50):
        _feed(sig, clock, 10.0, 1.0)  # nothing ran
    r = sig.reading("green", clock.mono)
    assert r is not None
    assert r.stats == {"value": None}
    assert r.detail["to_increase"] == 0
    assert r.samples == 6, "the scrapes in 5 s, one a second, both ends included"
    assert len(sig.colors["green"].samples) <= math.ceil(5.0 / 1.0) + 2
    assert r.window_s == 5.0
    assert sig.reading("blue", clock.mono) is None, "blue has no URL"


def test_before_the_first_scrape_last_at_is_the_start() -> None:
    sig, clock = _signal()
    r = sig.reading("green", clock.mono + 30)
    assert r is not None
    assert r.samples == 0 and r.stats == {"value": None} and r.last_at == sig.started


# ---- real /metrics servers on loopback -------------------------------------------------


@asynccontextmanager
async def scraping(spec: ScrapeSpec) -> AsyncIterator[ScrapeSignal]:
    """The signal, started; cancelled on exit."""
    sig = ScrapeSignal("runs", spec, SystemClock())
    async with anyio.create_task_group() as tg:
        await tg.start(sig.run)
        yield sig
        tg.cancel_scope.cancel()


def _spec(urls: dict[str, str], **kw: Any) -> ScrapeSpec:
    args: dict[str, Any] = {"ratio": (FAILED, RUNS), "every_s": 0.1, "window_s": 3.0}
    args.update(kw)
    return ScrapeSpec(urls=urls, **args)


def _value(sig: ScrapeSignal, color: str) -> float | None:
    r = sig.reading(color, SystemClock().monotonic())
    assert r is not None
    return r.stats["value"]


@pytest.fixture
def exporters() -> Any:
    with Exporter() as blue, Exporter() as green:
        yield blue, green


async def test_ratio_of_failed_runs_from_a_real_exporter(exporters: tuple[Exporter, ...]) -> None:
    blue, green = exporters
    blue.runs_per_scrape(ok=5, failed=0)
    green.runs_per_scrape(ok=3, failed=1)
    async with scraping(_spec({"blue": blue.url, "green": green.url})) as sig:
        await until(lambda: sig.colors["green"].scrapes >= 5, "five scrapes of green")
        await until(lambda: sig.colors["blue"].scrapes >= 5, "five scrapes of blue")
        now = SystemClock().monotonic()
        g = sig.reading("green", now)
        b = sig.reading("blue", now)
        assert g is not None and b is not None
        assert g.stats["value"] == pytest.approx(0.25)
        assert b.stats["value"] == 0.0
        assert g.samples >= 5 and g.window_s == 3.0
        assert g.last_at is not None and g.last_at > sig.started
        assert g.detail["of"] == FAILED and g.detail["to"] == RUNS
        assert g.detail["to_increase"] > 0
        assert sig.problem is None
        assert sig.status()["errors"] == dict.fromkeys(sig.errors, 0)


async def test_a_gauge_value(exporters: tuple[Exporter, ...]) -> None:
    _, green = exporters
    spec = _spec({"green": green.url}, ratio=None, value='app_queue_depth{queue=~"a|b"}')
    async with scraping(spec) as sig:
        await until(lambda: sig.colors["green"].scrapes >= 1, "a scrape")
        assert _value(sig, "green") == 7
        r = sig.reading("green", SystemClock().monotonic())
        assert r is not None and r.detail == {"value_of": 'app_queue_depth{queue=~"a|b"}'}


async def test_a_restarted_exporter_is_neither_a_drop_nor_a_spike(
    exporters: tuple[Exporter, ...],
) -> None:
    _, green = exporters
    green.runs_per_scrape(ok=3, failed=1)
    green.ok, green.failed = 3000.0, 1000.0  # a long-running app
    async with scraping(_spec({"green": green.url})) as sig:
        await until(lambda: sig.colors["green"].scrapes >= 3, "three scrapes")
        seen: list[float | None] = []

        async def watch(n: int) -> None:
            target = sig.colors["green"].scrapes + n
            while sig.colors["green"].scrapes < target:
                seen.append(_value(sig, "green"))
                await anyio.sleep(0.01)

        await watch(5)
        for _ in range(3):  # three restarts, each back to 0
            green.restart()
            await watch(5)
        assert seen and all(v == pytest.approx(0.25) for v in seen), seen
        assert sig.problem is None


# ---- hostile /metrics ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["huge", "huge_declared"])
async def test_a_50mb_exposition_is_abandoned(exporters: tuple[Exporter, ...], mode: Any) -> None:
    blue, green = exporters
    blue.runs_per_scrape(ok=1, failed=0)
    green.set_mode(mode)
    limit = 1024 * 1024
    async with scraping(_spec({"blue": blue.url, "green": green.url}, max_bytes=limit)) as sig:
        await until(lambda: sig.errors["oversize"] >= 3, "three oversize scrapes", within=60)
        assert _value(sig, "green") is None
        r = sig.reading("green", SystemClock().monotonic())
        assert r is not None and r.detail["last_error"].startswith("oversize: ")
        assert sig.problem is not None and "green: oversize" in sig.problem
        # Bounded memory: never much more than max_bytes held; the rest never read.
        assert sig.max_held <= limit + 1024 * 1024
        assert green.huge_sent < 3 * green.huge_bytes, "each 50 MB body was abandoned"
        # Blue is scraped on regardless.
        before = sig.colors["blue"].scrapes
        await until(lambda: sig.colors["blue"].scrapes > before + 3, "blue scraped meanwhile")
        green.set_mode("ok")
        green.runs_per_scrape(ok=3, failed=1)
        await until(lambda: _value(sig, "green") is not None, "green readable again", within=30)
        assert sig.problem is None


@pytest.mark.parametrize("mode", ["hang", "trickle"])
async def test_a_hung_scrape_times_out_and_the_other_color_goes_on(
    exporters: tuple[Exporter, ...], mode: Any
) -> None:
    blue, green = exporters
    blue.runs_per_scrape(ok=1, failed=0)
    green.runs_per_scrape(ok=3, failed=1)
    spec = _spec({"blue": blue.url, "green": green.url}, timeout_s=0.3)
    async with scraping(spec) as sig:
        await until(lambda: _value(sig, "green") is not None, "green's ratio")
        green.set_mode(mode)
        await until(lambda: sig.errors["timeout"] >= 2, "two timeouts", within=30)
        assert _value(sig, "green") is None, "a hung scrape makes the reading inconclusive"
        assert sig.problem is not None and "green: timeout" in sig.problem
        before = sig.colors["blue"].scrapes
        await until(lambda: sig.colors["blue"].scrapes > before + 5, "blue scraped meanwhile")
        assert _value(sig, "blue") == 0.0


@pytest.mark.parametrize(
    ("mode", "kind"),
    [("invalid", "invalid"), ("http_500", "http")],
)
async def test_bad_answers_are_counted_and_inconclusive(
    exporters: tuple[Exporter, ...], mode: Any, kind: str
) -> None:
    _, green = exporters
    green.runs_per_scrape(ok=3, failed=1)
    async with scraping(_spec({"green": green.url})) as sig:
        await until(lambda: _value(sig, "green") is not None, "green's ratio")
        green.set_mode(mode)
        await until(lambda: sig.errors[kind] >= 2, f"two {kind} scrapes")
        assert _value(sig, "green") is None
        assert sig.status()["last_error"]["green"].startswith(f"{kind}: ")
        green.set_mode("ok")
        await until(lambda: _value(sig, "green") is not None, "green readable again")
        assert sig.problem is None


async def test_connection_refused_is_counted() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    async with scraping(_spec({"green": url})) as sig:
        await until(lambda: sig.errors["connect"] >= 2, "two refused scrapes")
        assert _value(sig, "green") is None and sig.problem is not None


# ---- end to end: a real daemon rolls back on the ratio ----------------------------------


@pytest.mark.nginx
def test_failed_runs_at_25_percent_roll_back_after_for(tmp_path: Path) -> None:
    with Exporter() as blue_m, Exporter() as green_m:
        blue_m.runs_per_scrape(ok=4, failed=0)
        green_m.runs_per_scrape(ok=4, failed=0)
        with lab(
            tmp_path,
            signals__runs={
                "kind": "scrape",
                "urls": {"blue": blue_m.url, "green": green_m.url},
                "ratio": {"of": FAILED, "to": RUNS},
                "every": "200ms",
                "window": "4s",
                "stale_after": "10s",
            },
            rules=[
                {
                    "name": "agent-failures-p1",
                    "signal": "runs",
                    "stat": "value",
                    "above": 0.20,
                    "severity": "P1",
                    "for": "3s",
                    "min_samples": 3,
                }
            ],
        ) as the_lab:
            d = the_lab.daemon()
            # Healthy first: the rule judges (ok), and nothing rolls back.
            wait_until(lambda: green_m.scrapes >= 10, 30, "guardd scraping green")
            assert not [e for e in d.events() if e["event"].startswith("rollback")]
            green_m.runs_per_scrape(ok=3, failed=1)  # failed runs grow to 25 % of runs
            done = d.wait_event("rollback_completed", timeout=60)
            assert the_lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
            ev = done["evidence"]
            assert done["severity"] == "P1" and done["from"] == "green"
            assert ev["rule"] == "agent-failures-p1" and ev["signal"] == "runs"
            assert ev["stat"] == "value" and ev["color"] == "green"
            assert 0.20 <= ev["value"] <= 0.25
            assert ev["sustain_s"] == 3.0 and ev["sustained_s"] >= 3.0
            assert ev["of"] == FAILED and ev["to"] == RUNS
            assert ev["samples"] >= 3 and ev["window_s"] == 4.0
            assert d.stop() == 0


@pytest.mark.nginx
def test_a_restarting_green_is_not_rolled_back(tmp_path: Path) -> None:
    with Exporter() as blue_m, Exporter() as green_m:
        blue_m.runs_per_scrape(ok=4, failed=0)
        green_m.runs_per_scrape(ok=19, failed=1)  # 5 %, under the rule's 20 %
        green_m.ok, green_m.failed = 50_000.0, 1_000.0
        with lab(
            tmp_path,
            signals__runs={
                "kind": "scrape",
                "urls": {"blue": blue_m.url, "green": green_m.url},
                "ratio": {"of": FAILED, "to": RUNS},
                "every": "100ms",
                "window": "2s",
            },
            rules=[
                {
                    "name": "agent-failures-p0",
                    "signal": "runs",
                    "stat": "value",
                    "above": 0.20,
                    "severity": "P0",
                    "min_samples": 2,
                }
            ],
        ) as the_lab:
            d = the_lab.daemon()
            seen: list[float | None] = []

            def green_value() -> float | None:
                out = guardctl("status", "--json", socket=the_lab.socket_path)
                doc = json.loads(out.stdout)
                green = doc["signals"]["runs"]["green"]
                return None if green is None else green["value"]

            # Five restarts, each to 0, each read across by a P0 rule and by `status`.
            for n in range(6):
                if n:
                    green_m.restart()
                target = green_m.scrapes + 15
                while green_m.scrapes < target:
                    seen.append(green_value())
            # Once the window holds two scrapes, the ratio is there and right throughout:
            # a restart is neither a drop (no value, a negative one) nor a spike.
            first = next(i for i, v in enumerate(seen) if v is not None)
            assert all(v == pytest.approx(0.05, abs=1e-3) for v in seen[first:]), seen
            # The operator's view says the same, as a scrape signal (no req/s, no 5xx).
            text = guardctl("status", socket=the_lab.socket_path).stdout
            lines = text.splitlines()
            head = lines.index("signal runs (scrape): scraping every 0.1s")
            green = lines[head + 2].split()
            assert green[:3] == ["green", "value", "0.05"] and green[-1] == "samples)", text
            assert "req/s" not in lines[head + 1] + lines[head + 2], text
            assert not [e for e in d.events() if e["event"].startswith("rollback")], d.events()
            assert the_lab.nginx.served_color() == "green"
            assert d.stop() == 0


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.nginx
def test_a_hostile_metrics_endpoint_alerts_and_never_rolls_back(tmp_path: Path) -> None:
    with Exporter() as blue_m, Exporter() as green_m:
        blue_m.runs_per_scrape(ok=4, failed=0)
        green_m.runs_per_scrape(ok=4, failed=0)
        with lab(
            tmp_path,
            signals__runs={
                "kind": "scrape",
                "urls": {"blue": blue_m.url, "green": green_m.url},
                "ratio": {"of": FAILED, "to": RUNS},
                "every": "200ms",
                "timeout": "500ms",
                "max_bytes": 1024 * 1024,
            },
            rules=[
                {
                    "name": "agent-failures-p0",
                    "signal": "runs",
                    "stat": "value",
                    "above": 0.20,
                    "severity": "P0",
                    "min_samples": 2,
                }
            ],
        ) as the_lab:
            d = the_lab.daemon()
            wait_until(lambda: green_m.scrapes >= 5, 30, "guardd scraping green")
            hwm_before = _hwm_kib(d.pid)
            alerts = 0
            episodes: list[tuple[ExporterMode, str]] = [
                ("huge", "oversize"),
                ("invalid", "invalid"),
                ("hang", "timeout"),
            ]
            for mode, kind in episodes:
                green_m.set_mode(mode)

                def about(e: dict[str, Any], k: str = kind) -> bool:
                    return f"green: {k}: " in e.get("reason", "")

                alert = d.wait_event("alert", timeout=60, where=about)
                assert "signal runs gives nothing" in alert["reason"]
                alerts += 1
                doc = json.loads(guardctl("status", "--json", socket=the_lab.socket_path).stdout)
                assert doc["signals"]["runs"]["errors"][kind] >= 1
                assert doc["signals"]["runs"]["green"]["value"] is None, "inconclusive"
                green_m.set_mode("ok")
                wait_until(
                    lambda: (
                        json.loads(guardctl("status", "--json", socket=the_lab.socket_path).stdout)[
                            "signals"
                        ]["runs"]["problem"]
                        is None
                    ),
                    60,
                    "the signal reading green again",
                )
            # One alert per episode, never a rollback; the 50 MB body was never held.
            got = [e for e in d.events() if "signal runs gives nothing" in e.get("reason", "")]
            assert len(got) == alerts
            assert not [e for e in d.events() if e["event"].startswith("rollback")]
            assert _hwm_kib(d.pid) - hwm_before < 20 * 1024, "peak RSS grew by 20 MiB or more"
            assert green_m.huge_sent < green_m.huge_bytes
            assert d.stop() == 0
