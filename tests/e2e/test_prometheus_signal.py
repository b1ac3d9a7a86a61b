"""A rule over a `prometheus` signal, end to end: Debian's real Prometheus scrapes two real
app processes, a real guardd asks it each color's 5xx ratio, and rolls green back when green
answers 30 % 5xx in its own counters; Prometheus going away meanwhile costs a rule its
verdict, never the daemon, and the signal resumes when Prometheus is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness.app_metrics import MetricsApp
from tests.harness.daemon import Daemon, Lab, MakeLab, guardctl, log_lines, wait_until
from tests.harness.jsondoc import json_object
from tests.harness.prometheus import PrometheusServer

pytestmark = pytest.mark.nginx

RATIO = (
    'sum(rate(http_requests_total{color="{color}",code=~"5.."}[10s]))'
    ' / sum(rate(http_requests_total{color="{color}"}[10s]))'
)
SENT_FOR_GREEN = RATIO.replace("{color}", "green")


def status(lab: Lab) -> dict[str, Any]:
    result = guardctl("status", "--json", socket=lab.socket_path)
    return json_object(result.stdout) if result.stdout.strip() else {}


def signal_doc(lab: Lab) -> dict[str, Any]:
    doc: dict[str, Any] = status(lab).get("signals", {}).get("app_5xx", {})
    return doc


def rule_on_green(lab: Lab) -> dict[str, Any]:
    for row in status(lab).get("rules", []):
        if row["rule"] == "app_5xx.value":
            found: dict[str, Any] = row.get("green") or {}
            return found
    return {}


def alerts(d: Daemon, text: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e["event"] == "alert" and text in e.get("reason", "")]


def test_green_s_own_5xx_in_prometheus_rolls_back_and_an_outage_is_survived(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    with MetricsApp("blue") as blue_app, MetricsApp("green") as green_app:
        prom_dir = tmp_path / "prom"
        prom_dir.mkdir()
        with PrometheusServer([blue_app.target, green_app.target], prom_dir) as prom:
            prom.wait_for_query(
                "count(rate(http_requests_total[10s])) == 4", lambda r: len(r) == 1, 60
            )
            lab = make_lab(
                **{
                    "signals.app_5xx__kind": "prometheus",
                    "signals.app_5xx__url": prom.url,
                    "signals.app_5xx__query": RATIO,
                    "signals.app_5xx__every": "500ms",
                    "signals.app_5xx__timeout": "1s",
                    "signals.app_5xx__stale_after": "3s",
                    "rules": [
                        {"signal": "app_5xx", "stat": "value", "above": 0.2, "severity": "P0"}
                    ],
                }
            )
            d = lab.daemon()

            # Healthy: both colors read 0.0 from Prometheus, the rule is ok on green.
            wait_until(
                lambda: rule_on_green(lab).get("state") == "ok", 60, "the rule ok on green", 0.3
            )
            doc = signal_doc(lab)
            assert doc["kind"] == "prometheus" and doc["problem"] is None
            assert doc["green"]["value"] == 0.0 and doc["green"]["samples"] == 1

            # Prometheus goes away: inconclusive, said once, stale after 3 s; no rollback.
            prom.stop()
            d.wait_event(
                "alert", timeout=60, where=lambda e: "app_5xx gives nothing" in e["reason"]
            )
            d.wait_event("alert", timeout=60, where=lambda e: "app_5xx is stale" in e["reason"])
            doc = wait_until(
                lambda: (s := signal_doc(lab)).get("stale") and s, 30, "status: stale", 0.3
            )
            assert doc["problem"] and doc["queries"]["unreachable"] >= 1
            assert doc["green"]["value"] is None and doc["green"]["samples"] == 0
            assert doc["last"]["green"]["outcome"] == "unreachable"
            rule = rule_on_green(lab)
            assert rule["state"] == "inconclusive" and rule["why"] == "signal stale"
            warned = status(lab)["warnings"]
            assert "signal app_5xx is stale: its rules are inconclusive" in warned
            assert len(alerts(d, "app_5xx gives nothing")) == 1
            assert len(alerts(d, "app_5xx is stale")) == 1

            # Prometheus is back: the signal reads again and the rule judges again.
            prom.restart()
            wait_until(
                lambda: (
                    (s := signal_doc(lab)).get("problem") is None
                    and not s.get("stale")
                    and s.get("green", {}).get("value") == 0.0
                ),
                60,
                "the signal reading again",
                0.3,
            )
            wait_until(lambda: rule_on_green(lab).get("state") == "ok", 30, "the rule ok", 0.3)
            assert not [e for e in d.events() if e["event"].startswith("rollback")]

            # Green's own counters say 30 % 5xx: the rule fires, green is rolled back.
            green_app.set_error_share(0.3)
            started = d.wait_event("rollback_started", timeout=90)
            done = d.wait_event("rollback_completed", timeout=60)
            assert started["from"] == "green" and started["to"] == "blue"
            assert done["severity"] == "P0"
            ev = done["evidence"]
            assert ev["rule"] == "app_5xx.value"
            assert ev["signal"] == "app_5xx" and ev["stat"] == "value"
            assert ev["color"] == "green"
            assert ev["threshold"] == 0.2
            assert 0.2 <= ev["value"] <= 0.31
            assert ev["query"] == SENT_FOR_GREEN
            assert ev["samples"] == 1
            assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
            assert not [e for e in log_lines(d) if e.get("event") == "signal_failed"]
            assert d.stop() == 0
