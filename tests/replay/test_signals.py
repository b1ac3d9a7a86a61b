"""`guardd replay` of the other signals: an application's log by each line's own time,
a log without times said to be unreplayable, and Prometheus' own history."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from guardd.timestamps import parse_rfc3339
from tests.harness.httpserver import QuietHTTPServer
from tests.replay.history import Timeline, config, decisions, replay, replay_json

MINUTES = 10
ERRORS_AT = 300.0  # seconds in: green's log says ERROR 10 times in 5 s


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, float]:
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(MINUTES * 60, interval=1.0)
    tl.close()
    return tmp_path, t0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _app_logs(logs: Path, t0: float, *, timed: bool = True, untimed: tuple[str, ...] = ()) -> None:
    """Each color's log (green says ERROR at `ERRORS_AT`); `untimed` colors' lines, or every
    color's without `timed`, carry no timestamp."""
    logs.mkdir()
    for color in ("blue", "green"):
        stamped = timed and color not in untimed
        lines = []
        for i in range(MINUTES * 60):
            at = t0 + i
            said = "INFO served /api"
            if color == "green" and ERRORS_AT <= i < ERRORS_AT + 5:
                said = "ERROR database connection refused"
            lines.append(f"{_iso(at)} {said}\n" if stamped else f"{said}\n")
            if color == "green" and ERRORS_AT <= i < ERRORS_AT + 5:
                lines.append(f"{_iso(at + 0.5)} {said}\n" if stamped else f"{said}\n")
        (logs / f"{color}.log").write_text("".join(lines))


def _signal(logs: Path) -> str:
    return f"""
[signals.app]
kind = "log_match"
paths = {{ blue = "{logs}/blue.log", green = "{logs}/green.log" }}
patterns = ["ERROR"]
window = "30s"

[[rules]]
name = "app_errors"
signal = "app"
stat = "count"
above = 5
severity = "P2"
min_samples = 1
"""


