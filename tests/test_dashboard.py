"""packaging/grafana/guardd.json: a classic Grafana dashboard (schemaVersion 39) of guardd.

Fields checked against Grafana's dashboard JSON model: top-level `schemaVersion`, `uid`,
`title`, `time`, `templating.list`, `annotations.list`, `panels`; each panel's `id`, `type`,
`datasource`, `targets` (`refId`, `expr`) and `gridPos` (`x`, `y`, `w`, `h` on a 24-column grid).
The queries themselves run against a real Prometheus in tests/e2e/test_dashboard.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from guardd.metrics import GuardMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "packaging" / "grafana" / "guardd.json"
SCHEMA_VERSION = 39
# Panel types of Grafana 10/11's core visualizations that this dashboard may use.
PANEL_TYPES = {"timeseries", "state-timeline", "stat"}
PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def prometheus_queries(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) of every PromQL query: panel targets and annotations."""
    for panel in doc["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for annotation in doc["annotations"]["list"]:
        if annotation["datasource"].get("type") == "prometheus":
            yield f"annotation {annotation['name']!r}", annotation["expr"]


def test_the_dashboard_is_a_classic_grafana_dashboard() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] == SCHEMA_VERSION
    assert doc["uid"] == "guardd-overview"
    assert doc["title"] == "guardd"
    assert set(doc["time"]) == {"from", "to"}
    assert "id" not in doc, "an id is assigned by the Grafana that imports it"


def test_the_guard_and_datasource_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) == {"datasource", "guard"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    guard = variables["guard"]
    assert guard["type"] == "query"
    assert guard["datasource"] == PROMETHEUS
    assert guard["definition"] == "label_values(guardd_build_info, guard)"
    assert guard["query"]["query"] == guard["definition"]
    assert guard["multi"] is True
    assert guard["includeAll"] is True
    assert guard["allValue"] == ".+"


def test_every_panel_has_a_datasource_targets_and_a_place() -> None:
    panels = dashboard()["panels"]
    assert len(panels) >= 6
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["title"]
        assert panel["datasource"] == PROMETHEUS
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == PROMETHEUS
            assert target["expr"].strip()
        grid = panel["gridPos"]
        assert set(grid) == {"x", "y", "w", "h"}
        assert all(isinstance(v, int) for v in grid.values())
        assert grid["w"] >= 1 and grid["h"] >= 1
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']!r} overlaps another panel"
        cells |= mine


def test_rollbacks_and_holds_are_annotations_with_an_expr() -> None:
    annotations = {a["name"]: a for a in dashboard()["annotations"]["list"]}
    assert {"Rollbacks", "Holds"} <= set(annotations)
    for name in ("Rollbacks", "Holds"):
        annotation = annotations[name]
        assert annotation["datasource"] == PROMETHEUS
        assert annotation["enable"] is True
        assert annotation["expr"]
        assert annotation["iconColor"]
        assert annotation["step"]
    assert "guardd_rollbacks_total" in annotations["Rollbacks"]["expr"]
    assert 'state="hold"' in annotations["Holds"]["expr"]


def test_every_query_is_filtered_by_the_guard_variable() -> None:
    for where, expr in prometheus_queries(dashboard()):
        selectors = re.findall(r"guardd_\w+\{([^}]*)\}", expr)
        assert selectors, where
        for selector in selectors:
            assert 'guard=~"$guard"' in selector, f"{where}: {expr}"


def test_every_query_names_metrics_guardd_exposes() -> None:
    exposed = {
        family.name
        for family in GuardMetrics("lab", "0").registry.collect()
        if family.name.startswith("guardd_")
    }
    suffixes = ("_total", "_bucket", "_sum", "_count", "_created")
    shown = set()
    for where, expr in prometheus_queries(dashboard()):
        for name in re.findall(r"\b(guardd_\w+)\{", expr):
            base = next((name.removesuffix(s) for s in suffixes if name.endswith(s)), name)
            assert base in exposed, f"{where}: {name} is not a guardd metric"
            shown.add(base)
    # What the dashboard is for: each of these signals is on it.
    assert {
        "guardd_active_color",
        "guardd_state",
        "guardd_rollbacks",
        "guardd_probe",
        "guardd_probe_duration_seconds",
        "guardd_window_error_ratio",
        "guardd_qos_locked",
        "guardd_notifications",
    } <= shown
