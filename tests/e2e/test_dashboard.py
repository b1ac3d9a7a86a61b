"""Every query of packaging/grafana/guardd.json returns data from a real Prometheus.

Real upstreams behind a real nginx, a real guardd that rolls back and then holds, a real
Prometheus scraping its metrics endpoint: each panel target and annotation `expr` is run
through /api/v1/query, with Grafana's variables substituted as Grafana would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal

from tests.harness.daemon import Lab, MakeLab
from tests.harness.nginx import free_port
from tests.harness.prometheus import PrometheusServer, ensure_prometheus
from tests.harness.receiver import Receiver, SlackWebApi, serve
from tests.test_dashboard import dashboard, prometheus_queries

pytestmark = pytest.mark.nginx

TOKEN = "xoxb-3333333333-4444444444-dashboardTESTtoken"  # noqa: S105 - a test's own token
# What Grafana puts in for its interval variables on a short range: whole minutes of 1s
# scrapes, so that rate() has many samples and the rollback is inside the window.
INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s"}


@contextmanager
def slack_api() -> Iterator[Receiver]:
    """A stand-in for Slack's Web API, served from a background event loop."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve(default=SlackWebApi(TOKEN))) as rec,
    ):
        yield rec


def substitute(expr: str, guard: str) -> str:
    """`expr` as Grafana sends it for `$guard` = `guard`."""
    expr = expr.replace("$guard", guard)
    for variable, value in INTERVALS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def test_every_dashboard_query_has_data_after_a_rollback_and_a_hold(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    ensure_prometheus()
    port = free_port()
    with slack_api() as rec:
        lab: Lab = make_lab(metrics__listen=f"127.0.0.1:{port}")
        lab.config_path.write_text(
            lab.config_text()
            + '\n[[notify]]\nkind = "slack_api"\nname = "ops"\ntoken_env = "GUARDD_TEST_TOKEN"\n'
            f'channel = "#ops"\napi_url = "http://127.0.0.1:{rec.port}/api"\n'
        )
        d = lab.daemon(env={"GUARDD_TEST_TOKEN": TOKEN})
        prom_dir = tmp_path / "prom"
        prom_dir.mkdir()
        with PrometheusServer(
            [f"127.0.0.1:{port}"], prom_dir, target_labels={"guard": "lab"}
        ) as prom:
            prom.wait_for_query(
                'guardd_active_color{color="green"} == 1', lambda r: len(r) == 1, timeout=60
            )
            lab.green.set_mode("http_503")
            d.wait_event("rollback_completed")
            # With blue failing too there is no safe color left: guardd holds.
            lab.blue.set_mode("http_503")
            d.wait_event("hold")
            # Until Prometheus has scraped the hold, the panels would show the past.
            for now in ('guardd_active_color{color="blue"}', 'guardd_state{state="hold"}'):
                prom.wait_for_query(f"{now} == 1", lambda r: len(r) == 1, timeout=60)

            # The guard variable's query, as Grafana's label_values() asks it.
            values = prom.api("label/guard/values", **{"match[]": "guardd_build_info"})
            assert values == ["lab"]

            doc = dashboard()
            queries = list(prometheus_queries(doc))
            assert len(queries) >= 10
            results = {}
            for where, expr in queries:
                promql = substitute(expr, "lab")
                results[where] = prom.wait_for_query(promql, lambda r: len(r) > 0, timeout=60)
                for series in results[where]:
                    assert series["metric"].get("guard") == "lab", (where, series)
            # A guard that does not exist shows nothing: the variable really filters.
            assert prom.query(substitute(queries[0][1], "elsewhere")) == []
        assert d.stop() == 0

    active = results["panel 'Active color' A"]
    assert {s["metric"]["color"]: s["value"][1] for s in active} == {"blue": "1", "green": "0"}
    rollbacks = results["annotation 'Rollbacks'"]
    assert [s["metric"]["severity"] for s in rollbacks] == ["P0"]
    assert [s["metric"]["state"] for s in results["panel 'State' A"]] == ["hold"]
    assert results["annotation 'Holds'"]
    ratios = {s["metric"]["color"] for s in results["panel 'Probe error ratio' A"]}
    assert ratios == {"blue", "green"}
    dropped = results["panel 'Notifications dropped' A"]
    assert [s["metric"]["sink"] for s in dropped] == ["ops"]
    assert json.loads(rec.requests[0].body)["channel"] == "#ops"
