"""The shipped Prometheus files: promtool accepts them, and the alerts fire on guardd's series."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from guardd.metrics import GuardMetrics, MetricsServer
from tests.harness.prometheus import PrometheusServer, ensure_prometheus

pytestmark = pytest.mark.anyio

PACKAGING = Path(__file__).resolve().parent.parent / "packaging" / "prometheus"
RULES = PACKAGING / "guardd.rules.yml"
RULE_TESTS = PACKAGING / "guardd.rules.test.yml"
SCRAPE = PACKAGING / "scrape.yml"


def promtool(*args: str | Path) -> str:
    """Run promtool in the packaging directory; fail with its output unless it succeeds."""
    _, tool = ensure_prometheus()
    done = subprocess.run(
        [tool, *map(str, args)], cwd=PACKAGING, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"promtool {args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\w+)\s*$", RULES.read_text(), re.MULTILINE)


def test_promtool_checks_the_rules() -> None:
    output = promtool("check", "rules", RULES)

    assert f"SUCCESS: {len(alert_names())} rules found" in output


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    output = promtool("test", "rules", RULE_TESTS)

    assert "SUCCESS" in output


def test_promtool_checks_the_scrape_example_with_its_rules() -> None:
    output = promtool("check", "config", SCRAPE)

    assert "is valid prometheus config file syntax" in output
    assert "SUCCESS: 1 rule files found" in output


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Both halves matter: a rule that never fires is as useless as one that always does."""
    cases = re.findall(
        r"alertname:\s*(\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", RULE_TESTS.read_text()
    )
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}

    assert len(alert_names()) >= 6
    for name in alert_names():
        assert name in firing, f"{name} has no test where it fires"
        assert name in quiet, f"{name} has no test where it stays quiet"


def test_the_rules_use_only_metrics_guardd_exposes() -> None:
    """promtool tests feed hand-written series; this ties the rules to the real names."""
    metrics = GuardMetrics("threader", "0.1.0")
    metrics.declare_sinks(["slack"])
    exposed = set(re.findall(r"^(guardd_\w+)[{ ]", metrics.render().decode(), re.MULTILINE))
    referenced = set(re.findall(r"\bguardd_\w+", RULES.read_text()))

    assert referenced
    assert referenced <= exposed, referenced - exposed


async def test_real_prometheus_fires_the_rollback_alert_from_guardd(tmp_path: Path) -> None:
    """The shipped rules, scraped as scrape.yml does it, alert on a rollback guardd counts."""
    metrics = GuardMetrics("threader", "0.1.0")
    metrics.set_active("green")
    with (
        MetricsServer("127.0.0.1:0", metrics.registry) as server,
        PrometheusServer(
            [f"127.0.0.1:{server.port}"],
            tmp_path,
            rule_files=[RULES],
            target_labels={"guard": "threader"},
        ) as prometheus,
    ):
        # The counter must be seen at 0 first, or there is nothing to increase from.
        await prometheus.wait_for_query_async(
            'guardd_rollbacks_total{severity="P0"}', lambda r: len(r) == 1
        )
        metrics.rollback_completed("P0")
        alerts = await prometheus.wait_for_query_async(
            'ALERTS{alertname="GuarddRollback", alertstate="firing"}', lambda r: len(r) == 1
        )
        up = await prometheus.query_async('up{job="guardd", guard="threader"} == 1')
        renamed = await prometheus.query_async('{exported_guard=~".+"}')
        rules = prometheus.api("rules", type="alert")["groups"][0]["rules"]

    labels = alerts[0]["metric"]
    assert labels["guard"] == "threader"
    assert labels["rollback_severity"] == "P0"
    assert labels["severity"] == "warning"
    assert len(up) == 1
    assert renamed == []  # honor_labels keeps guardd's own `guard` label as it is
    assert sorted(r["name"] for r in rules) == sorted(alert_names())
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["name"]
        assert {"summary", "description", "command"} <= set(rule["annotations"]), rule["name"]
        assert "guardctl --instance {{ $labels.guard }}" in rule["annotations"]["command"]
