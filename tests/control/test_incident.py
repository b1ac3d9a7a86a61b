"""The incident timeline, built from journal lines alone (guardd.incident, guardd.render)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guardd.incident import NoIncident, build, incident_ids
from guardd.render import render_incident
from guardd.timestamps import parse_rfc3339

GUARD = "threader"
EVIDENCE = {
    "rule": "consecutive_failures",
    "threshold": 3,
    "value": 3,
    "samples": 9,
    "color": "green",
    "last_error": "HTTP 503 *down*",
}


def line(ts: str, event: str, n: int, **fields: Any) -> dict[str, Any]:
    """A journal line as guardd writes it (docs/contract.md §4)."""
    base: dict[str, Any] = {
        "ts": f"2026-11-30T{ts}Z",
        "id": f"{n:032x}",
        "event": event,
        "guard": GUARD,
        "from": None,
        "to": None,
        "reason": None,
        "severity": None,
        "by": "guardd",
    }
    return {**base, **fields}


def journal() -> list[dict[str, Any]]:
    """A promote, a warning, a rollback with an extended lock, an operator's unlock; then a
    second rollback the same day whose lock is still held."""
    rid = f"{4:032x}"
    return [
        line("09:00:00.000", "started", 1, to="blue", reason="started"),
        line(
            "10:00:00.000",
            "promote",
            2,
            **{"from": "blue", "to": "green", "by": "uid:1000(ana)", "reason": "release 4"},
        ),
        line(
            "10:00:05.000",
            "alert",
            3,
            **{"from": "green", "severity": "P2", "reason": "green p95 12s"},
            evidence={"rule": "p2_latency"},
        ),
        line(
            "10:00:08.500",
            "rollback_started",
            4,
            **{"from": "green", "to": "blue", "severity": "P0", "reason": "green fails 3 in a row"},
            evidence=EVIDENCE,
        ),
        line(
            "10:00:09.000",
            "rollback_completed",
            5,
            **{"from": "green", "to": "blue", "severity": "P0", "reason": "green fails"},
            evidence=EVIDENCE,
            rollback_id=rid,
            duration_ms=500.0,
        ),
        line(
            "10:00:09.010",
            "qos_locked",
            6,
            reason="rollback green -> blue",
            until="2026-11-30T10:05:09.010Z",
        ),
        line("10:01:00.000", "paused", 7, by="uid:1001(bo)", reason="looking into it"),
        line(
            "10:05:09.010",
            "qos_extended",
            8,
            until="2026-11-30T10:10:09.010Z",
            reason="blue 5xx 2%",
        ),
        line("10:05:09.011", "alert", 9, reason="guard window not met, lock extended"),
        line("10:07:00.000", "resumed", 10, by="uid:1001(bo)", reason="ok"),
        line("10:08:09.010", "qos_released", 11, by="uid:1001(bo)", reason="unlocked"),
        line(
            "10:30:00.000",
            "switch",
            12,
            **{"from": "blue", "to": "green", "by": "uid:1000(ana)", "reason": "release 5"},
        ),
        line(
            "10:40:00.000",
            "rollback_started",
            13,
            **{"from": "green", "to": "blue", "by": "uid:1000(ana)", "reason": "checkout 500s"},
        ),
        line(
            "10:40:01.250",
            "rollback_completed",
            14,
            **{"from": "green", "to": "blue", "by": "uid:1000(ana)", "reason": "checkout 500s"},
            rollback_id=f"{13:032x}",
            duration_ms=1250.0,
        ),
        line("10:40:01.300", "qos_locked", 15, by="uid:1000(ana)", until=None),
    ]


def test_the_first_incident_holds_every_step_with_its_durations() -> None:
    found = build(journal(), "INC-20261130-1")
    assert found["id"] == "INC-20261130-1"
    assert found["rollback_id"] == f"{4:032x}"
    assert (found["from"], found["to"], found["severity"]) == ("green", "blue", "P0")
    assert found["rule"] == "consecutive_failures"
    assert found["cause"] == "green fails 3 in a row"
    assert found["outcome"] == "recovered"
    times = found["times"]
    assert times["change"] == "2026-11-30T10:00:00.000Z"
    assert times["start"] == "2026-11-30T10:00:05.000Z"  # the P2 alert came first
    assert times["detected"] == "2026-11-30T10:00:08.500Z"
    assert times["rolled_back"] == "2026-11-30T10:00:09.000Z"
    assert times["recovered"] == "2026-11-30T10:08:09.010Z"
    spans = found["durations_s"]
    assert spans["since_change"] == 8.5
    assert spans["time_to_detect"] == 3.5
    assert spans["time_to_recover"] == 0.5
    assert spans["switch"] == 0.5
    assert spans["time_under_lock"] == 480.0
    assert spans["total"] == 484.01
    assert found["lock"]["extended"] == 1
    assert found["lock"]["released_by"] == "uid:1001(bo)"
    assert found["lock"]["until"] == "2026-11-30T10:10:09.010Z"
    kinds = [(s["event"], s["kind"]) for s in found["steps"]]
    assert kinds == [
        ("promote", "change"),
        ("alert", "evidence"),
        ("rollback_started", "decision"),
        ("rollback_completed", "switch"),
        ("qos_locked", "lock"),
        ("paused", "operator"),
        ("qos_extended", "lock"),
        ("alert", "evidence"),
        ("resumed", "operator"),
        ("qos_released", "lock"),
    ]
    assert found["steps"][0]["t_s"] == -5.0 and found["steps"][2]["t_s"] == 3.5
    json.dumps(found)  # the --json shape is plain JSON


def test_the_last_incident_by_default_still_under_lock() -> None:
    found = build(journal())
    assert found["id"] == "INC-20261130-2"
    assert found["severity"] is None and found["by"] == "uid:1000(ana)"
    assert found["times"]["change"] == "2026-11-30T10:30:00.000Z"
    # No warning before an operator's rollback: it is its own first evidence.
    assert found["times"]["start"] == found["times"]["detected"]
    assert found["durations_s"]["time_to_detect"] == 0.0
    assert found["durations_s"]["time_to_recover"] == 1.25
    assert found["durations_s"]["time_under_lock"] is None
    assert found["outcome"] == "guard_window"
    assert [s["event"] for s in found["steps"]] == [
        "switch",
        "rollback_started",
        "rollback_completed",
        "qos_locked",
    ]


def test_ids_are_stable_per_day_and_found_by_rollback_id_or_prefix() -> None:
    events = journal()
    ids = incident_ids(events)
    assert ids == {f"{4:032x}": "INC-20261130-1", f"{13:032x}": "INC-20261130-2"}
    # Later lines, even another rollback the next day, do not renumber earlier ones.
    events.append(
        line("10:00:00.000", "rollback_started", 99, **{"from": "blue", "to": "green"})
        | {"ts": "2026-12-01T00:00:01.000Z"}
    )
    assert incident_ids(events)[f"{13:032x}"] == "INC-20261130-2"
    assert incident_ids(events)[f"{99:032x}"] == "INC-20261201-1"
    assert build(events, f"{13:032x}")["id"] == "INC-20261130-2"
    assert build(events, f"{13:032x}"[-8:].rjust(32, "0")[:32])["id"] == "INC-20261130-2"
    assert build(events, "inc-20261130-1")["rollback_id"] == f"{4:032x}"


@pytest.mark.parametrize(
    ("events", "key", "message"),
    [
        ([], None, "no rollback in the journal"),
        (journal(), "INC-20261130-7", "no incident INC-20261130-7"),
        (journal(), "ffff", "no rollback 'ffff'"),
        (journal(), "0000", "ambiguous"),
    ],
)
def test_no_such_incident(events: list[dict[str, Any]], key: str | None, message: str) -> None:
    with pytest.raises(NoIncident, match=message):
        build(events, key)


def test_a_failed_rollback_and_one_in_flight() -> None:
    rid = f"{2:032x}"
    events = [
        line("11:00:00.000", "rollback_started", 2, **{"from": "green", "to": "blue"}),
        line("11:00:10.000", "rollback_failed", 3, rollback_id=rid, reason="nginx -t failed"),
        line("11:00:10.001", "hold", 4, reason="rollback green -> blue failed"),
        line("11:02:00.000", "switch", 5, by="uid:0(root)", **{"from": "green", "to": "blue"}),
        line("11:03:00.000", "alert", 6, reason="later, another matter"),
    ]
    found = build(events)
    assert found["outcome"] == "failed"
    assert found["times"]["failed"] == "2026-11-30T11:00:10.000Z"
    assert found["times"]["rolled_back"] is None
    assert found["durations_s"]["time_to_recover"] is None
    assert [s["kind"] for s in found["steps"]] == ["decision", "switch", "evidence", "operator"]
    assert build(events[:1])["outcome"] == "in_progress"


def test_torn_or_odd_lines_do_not_break_it() -> None:
    events = [
        {"event": "rollback_started", "id": "a" * 32, "ts": "not a time"},
        line("12:00:00.000", "rollback_started", 7, evidence="odd"),
    ]
    found = build(events)
    assert found["id"] == "INC-20261130-1" and found["rule"] is None
    render_incident(found)
    render_incident(found, markdown=True)


def test_text_and_markdown_hold_the_template_and_escape_what_came_from_outside() -> None:
    events = journal()
    events[3]["reason"] = "green `rm -rf` *boom*\x1b[2J"
    found = build(events, "INC-20261130-1")
    text = render_incident(found)
    markdown = render_incident(found, markdown=True)
    for rendered in (text, markdown):
        for label in ("Incident", "Start", "Detection", "Rollback", "Recovery", "Duration"):
            assert label in rendered
        assert "Cause" in rendered and "consecutive_failures" in rendered
        assert "time to detect 3.5s" in rendered
        assert "time to roll back 0.5s" in rendered
        assert "time under lock 8m00s" in rendered
        assert "\x1b" not in rendered
        assert "by uid:1001(bo)" in rendered
        assert (
            "rollback_completed green->blue P0 rule consecutive_failures by guardd "
            "(switched and verified in 0.5s)" in rendered
        )
        assert (
            "2026-11-30T10:00:00.000Z promote blue->green by uid:1000(ana): release 4" in rendered
        )
    assert "INC-20261130-1" in markdown.splitlines()[0]
    assert "\\`rm -rf\\` \\*boom\\*" in markdown
    # The cause ends with what green last answered, escaped in markdown as all else is.
    cause = next(x for x in markdown.splitlines() if "Cause" in x)
    assert "[rule=consecutive\\_failures" in cause
    assert cause.endswith("; last answer: HTTP 503 \\*down\\*"), cause
    assert next(x for x in text.splitlines() if "Cause" in x).endswith(
        "; last answer: HTTP 503 *down*"
    )
    assert "- `10:00:08.500` (+3.5s) decision - rollback_started green->blue P0" in markdown


def rolled_back(started: str, done: str, n: int, reason: str) -> list[dict[str, Any]]:
    """guardd's P0 rollback green -> blue: its `rollback_started` (id `n`) at `started` and
    its `rollback_completed` (id `n + 1`) at `done`."""
    took = (parse_rfc3339(f"2026-11-30T{done}Z") - parse_rfc3339(f"2026-11-30T{started}Z")) * 1000
    return [
        line(
            started,
            "rollback_started",
            n,
            **{"from": "green", "to": "blue", "severity": "P0", "reason": reason},
        ),
        line(
            done, "rollback_completed", n + 1, rollback_id=f"{n:032x}", duration_ms=round(took, 1)
        ),
    ]


def test_an_episode_an_operator_resumed_from_is_not_the_start() -> None:
    """A hold since resolved (an operator's `resumed`) is an earlier episode, not this start."""
    events = [
        line("11:00:00.000", "promote", 20, **{"from": "blue", "to": "green", "reason": "r6"}),
        line("11:00:02.000", "hold", 21, **{"from": "green", "severity": "P0", "reason": "typo"}),
        line("11:03:00.000", "resumed", 22, by="uid:1000(ana)", reason="url fixed"),
        line("11:04:00.000", "alert", 23, **{"from": "green", "severity": "P2", "reason": "slow"}),
        *rolled_back("11:04:05.000", "11:04:05.500", 24, "503s"),
    ]
    incident = build(events)
    assert incident["times"]["start"] == "2026-11-30T11:04:00.000Z"
    assert incident["durations_s"]["time_to_detect"] == 5.0
    assert incident["times"]["change"] == "2026-11-30T11:00:00.000Z"  # the change stays


def test_what_failed_while_guardd_was_paused_is_the_start() -> None:
    """A `resumed` that ends a pause acknowledges nothing: the failure that went on through
    the pause is this incident's start, and its steps hold the pause's lock and the resume."""
    events = [
        line("12:00:00.000", "paused", 30, by="uid:1000(ana)", reason="testing pause"),
        line(
            "12:00:00.445",
            "alert",
            31,
            **{"from": "green", "severity": "P2", "reason": "5xx-p2"},
            evidence={"rule": "5xx-p2"},
        ),
        line(
            "12:00:06.471",
            "qos_locked",
            32,
            reason="guardd is paused while green fails: P0 5xx-p0",
            until=None,
        ),
        line("12:00:18.179", "resumed", 33, by="uid:1000(ana)", reason="go on"),
        line("12:00:18.180", "qos_released", 34, reason="the pause ended"),
        *rolled_back("12:00:18.181", "12:00:18.400", 35, "5xx 95 %"),
    ]
    incident = build(events)
    assert incident["times"]["start"] == "2026-11-30T12:00:00.445Z"
    assert incident["durations_s"]["time_to_detect"] == 17.736
    steps = [(s["event"], s["kind"]) for s in incident["steps"]]
    assert steps == [
        ("alert", "evidence"),
        ("qos_locked", "lock"),
        ("resumed", "operator"),
        ("qos_released", "lock"),
        ("rollback_started", "decision"),
        ("rollback_completed", "switch"),
    ]


def test_an_operators_rollback_with_no_evidence_before_it_says_so_as_its_start() -> None:
    events = journal()
    guardds = render_incident(build(events, "INC-20261130-1"))
    operators = render_incident(build(events, "INC-20261130-2"))
    assert "10:00:05.000Z (first failing evidence)" in guardds
    assert (
        "10:40:00.000Z (the rollback by uid:1000(ana): no failing evidence before it)" in operators
    )
    assert "first failing evidence" not in operators
