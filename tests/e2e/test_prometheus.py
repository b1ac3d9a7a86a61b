"""A real Prometheus scrapes a real guardd; PromQL sees the rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.daemon import Lab, MakeLab
from tests.harness.nginx import free_port
from tests.harness.prometheus import PrometheusServer, ensure_prometheus

pytestmark = pytest.mark.nginx


def test_prometheus_sees_blue_active_after_a_rollback(make_lab: MakeLab, tmp_path: Path) -> None:
    ensure_prometheus()
    port = free_port()
    lab: Lab = make_lab(metrics__listen=f"127.0.0.1:{port}")
    d = lab.daemon()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    with PrometheusServer([f"127.0.0.1:{port}"], prom_dir) as prom:
        prom.wait_for_query(
            'guardd_active_color{color="green"} == 1', lambda r: len(r) == 1, timeout=60
        )
        lab.green.set_mode("http_503")
        d.wait_event("rollback_completed")
        series = prom.wait_for_query(
            'guardd_active_color{color="blue"} == 1', lambda r: len(r) == 1, timeout=60
        )
        assert series[0]["metric"]["guard"] == "lab"
        prom.wait_for_query(
            'guardd_rollbacks_total{severity="P0"} == 1', lambda r: len(r) == 1, timeout=60
        )
        prom.wait_for_query("guardd_qos_locked == 1", lambda r: len(r) == 1, timeout=60)
        up = prom.query('up{job="guardd"}')
        assert up and up[0]["value"][1] == "1"
    assert d.stop() == 0