def test_an_application_log_is_replayed_by_each_lines_time(history: tuple[Path, float]) -> None:
    tmp, t0 = history
    _app_logs(tmp / "logs", t0)
    cfg = config(tmp, tmp / "state", extra=_signal(tmp / "logs"), interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    [fired] = [d for d in decisions(doc, "alert") if d["rule"] == "app_errors"]
    at = parse_rfc3339(fired["at"]) - t0
    # The sixth ERROR line of green came 2.5 s into its burst.
    assert ERRORS_AT + 2 <= at <= ERRORS_AT + 4, at
    assert fired["color"] == "green"
    src = doc["sources"]["app"]
    assert src["replayed"] == "from its files, by each line's own timestamp"
    assert src["untimed_lines"] == 0


def test_a_quiet_application_log_is_never_stale_in_a_replay(history: tuple[Path, float]) -> None:
    """Live, a log_match file is read at every poll, quiet or not: a quiet log is never
    stale (only one that cannot be read is). A replay of a log that writes a line a
    minute, with `stale_after = "15s"`, says no more than the live guard would have."""
    tmp, t0 = history
    logs = tmp / "logs"
    logs.mkdir()
    for color in ("blue", "green"):
        lines = [f"{_iso(t0 + i)} INFO still here\n" for i in range(0, MINUTES * 60, 60)]
        (logs / f"{color}.log").write_text("".join(lines))
    signal = _signal(logs).replace('window = "30s"', 'window = "30s"\nstale_after = "15s"')
    cfg = config(tmp, tmp / "state", extra=signal, interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    stale = [d for d in decisions(doc, "alert") if "stale" in (d.get("reason") or "")]
    assert stale == [], stale
    assert doc["sources"]["app"]["replayed"] == "from its files, by each line's own timestamp"


#: `guardd replay` as `python -m guardd.cli` runs it, that prints every module loaded
#: (`sys.modules`, whatever imported them) as its last line on stderr.
_MODULES_AT_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print(" ".join(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["guardd", *sys.argv[1:]]
runpy.run_module("guardd.cli", run_name="__main__")
"""


def test_a_replay_loads_an_http_client_only_for_an_http_signal(
    history: tuple[Path, float],
) -> None:
    """A config whose signals read files replays without httpx (nor the prometheus
    adapter) in the process: only a prometheus signal asks a server for its history."""
    tmp, t0 = history
    _app_logs(tmp / "logs", t0)
    cfg = config(tmp, tmp / "state", extra=_signal(tmp / "logs"), interval="1s", qos_window="10s")
    done = subprocess.run(
        [sys.executable, "-c", _MODULES_AT_EXIT, "replay", "--config", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert decisions(json.loads(done.stdout), "alert"), "the log's rule was replayed"
    names = set(done.stderr.splitlines()[-1].split())
    assert {"guardd.replay._engine", "guardd.signals.log_match"} <= names
    assert not {n for n in names if n.split(".")[0] in ("httpx", "httpcore")}
    assert "guardd.signals.prometheus" not in names


def test_a_log_without_timestamps_cannot_be_replayed_and_its_rules_say_nothing(
    history: tuple[Path, float],
) -> None:
    tmp, t0 = history
    _app_logs(tmp / "logs", t0, timed=False)
    cfg = config(tmp, tmp / "state", extra=_signal(tmp / "logs"), interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["app"]
    assert src["replayed"] is None
    assert "carry no timestamp" in src["why"]
    # Never healthy, never fired: the rule is inconclusive, and the guard says why.
    assert [d for d in decisions(doc, "alert") if d["rule"] == "app_errors"] == []
    said = [d["reason"] for d in decisions(doc, "alert")]
    assert any("signal app gives nothing" in r and "no timestamp" in r for r in said), said
    text = replay("--config", str(cfg)).stdout
    assert "signal app (log_match): not replayed: the lines of" in text


@pytest.mark.parametrize("untimed", ["blue", "green"])
def test_one_untimed_log_leaves_only_its_color_inconclusive(
    history: tuple[Path, float], untimed: str
) -> None:
    tmp, t0 = history
    _app_logs(tmp / "logs", t0, untimed=(untimed,))
    cfg = config(tmp, tmp / "state", extra=_signal(tmp / "logs"), interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["app"]
    timed = "green" if untimed == "blue" else "blue"
    assert src["replayed"] == "from its files, by each line's own timestamp"
    assert f"{untimed}.log carry no timestamp" in src["why"]
    assert f"inconclusive on {untimed}" in src["why"] and timed not in src["why"]
    fired = [d for d in decisions(doc, "alert") if d["rule"] == "app_errors"]
    if untimed == "blue":
        # Green's lines are timed: its burst is replayed and fires the rule.
        [alert] = fired
        assert alert["color"] == "green"
        assert ERRORS_AT + 2 <= parse_rfc3339(alert["at"]) - t0 <= ERRORS_AT + 4
    else:
        assert fired == []  # green's burst has no time: inconclusive, never fired
    said = [d["reason"] for d in decisions(doc, "alert") if "signal app" in (d["reason"] or "")]
    assert said, decisions(doc, "alert")
    assert all(f"{untimed}: cannot be replayed" in r for r in said), said
    assert not any(f"{timed}: cannot be replayed" in r for r in said), said


class _RangeServer:
    """Prometheus' `/api/v1/query_range` on loopback: each color's error ratio, 0.01, and
    0.2 for green between `spike` seconds (wall times)."""

    def __init__(self, spike: tuple[float, float]) -> None:
        self.asked: list[dict[str, list[str]]] = []
        spike_lo, spike_hi = spike
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                q = parse_qs(url.query)
                outer.asked.append(q)
                if url.path != "/api/v1/query_range":
                    self.send_error(404)
                    return
                start, end, step = (float(q[k][0]) for k in ("start", "end", "step"))
                green = 'color="green"' in q["query"][0]
                values = []
                t = start
                while t <= end:
                    v = 0.2 if green and spike_lo <= t < spike_hi else 0.01
                    values.append([t, str(v)])
                    t += step
                body = json.dumps(
                    {
                        "status": "success",
                        "data": {
                            "resultType": "matrix",
                            "result": [{"metric": {}, "values": values}],
                        },
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prom(history: tuple[Path, float]) -> Iterator[_RangeServer]:
    _, t0 = history
    server = _RangeServer((t0 + 200, t0 + 260))
    yield server
    server.close()


def _prom_signal(url: str) -> str:
    return f"""
[signals.errors]
kind = "prometheus"
url = "{url}"
query = 'sum(rate(http_requests_total{{color="{{color}}",code=~"5.."}}[1m]))'
every = "5s"

[[rules]]
name = "prom_errors"
signal = "errors"
stat = "value"
above = 0.1
severity = "P2"
"""


def test_prometheus_is_replayed_from_its_own_history(
    history: tuple[Path, float], prom: _RangeServer
) -> None:
    tmp, t0 = history
    cfg = config(tmp, tmp / "state", extra=_prom_signal(prom.url), interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["errors"]
    assert src["replayed"].startswith("from Prometheus' own history (query_range")
    [fired] = [d for d in decisions(doc, "alert") if d["rule"] == "prom_errors"]
    assert fired["color"] == "green"
    assert 200 <= parse_rfc3339(fired["at"]) - t0 <= 206
    # Each color's own query, at the signal's step, bounded to the history's period.
    queries = [q["query"][0] for q in prom.asked]
    assert any('color="green"' in q for q in queries)
    assert any('color="blue"' in q for q in queries)
    assert all(q["step"] == ["5"] for q in prom.asked)


def test_prometheus_unreachable_falls_back_to_recorded_samples_and_says_why(
    tmp_path: Path,
) -> None:
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    for i in range(120):
        tl.rounds(5, interval=1.0)
        # What the daemon recorded of each query, as the signal's own payload.
        for color in ("blue", "green"):
            value = 0.3 if color == "green" and 60 <= i < 70 else 0.01
            tl.recorder.sample("errors", color, {"outcome": "ok", "value": value})
    tl.recorder.sample("errors", "green", {"outcome": "bogus"})
    tl.close()
    cfg = config(
        tmp_path,
        tmp_path / "state",
        extra=_prom_signal("http://127.0.0.1:9"),
        interval="1s",
        qos_window="10s",
    )
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["errors"]
    assert src["replayed"] == "from recorded samples"
    assert src["why"].startswith("query_range not used: ")
    assert src["bad_samples"] == 1
    [fired] = [d for d in decisions(doc, "alert") if d["rule"] == "prom_errors"]
    assert fired["color"] == "green"
    assert 300 <= parse_rfc3339(fired["at"]) - t0 <= 306
    text = replay("--config", str(cfg)).stdout
    assert "from recorded samples (query_range not used" in text
    assert "1 recorded sample(s) this signal could not take" in text


def test_a_scrape_signal_is_replayed_from_its_recorded_samples(tmp_path: Path) -> None:
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    for i in range(120):
        tl.rounds(5, interval=1.0)
        for color in ("blue", "green"):
            # Per scrape: the increase of failed runs and of all runs (the payload's steps).
            failed = 40.0 if color == "green" and 60 <= i < 70 else 1.0
            tl.recorder.sample(
                "runs", color, {"outcome": "ok", "steps": [failed, 100.0], "sums": [0.0, 0.0]}
            )
    tl.close()
    extra = """
[signals.runs]
kind = "scrape"
urls = { blue = "http://127.0.0.1:9/metrics", green = "http://127.0.0.1:10/metrics" }
ratio = { of = 'runs_total{result="failed"}', to = "runs_total" }
every = "5s"
window = "30s"

[[rules]]
name = "failed_runs"
signal = "runs"
stat = "value"
above = 0.1
severity = "P2"
min_samples = 2
"""
    cfg = config(tmp_path, tmp_path / "state", extra=extra, interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    [fired] = [d for d in decisions(doc, "alert") if d["rule"] == "failed_runs"]
    assert fired["color"] == "green"
    # Green's scrapes from 305 s say 40 failed runs in 100; over the 30 s window the ratio
    # passes 0.1 with the second of them (310 s), judged at the next tick (a probe, 1 s on):
    # a sample wakes no tick, in the daemon as here.
    assert 310 <= parse_rfc3339(fired["at"]) - t0 <= 311
    src = doc["sources"]["runs"]
    assert (src["kind"], src["replayed"], src["bad_samples"]) == (
        "scrape",
        "from recorded samples",
        0,
    )


def test_a_signal_of_which_no_sample_was_recorded_says_its_rules_had_nothing(
    tmp_path: Path,
) -> None:
    """A scrape signal added to the config after the history was recorded: it is not
    "from recorded samples" but not replayed, its rules inconclusive throughout."""
    tl = Timeline(tmp_path / "state")
    tl.start(active="green", interval=1.0)
    tl.rounds(120, interval=1.0)
    tl.close()
    extra = """
[signals.runs]
kind = "scrape"
urls = { blue = "http://127.0.0.1:9/metrics", green = "http://127.0.0.1:10/metrics" }
value = "runs_total"
every = "5s"
window = "30s"
"""
    cfg = config(tmp_path, tmp_path / "state", extra=extra, interval="1s", qos_window="10s")
    src = replay_json("--config", str(cfg))["sources"]["runs"]
    assert src["replayed"] is None, src
    assert src["why"] == (
        "from recorded samples, but the history holds none: its rules were inconclusive throughout"
    )
    text = replay("--config", str(cfg))
    assert text.returncode == 0, text.stderr
    assert "signal runs (scrape): not replayed: from recorded samples, but the history holds" in (
        text.stdout
    )
