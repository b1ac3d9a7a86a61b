"""A live guardd behind a real nginx records what it observes; `guardd replay` of the same
config over that history takes the same decisions, by the same rules, at the same times."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from guardd.timestamps import parse_rfc3339
from tests.harness.daemon import GUARDD, Daemon, Lab, MakeLab, guardctl, wait_until

pytestmark = pytest.mark.nginx

INTERVAL = 0.2  # the lab's probe.interval
DECISIONS = ("rollback_started", "hold", "alert")


def _green_ok(lab: Lab) -> int:
    """Green's healthy probes recorded so far."""
    return sum(
        1
        for r in _recorded(lab)
        if (r.get("kind"), r.get("color"), r.get("outcome")) == ("probe", "green", "ok")
    )


def _recorded(lab: Lab) -> list[dict[str, Any]]:
    """Every record of the lab's observations, read as replay reads them."""
    from guardd.observations import ReadReport, read_history  # noqa: PLC0415

    try:
        return [r.doc for r in read_history(lab.state_dir / "observations", ReadReport())]
    except Exception:  # noqa: BLE001 - not written yet
        return []


def _run_on(lab: Lab, d: Daemon, seconds: float) -> None:
    """Let the daemon record `seconds` more of probes, then stop it (it flushes)."""
    until = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= until, seconds + 5, "more history")
    assert d.stop() == 0
    assert wait_until(lambda: len(_recorded(lab)) > 20, 10, "observations on disk")


def _replay(lab: Lab, *more: str) -> dict[str, Any]:
    done = subprocess.run(
        [*GUARDD, "replay", "--config", str(lab.config_path), "--json", *more],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict)
    return doc


def _live(d: Daemon) -> list[dict[str, Any]]:
    return [e for e in d.events() if e["event"] in DECISIONS]


def _replayed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    # Replay's switch is instant: its rollback_completed is the live rollback_started.
    shown = {"rollback_completed": "rollback_started"}
    return [
        {**d, "event": shown.get(d["event"], d["event"])}
        for d in doc["configs"][0]["decisions"]
        if shown.get(d["event"], d["event"]) in DECISIONS
    ]


def _same_decisions(live: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> None:
    assert [(e["event"], e["from"]) for e in live] == [
        (d["event"], d["color"]) for d in replayed
    ], (live, replayed)
    for e, d in zip(live, replayed, strict=True):
        rule = (e.get("evidence") or {}).get("rule")
        assert rule == d["rule"], (e, d)
        assert e["severity"] == d["severity"]
        assert abs(parse_rfc3339(e["ts"]) - parse_rfc3339(d["at"])) <= INTERVAL, (e, d)


def test_a_live_rollback_is_replayed_by_the_same_rule_at_the_same_time(
    make_lab: MakeLab,
) -> None:
    lab = make_lab()
    d = lab.daemon()
    # Healthy probes of green enough that ten failures in a row stay under the lab's
    # P0 error ratio (0.5), for the what-if below: then the rule it changes decides.
    wait_until(lambda: _green_ok(lab) >= 12, 20, "a healthy stretch recorded")
    lab.green.set_mode("http_503")
    started = d.wait_event("rollback_started")
    d.wait_event("rollback_completed")
    _run_on(lab, d, 3.0)
    doc = _replay(lab)
    live = _live(d)
    assert [e["event"] for e in live].count("rollback_started") == 1
    _same_decisions(live, _replayed(doc))
    [rb] = [x for x in doc["configs"][0]["decisions"] if x["event"] == "rollback_completed"]
    assert (rb["color"], rb["to"]) == ("green", "blue")
    assert abs(parse_rfc3339(rb["at"]) - parse_rfc3339(started["ts"])) <= INTERVAL
    # The real journal's incident is matched, within the interval of the live decision.
    [incident] = doc["configs"][0]["incidents"]
    assert incident["event"] == "rollback_completed" and incident["detected_at"] == rb["at"]
    assert incident["at"] == started["ts"]  # the live decision, not the end of its switch
    assert abs(incident["delay_s"]) <= INTERVAL
    # A what-if on the same history (green failed on for seconds): ten failures in a row
    # roll back later, and the summary of the incident says by how much.
    later = _replay(lab, "--set", "policy.consecutive_failures=10")
    [rb10] = [x for x in later["configs"][0]["decisions"] if x["event"] == "rollback_completed"]
    assert rb10["evidence"]["consecutive_failures"] == 10
    assert parse_rfc3339(rb10["at"]) > parse_rfc3339(rb["at"])
    assert later["configs"][0]["incidents"][0]["delay_s"] > incident["delay_s"]


def test_a_live_hold_is_replayed_as_a_hold(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: len(_recorded(lab)) > 20, 20, "a healthy stretch recorded")
    lab.blue.set_mode("http_503")
    lab.green.set_mode("http_503")
    d.wait_event("hold")
    _run_on(lab, d, 3.0)
    doc = _replay(lab)
    live = _live(d)
    assert "hold" in [e["event"] for e in live]
    assert "rollback_started" not in [e["event"] for e in live]
    _same_decisions(live, _replayed(doc))
    assert doc["configs"][0]["summary"]["rollbacks"] == 0
    assert doc["configs"][0]["incidents"][0]["detected_by"] == "hold"


def test_a_live_run_without_incident_replays_without_decision(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: len(_recorded(lab)) > 50, 30, "a healthy stretch recorded")
    _run_on(lab, d, 2.0)
    assert _live(d) == []
    doc = _replay(lab)
    assert doc["configs"][0]["decisions"] == []
    assert doc["history"]["runs"] == 1
    kinds = {r["kind"] for r in _recorded(lab)}
    assert {"start", "probe", "front_door"} <= kinds


def test_an_operators_pause_and_resume_are_recorded_and_replayed_at_their_moment(
    make_lab: MakeLab,
) -> None:
    """`guardctl pause` and `resume` on a live guard: the daemon records each (`operator`,
    on its monotonic clock, its `start` saying it does) beside the journal, and replay
    takes them from there, once each, listed among its decisions."""
    lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: len(_recorded(lab)) > 20, 20, "a healthy stretch recorded")
    for verb in ("pause", "resume"):
        done = guardctl(verb, "--reason", f"{verb} for a test", socket=lab.socket_path)
        assert done.returncode == 0, done.stderr
    _run_on(lab, d, 1.0)
    records = _recorded(lab)
    [start] = [r for r in records if r["kind"] == "start"]
    assert start["operator_actions"] is True
    actions = [(r["event"], r["reason"]) for r in records if r["kind"] == "operator"]
    assert actions == [("paused", "pause for a test"), ("resumed", "resume for a test")]
    doc = _replay(lab)
    replayed = [d["event"] for d in doc["configs"][0]["decisions"]]
    assert replayed.count("paused") == 1 and replayed.count("resumed") == 1, replayed
