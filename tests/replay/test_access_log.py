"""`guardd replay` reads an access log where nginx left it, rotated and compressed, and
judges each request at its own time."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guardd.journal import Journal
from guardd.timestamps import parse_rfc3339, rfc3339
from tests.replay.history import Timeline, config, decisions, replay, replay_json
from tests.signals.access_log_lib import BLUE, GREEN, line

HOUR = 3600
RATE = 20  # requests a second, all to green (the active color)
BURST = (1800.0, 2100.0)  # seconds into the hour: 5 minutes of 8 % 5xx on green


def _log_hour(where: Path, t0: float) -> int:
    """An hour of green's traffic in `access.log.2.gz` (the first 20 minutes), `access.log.1`
    and `access.log` (the last 20), as logrotate leaves them; returns the line count."""
    where.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = [[], [], []]
    n = 0
    for i in range(HOUR * RATE):
        at = i / RATE
        in_burst = BURST[0] <= at < BURST[1]
        # 2 in 25 requests fail during the burst: exactly 8 %.
        status = "502" if in_burst and i % 25 < 2 else "200"
        parts[min(2, int(at // 1200))].append(line(GREEN, status, msec=t0 + at))
        n += 1
    with gzip.open(where / "access.log.2.gz", "wt") as f:
        f.writelines(parts[0])
    (where / "access.log.1").write_text("".join(parts[1]))
    (where / "access.log").write_text("".join(parts[2]))
    return n


def _signal(logs: Path, above: float) -> str:
    return f"""
[signals.traffic]
kind = "access_log"
source = "file:{logs}/access.log"
addresses = {{ blue = ["{BLUE}"], green = ["{GREEN}"] }}
window = "60s"

[[rules]]
name = "errors"
signal = "traffic"
stat = "error_ratio"
above = {above}
severity = "P2"
min_samples = 50
"""


def _two_runs(
    state: Path, ended: str, *, down_s: float, second_s: int
) -> tuple[float, float, float, float]:
    """Two minutes of a run with probe rounds every second; then down for `down_s` (its
    `stop` record written when `ended` is "stopped", none when "killed"); then a second
    run of `second_s` seconds. The wall times (start, stopped, started again, end)."""
    tl = Timeline(state)
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(120, interval=1.0)
    stopped = tl.wall
    if ended == "stopped":
        tl.recorder.stop()
    tl.tick(down_s)
    started = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(second_s, interval=1.0)
    tl.close()
    return t0, stopped, started, tl.wall


def _green_log(logs: Path, t0: float, end: float, *, fails: Callable[[float], bool]) -> Path:
    """`RATE` requests a second to green from `t0` to `end` in `logs/access.log`, a 502
    where `fails(t)`, else a 200; returns `logs`."""
    logs.mkdir()
    lines = [
        line(GREEN, "502" if fails(t0 + i / RATE) else "200", msec=t0 + i / RATE)
        for i in range(int((end - t0) * RATE))
    ]
    (logs / "access.log").write_text("".join(lines))
    return logs


def _probed(state: Path, seconds: int) -> float:
    """A run of `seconds` probe rounds at 1 s, recorded in `state`; its first wall time."""
    tl = Timeline(state)
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(seconds, interval=1.0)
    tl.close()
    return t0


@pytest.fixture
def hour(tmp_path: Path) -> tuple[Path, float, int]:
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(HOUR, interval=1.0)
    tl.close()
    n = _log_hour(tmp_path / "logs", t0)
    return tmp_path, t0, n


def test_an_error_ratio_rule_fires_within_the_burst_and_a_higher_one_never(
    hour: tuple[Path, float, int],
) -> None:
    tmp, t0, n = hour
    cfg = config(
        tmp, tmp / "state", extra=_signal(tmp / "logs", 0.05), interval="1s", qos_window="10s"
    )
    doc = replay_json("--config", str(cfg))
    fired = [d for d in decisions(doc, "alert") if d["rule"] == "errors"]
    assert len(fired) == 1, doc["configs"][0]["decisions"]
    at = parse_rfc3339(fired[0]["at"]) - t0
    # Within the burst, once the 60 s window holds more than 5 % of errors (about 38 s in).
    assert BURST[0] + 30 <= at <= BURST[0] + 45, at
    assert fired[0]["color"] == "green"
    assert fired[0]["evidence"]["value"] > 0.05
    # Every line of the three files was read and counted, none skipped.
    src = doc["sources"]["traffic"]
    assert src["lines"]["ok"] == n
    assert src["lines"]["unparsed"] == src["lines"]["oversize"] == src["lines"]["shed"] == 0
    assert [Path(f).name for f in src["files"]] == ["access.log.2.gz", "access.log.1", "access.log"]
    assert doc["configs"][0]["decisions"] == fired  # nothing else happened
    # New lines wake a tick every quarter second (the daemon's signal pulse), besides the
    # tick of each probe round: the rule is judged as often as live.
    assert doc["configs"][0]["ticks"] >= HOUR * 4 - 10
    # The same history with the threshold at 10 %: the rule never fires.
    higher = replay_json("--config", str(cfg), "--set", "rules.0.above=0.10")
    assert [d for d in higher["configs"][0]["decisions"] if d["rule"] == "errors"] == []
    assert higher["configs"][0]["summary"]["alerts"] == 0
    text = replay("--config", str(cfg), "--set", "rules.0.above=0.10")
    assert "No decision" in text.stdout
    assert "signal traffic (access_log): from its files" in text.stdout


def test_lines_stamped_ahead_never_carry_the_lines_after_them_out_of_the_history(
    hour: tuple[Path, float, int],
) -> None:
    """Before the burst, one line a day ahead, one in the year 5138, and a run of five an
    hour ahead (a clock that jumped on the nginx host): the rule fires in the burst as it
    does without them, every line is counted, and the report says what was placed how."""
    tmp, t0, n = hour
    log = tmp / "logs" / "access.log.1"
    lines = log.read_text().splitlines(keepends=True)
    ahead = [line(GREEN, "200", msec=t0 + 1300 + 86_400), line(GREEN, "200", msec=99999999999.0)]
    run = [line(GREEN, "200", msec=t0 + 1500 + HOUR + i) for i in range(5)]
    log.write_text("".join(lines[:2000] + ahead + lines[2000:8000] + run + lines[8000:]))
    cfg = config(
        tmp, tmp / "state", extra=_signal(tmp / "logs", 0.05), interval="1s", qos_window="10s"
    )
    doc = replay_json("--config", str(cfg))
    [fired] = [d for d in decisions(doc, "alert") if d["rule"] == "errors"]
    assert BURST[0] + 30 <= parse_rfc3339(fired["at"]) - t0 <= BURST[0] + 45, fired
    src = doc["sources"]["traffic"]
    assert src["lines"]["ok"] == n + 7 and src["outside_history"] == 0, src
    assert src["ahead_lines"] == 7
    text = replay("--config", str(cfg)).stdout
    assert "7 line(s) stamped ahead of the lines written after them" in text


@pytest.mark.parametrize("ended", ["stopped", "killed"])
def test_a_restarted_daemons_windows_start_empty(tmp_path: Path, ended: str) -> None:
    """Two minutes of good traffic, a restart (clean, or killed), then every request to
    green fails: the rule fires on the lines since the restart alone (about min_samples of
    them), as the daemon started again reads the log from its end into fresh windows; the
    lines of the run before never dilute the ratio."""
    t0, _, started, end = _two_runs(tmp_path / "state", ended, down_s=3.0, second_s=60)
    logs = _green_log(tmp_path / "logs", t0, end, fails=lambda t: t >= started)
    cfg = config(
        tmp_path, tmp_path / "state", interval="1s", qos_window="10s", extra=_signal(logs, 0.5)
    )
    doc = replay_json("--config", str(cfg))
    fired = decisions(doc, "alert")
    assert fired, doc["configs"][0]["decisions"]
    evidence = fired[0]["evidence"]
    assert evidence["samples"] < 4 * RATE and evidence["value"] > 0.5, evidence
    assert parse_rfc3339(fired[0]["at"]) - started < 5.0, fired[0]


def test_a_p0_traffic_rule_rolls_back_at_the_burst(hour: tuple[Path, float, int]) -> None:
    tmp, t0, _ = hour
    extra = _signal(tmp / "logs", 0.05).replace('severity = "P2"', 'severity = "P0"')
    cfg = config(tmp, tmp / "state", extra=extra, interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    [rb] = decisions(doc, "rollback_completed")
    assert (rb["color"], rb["to"], rb["rule"]) == ("green", "blue", "errors")
    assert BURST[0] <= parse_rfc3339(rb["at"]) - t0 <= BURST[1]


def test_an_access_log_that_is_not_there_is_said_and_its_rules_say_nothing(
    hour: tuple[Path, float, int],
) -> None:
    tmp, _, _ = hour
    extra = _signal(tmp / "nowhere", 0.05).replace('severity = "P2"', 'severity = "P0"')
    cfg = config(tmp, tmp / "state", extra=extra, interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["replayed"] is None
    assert src["why"] == f"no file at {tmp / 'nowhere' / 'access.log'} (nor rotated beside it)"
    assert decisions(doc, "rollback_completed") == []
    said = [d["reason"] for d in decisions(doc, "alert")]
    assert any("signal traffic gives nothing: cannot be replayed" in r for r in said), said


def test_lines_over_the_budget_are_named_and_explained(hour: tuple[Path, float, int]) -> None:
    tmp, _, _ = hour
    extra = _signal(tmp / "logs", 0.05).replace(
        'window = "60s"', 'window = "60s"\nmax_lines_per_s = 5'
    )
    cfg = config(tmp, tmp / "state", extra=extra, interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    assert doc["sources"]["traffic"]["lines"]["shed"] > 0
    text = replay("--config", str(cfg)).stdout
    assert "shed" not in text
    assert "over budget " in text
    assert "over budget: lines beyond the signal's max_lines_per_s in their second" in text


@pytest.mark.parametrize("ended", ["stopped", "killed"])
def test_nothing_is_decided_while_the_daemon_was_stopped(tmp_path: Path, ended: str) -> None:
    """A run that ended with a clean stop (its `stop` record), or killed (no `stop`: it
    was down from its last record), decides nothing until the next run starts, whatever
    the access log holds meanwhile: the daemon was not there to read it, and started
    again it reads the log from its end."""
    t0, stopped, started, end = _two_runs(tmp_path / "state", ended, down_s=40.0, second_s=120)
    # Every request to green fails while guardd is down, none otherwise.
    logs = _green_log(tmp_path / "logs", t0, end, fails=lambda t: stopped <= t < started)
    cfg = config(
        tmp_path, tmp_path / "state", interval="1s", qos_window="10s", extra=_signal(logs, 0.5)
    )
    doc = replay_json("--config", str(cfg))
    # (Killed, the stretch to the next start is also a gap: records may have been lost.)
    assert len(doc["history"]["gaps"]) == (ended == "killed")
    assert doc["history"]["runs"] == 2
    assert doc["configs"][0]["decisions"] == [], doc["configs"][0]["decisions"]
    # The lines of the stretch it was down are counted, and said why they were not fed.
    outside = doc["sources"]["traffic"]["outside_history"]
    assert outside >= 40 * RATE, doc["sources"]["traffic"]
    text = replay("--config", str(cfg)).stdout
    assert f"{outside} line(s)/sample(s) not replayed: outside the recorded history" in text
    assert "while the daemon was down)" in text
    # Not vacuous: the same lines while the daemon ran fire the rule.
    tl = Timeline(tmp_path / "state2", wall=t0)
    tl.start(active="green", interval=1.0)
    tl.rounds(int(started + 120 - t0), interval=1.0)
    tl.close()
    cfg = config(
        tmp_path, tmp_path / "state2", interval="1s", qos_window="10s", extra=_signal(logs, 0.5)
    )
    fired = decisions(replay_json("--config", str(cfg)), "alert")
    assert fired and stopped <= parse_rfc3339(fired[0]["at"]) <= started + 1.0, fired


def _stepped(
    tmp: Path, step_s: float, *, rotated: bool = False, phase: float = 0.0
) -> tuple[dict[str, Any], float]:
    """Four minutes of probe rounds at 0.5 s and of green's traffic, 20 % of it failing
    from 60 s on; at 40 s the host's wall clock is stepped by `step_s` (NTP, by hand), for
    the records and nginx's lines alike (the log rotated there when `rotated`: the lines
    before the step in `access.log.1`); the requests `phase` seconds after the records'
    rounds. The JSON report and the first wall time."""
    state = tmp / f"state{step_s:+g}"
    tl = Timeline(state)
    t0 = tl.wall
    tl.start(active="green", interval=0.5)
    tl.rounds(80, interval=0.5)
    tl.wall += step_s
    tl.rounds(400, interval=0.5)
    tl.close()
    logs = tmp / f"logs{step_s:+g}"
    logs.mkdir()
    lines = []
    for i in range(240 * RATE):
        m = i / RATE
        status = "502" if m >= 60 and i % 5 == 0 else "200"
        # (Request times vary, as real ones do: the lines after a step back, stamped as
        # lines before it were, are new requests, none alike to the byte to an older one.)
        rt = f"{0.005 + (i % 7) / 1000:.3f}"
        at = t0 + phase + m + (step_s if m >= 40 else 0.0)
        lines.append(line(GREEN, status, msec=at, rt=rt))
    cut = 40 * RATE if rotated else 0
    (logs / "access.log").write_text("".join(lines[cut:]))
    if rotated:
        (logs / "access.log.1").write_text("".join(lines[:cut]))
    cfg = config(tmp, state, interval="500ms", qos_window="10s", extra=_signal(logs, 0.05))
    return replay_json("--config", str(cfg)), t0


@pytest.mark.parametrize(
    ("step_s", "rotated", "phase"),
    [(-600.0, False, 0.0), (-120.0, False, 0.0), (-60.0, False, 0.0), (-31.0, False, 0.0),
     (-5.0, False, 0.0), (600.0, False, 0.0), (-600.0, True, 0.0), (-120.0, True, 0.0),
     (-31.0, False, 0.3), (-8.0, False, 0.3), (-120.0, False, 0.3), (-120.0, True, 0.3)],
)  # fmt: skip
def test_a_wall_clock_stepped_on_the_host_moves_no_line_from_its_moment(
    tmp_path: Path, step_s: float, rotated: bool, phase: float
) -> None:
    """The records and the log lines after a step carry the stepped clock: each line is
    judged where it was written, as the daemon reading it live does, so the rule fires at
    the same moment of the burst as without the step, and no line falls outside; also
    when the log was rotated at the step (the files are read in their names' order: the
    newer file's lines are all before the older one's, never within them), and whatever
    the requests' phase to the records' rounds (before: the last slot before the step,
    ending after the old clock's last record, held every line after it until the stepped
    records reached its time, and they were late)."""
    plain, t0 = _stepped(tmp_path, 0.0, phase=phase)
    [expected] = decisions(plain, "alert")
    doc, _ = _stepped(tmp_path, step_s, rotated=rotated, phase=phase)
    fired = decisions(doc, "alert")
    assert len(fired) == 1, doc["configs"][0]["decisions"]
    moment = parse_rfc3339(fired[0]["at"]) - step_s - t0
    assert abs(moment - (parse_rfc3339(expected["at"]) - t0)) <= 1.0, (fired, expected)
    src = doc["sources"]["traffic"]
    # (With a phase, the last lines come after the last round: outside, step or not.)
    outside = plain["sources"]["traffic"]["outside_history"]
    assert outside <= phase * RATE + 1, outside
    assert src["outside_history"] == outside and src["lines"]["ok"] == 240 * RATE - outside, src


def test_a_color_an_operator_moves_traffic_to_is_judged_by_its_requests_from_then_on(
    tmp_path: Path,
) -> None:
    """Green's 502s roll it back (a P0 traffic rule over 60 s); it is fixed and an operator
    switches back to it 30 s later, its 502s still in the window: it is judged by the
    requests it serves after the switch, never rolled back again at once on those before."""
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(60, interval=1.0)
    tl.recorder.switch("blue", "green", by="uid:0(root)", reason="fixed", event="switch")
    switched = tl.wall
    tl.rounds(60, interval=1.0)
    tl.close()
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = []
    for i in range(120 * RATE):
        t = i / RATE
        if 30 <= t < 40:
            lines.append(line(GREEN, "502", msec=t0 + t))
        elif 40 <= t < 60:
            lines.append(line(BLUE, "200", msec=t0 + t))
        else:
            lines.append(line(GREEN, "200", msec=t0 + t))
    (logs / "access.log").write_text("".join(lines))
    rule = _signal(logs, 0.2).replace('severity = "P2"', 'severity = "P0"')
    cfg = config(tmp_path, tmp_path / "state", interval="1s", qos_window="10s", extra=rule)
    doc = replay_json("--config", str(cfg))
    [rb] = decisions(doc, "rollback_completed")
    assert 30 <= parse_rfc3339(rb["at"]) - t0 <= 40 and rb["rule"] == "errors", rb
    [moved] = decisions(doc, "switch")
    assert moved["to"] == "green" and abs(parse_rfc3339(moved["at"]) - switched) <= 1.0, moved
    after = [d for d in doc["configs"][0]["decisions"] if parse_rfc3339(d["at"]) > switched]
    assert not [d for d in after if d["event"] in ("rollback_started", "rollback_completed")], after


def test_a_burst_appended_late_to_the_log_is_counted_late_never_silently_lost(
    tmp_path: Path,
) -> None:
    """Ten minutes of green's traffic, then a 5xx burst of a minute before appended at the
    log's end (lines written out of order). Read as the daemon reads them, when they were
    written, their requests ended before the window began: no evidence of then, and each
    is counted `late`, in the JSON and the text, never dropped unsaid."""
    state = tmp_path / "state"
    t0 = _probed(state, 900)
    logs = _green_log(tmp_path / "logs", t0, t0 + 600, fails=lambda _t: False)
    burst = [line(GREEN, "502", msec=t0 + 300 + i / RATE) for i in range(60 * RATE)]
    with (logs / "access.log").open("a") as f:
        f.writelines(burst)
    cfg = config(tmp_path, state, extra=_signal(logs, 0.05), interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    lines = doc["sources"]["traffic"]["lines"]
    assert lines["late"] == len(burst), lines
    assert lines["ok"] == 600 * RATE, lines
    text = replay("--config", str(cfg)).stdout
    assert f"late (ended before the window) {len(burst)}" in text, text


@pytest.mark.parametrize("late_s", [5.0, 30.0])
def test_lines_written_late_among_the_others_pull_no_later_line_back(
    tmp_path: Path, late_s: float
) -> None:
    """One line in ten reaches the log `late_s` after its request ended (a buffered log,
    several workers): the lines after it are back on the log's own clock, not stamped
    ahead; none is placed before its time, so no window holds more requests than the
    traffic had (20 a second over the 60 s window), and none is counted ahead."""
    state = tmp_path / "state"
    t0 = _probed(state, 600)
    logs = tmp_path / "logs"
    logs.mkdir()
    n = 500 * RATE
    stamps = [t0 + i / RATE for i in range(n)]
    written = sorted(
        (t + (late_s if i % 10 == 0 else 0.0), t) for i, t in enumerate(stamps)
    )  # in the order written; each line keeps its request's time
    (logs / "access.log").write_text(
        "".join(line(GREEN, "502" if 200 <= t - t0 < 260 else "200", msec=t) for _, t in written)
    )
    cfg = config(tmp_path, state, extra=_signal(logs, 0.05), interval="1s", qos_window="10s")
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["ahead_lines"] == 0, src
    [fired] = [d for d in decisions(doc, "alert") if d["rule"] == "errors"]
    assert fired["evidence"]["samples"] <= 60 * RATE + RATE, fired["evidence"]
    assert src["lines"]["ok"] + src["lines"]["late"] == n, src


@pytest.mark.parametrize("ahead_s", [60.0, 3600.0, -10.0, -100.0, -3600.0])
def test_one_line_stamped_ahead_after_a_quiet_start_loses_no_line_and_no_decision(
    tmp_path: Path, ahead_s: float
) -> None:
    """A request, 10 s of quiet, then 20 a second with a 5xx burst; one line among them
    stamped `ahead_s` ahead (or back). The replay decides as over the clean log: the line
    is counted ahead (or, far back, late; stamped before the history, outside it), and no
    other line is moved or left out."""
    state = tmp_path / "state"
    t0 = _probed(state, 600)
    stamps = [t0 + 1.0] + [t0 + 11.0 + i / RATE for i in range(500 * RATE)]
    results = {}
    for glitch in (False, True):
        logs = tmp_path / f"logs-{glitch}"
        logs.mkdir()
        lines = [line(GREEN, "502" if 300 <= t - t0 < 360 else "200", msec=t) for t in stamps]
        if glitch:
            lines.insert(2000, line(GREEN, "200", msec=stamps[1999] + ahead_s))
        (logs / "access.log").write_text("".join(lines))
        cfg = config(tmp_path, state, extra=_signal(logs, 0.05), interval="1s", qos_window="10s")
        results[glitch] = replay_json("--config", str(cfg))
    clean, glitched = results[False], results[True]
    assert glitched["configs"][0]["decisions"] == clean["configs"][0]["decisions"]
    assert decisions(clean, "alert"), clean["configs"][0]["decisions"]  # not vacuous
    src = glitched["sources"]["traffic"]
    before = int(stamps[1999] + ahead_s < t0)  # stamped before the history's first record
    late = int(ahead_s < -60.0) - before  # older than the 60 s window when written
    assert src["ahead_lines"] == int(ahead_s > 0) and src["lines"]["late"] == late, src
    ok = clean["sources"]["traffic"]["lines"]["ok"] + 1 - late - before
    assert src["lines"]["ok"] == ok, src
    assert src["outside_history"] == clean["sources"]["traffic"]["outside_history"] + before


def test_compare_says_what_each_config_read_of_the_log(hour: tuple[Path, float, int]) -> None:
    """`--compare` with a config whose signal reads the log otherwise (its addresses name
    another green): each config's own counts are in its `sources`, and the text says B's
    where they differ from A's."""
    tmp, _, n = hour
    a = config(
        tmp, tmp / "state", extra=_signal(tmp / "logs", 0.05), interval="1s", qos_window="10s"
    )
    other = _signal(tmp / "logs", 0.05).replace(f'green = ["{GREEN}"]', 'green = ["10.9.9.9:1"]')
    (tmp / "b").mkdir()
    b = config(tmp / "b", tmp / "state", extra=other, interval="1s", qos_window="10s")
    doc = replay_json("--config", str(a), "--compare", str(b))
    mine, theirs = (c["sources"]["traffic"]["lines"] for c in doc["configs"])
    assert doc["sources"] == doc["configs"][0]["sources"]
    assert mine["ok"] == n and not mine["unattributed"], mine
    assert theirs["unattributed"] == n, theirs
    text = replay("--config", str(a), "--compare", str(b)).stdout
    assert "  as [B] read them (its own signals):" in text
    assert f"unattributed {n}" in text


def _ten_minutes(tmp: Path) -> tuple[Path, list[str]]:
    """Ten minutes of probe rounds and of green's traffic at 20 requests a second, 5xx for
    a minute in the middle, the lines as one list; returns the config (P0 at 5 %)."""
    t0 = _probed(tmp / "state", 600)
    lines = [
        line(GREEN, "502" if 300 <= i / RATE < 360 and i % 4 == 0 else "200", msec=t0 + i / RATE)
        for i in range(600 * RATE)
    ]
    (tmp / "logs").mkdir()
    extra = _signal(tmp / "logs", 0.05).replace('severity = "P2"', 'severity = "P0"')
    return config(tmp, tmp / "state", extra=extra, interval="1s", qos_window="10s"), lines


def _rotated(lines: list[str], logs: Path, at_s: int) -> int:
    """`lines` rotated `at_s` seconds in: `access.log.1` before, `access.log` after, as
    logrotate leaves them; returns the line the rotation cut at."""
    cut = at_s * RATE
    (logs / "access.log.1").write_text("".join(lines[:cut]))
    (logs / "access.log").write_text("".join(lines[cut:]))
    return cut


@pytest.mark.parametrize("alike", [False, True], ids=["distinct", "alike pairs"])
@pytest.mark.parametrize(
    "how", ["overlap", "plain and gzip", "copied under another name", "copied as the oldest"]
)
def test_lines_found_twice_across_rotated_files_are_read_once(
    tmp_path: Path, how: str, alike: bool
) -> None:
    """The same lines in two rotated files: a file beginning with the last lines of the one
    before it (a copy of a rotation made by hand), a rotation both plain and compressed
    (gzip cut short leaves both), or a rotation copied under another rotation's name. They
    are read once: the counts and decisions of the log read once, what was left out said.
    Also when one request in three is logged twice alike, in the same millisecond (a busy
    nginx): each alike pair is two requests, and a copy of it is no new one."""
    cfg, lines = _ten_minutes(tmp_path)
    if alike:
        lines = [x for i, x in enumerate(lines) for _ in range(2 if i % 3 == 0 else 1)]
    logs = tmp_path / "logs"
    cut = _rotated(lines, logs, 330)  # within the 5xx minute
    once = replay_json("--config", str(cfg))
    src = once["sources"]["traffic"]
    assert src["lines"]["ok"] == len(lines) and src["repeated_lines"] == 0
    [rb] = decisions(once, "rollback_completed")
    if how == "overlap":
        (logs / "access.log").write_text("".join(lines[cut - 40 :]))
    elif how == "plain and gzip":
        with gzip.open(logs / "access.log.1.gz", "wt") as f:
            f.writelines(lines[:cut])
    elif how == "copied under another name":
        with gzip.open(logs / "access.log.2.gz", "wt") as f:
            f.writelines(lines[:cut])
    else:  # `.1` copied as `.3`, older by its name than a real `.2`
        (logs / "access.log.2").write_text("".join(lines[: 100 * RATE]))
        (logs / "access.log.1").write_text("".join(lines[100 * RATE : cut]))
        (logs / "access.log.3").write_text("".join(lines[100 * RATE : cut]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["lines"] == once["sources"]["traffic"]["lines"]
    assert src["outside_history"] == src["out_of_order_lines"] == 0
    assert doc["configs"][0]["decisions"] == once["configs"][0]["decisions"]
    assert decisions(doc, "rollback_completed") == [rb]
    if how == "overlap":
        assert src["repeated_lines"] == 40
        said = f"{logs / 'access.log'}: its first 40 line(s) repeat the last of "
        said += str(logs / "access.log.1")
    elif how == "plain and gzip":
        # (Read in the order said: the plain file, then the compressed one.)
        names = ["access.log.1", "access.log.1.gz", "access.log"]
        assert [Path(f).name for f in src["files"]] == names
        assert src["repeated_lines"] == cut
        said = f"{logs / 'access.log.1.gz'}: access.log.1 is there too, the same rotation"
    elif how == "copied under another name":
        # (Read right after the newest name: what only one of them held would be read.)
        names = ["access.log.1", "access.log.2.gz", "access.log"]
        assert [Path(f).name for f in src["files"]] == names
        assert src["repeated_lines"] == cut
        said = f"{logs / 'access.log.2.gz'}: begins as access.log.1 does (the same first lines"
    else:
        # (Read after the newest name: read as `.3`, the copy came before `.2`, whose
        # lines were then late.)
        names = ["access.log.2", "access.log.1", "access.log.3", "access.log"]
        assert [Path(f).name for f in src["files"]] == names
        assert src["repeated_lines"] == cut - 100 * RATE
        said = f"{logs / 'access.log.3'}: begins as access.log.1 does (the same first lines"
        assert not any(" ends: no line between" in p for p in src["problems"]), src["problems"]
    assert any(p.startswith(said) for p in src["problems"]), src["problems"]
    if not alike and how == "copied as the oldest":  # (the text once: a copy of its own)
        text = replay("--config", str(cfg)).stdout
        assert (
            f"    {src['repeated_lines']} line(s) read once: the same lines found twice (a copy "
            "of a rotation or of a file's own lines: see below)\n"
        ) in text, text


def test_a_plain_rotation_cut_mid_line_beside_its_gzip_loses_no_request_on_any_run(
    tmp_path: Path,
) -> None:
    """Three requests logged in each millisecond slot (distinct by their times to answer),
    `access.log.1` cut in the middle of a line beside the whole `access.log.1.gz`. Every
    request is read once, whichever process replays it: the lines read twice are found by
    a sample that is the same in every process (a string's `hash` is seeded anew in each),
    and a request stamped in the very millisecond the plain file was cut at is new unless
    that file ended with it."""
    t0 = _probed(tmp_path / "state", 600)
    lines = [
        line(GREEN, "200", msec=t0 + (i // 3) * 0.05, rt=f"0.{i % 3 + 1:03d}")
        for i in range(600 * RATE * 3)
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    cut = 300 * RATE * 3
    (logs / "access.log").write_text("".join(lines[cut:]))
    with gzip.open(logs / "access.log.1.gz", "wt") as f:
        f.writelines(lines[:cut])
    # Cut within the third request of a millisecond slot: the two before it are whole.
    k = cut // 2 + 2 - (cut // 2) % 3
    head = "".join(lines[:k]).encode()
    (logs / "access.log.1").write_bytes(head + lines[k].encode()[:17])
    cfg = config(
        tmp_path, tmp_path / "state", extra=_signal(logs, 0.05), interval="1s", qos_window="10s"
    )
    seen = set()
    for seed in ("0", "1", "2", "3"):
        done = replay("--config", str(cfg), "--json", env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        src = json.loads(done.stdout)["sources"]["traffic"]
        assert src["lines"]["ok"] == len(lines), (seed, src["lines"])
        seen.add(json.dumps(src, sort_keys=True))
    assert len(seen) == 1, "the same report on every run"


@pytest.mark.parametrize("plain", ["emptied", "cut short"])
def test_a_rotation_plain_and_compressed_is_read_whole_from_the_two(
    tmp_path: Path, plain: str
) -> None:
    """`access.log.1` beside a whole `access.log.1.gz`, the plain file emptied (`: >`) or
    cut short: every line is read, once (before: the plain file alone was read, the
    compressed one's lines lost, a rollback 3 s early on what was left)."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    cut = _rotated(lines, logs, 330)
    whole = replay_json("--config", str(cfg))
    with gzip.open(logs / "access.log.1.gz", "wt") as f:
        f.writelines(lines[:cut])
    kept = 0 if plain == "emptied" else 100 * RATE
    (logs / "access.log.1").write_text("".join(lines[:kept]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["lines"] == whole["sources"]["traffic"]["lines"], src
    assert src["repeated_lines"] == kept and src["holes"] == [], src
    assert doc["configs"][0]["decisions"] == whole["configs"][0]["decisions"]


@pytest.mark.parametrize("copy", ["access.log.5", "access.log.5.gz"])
def test_a_copy_longer_than_its_cut_original_loses_no_line(tmp_path: Path, copy: str) -> None:
    """A rotation copied under another name, then the original cut short (a disk filled
    while it was written): the copy holds lines the original lost. Every line is read,
    once: the same counts and decisions as the rotation whole (before: the copy was left
    unread, its lines lost, a hole made)."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    cut = _rotated(lines, logs, 330)
    whole = replay_json("--config", str(cfg))
    if copy.endswith(".gz"):
        with gzip.open(logs / copy, "wt") as f:
            f.writelines(lines[:cut])
    else:
        (logs / copy).write_text("".join(lines[:cut]))
    (logs / "access.log.1").write_text("".join(lines[: 200 * RATE]))  # cut short
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["lines"] == whole["sources"]["traffic"]["lines"], src
    assert src["repeated_lines"] == 200 * RATE and src["holes"] == [], src
    assert doc["configs"][0]["decisions"] == whole["configs"][0]["decisions"]


@pytest.mark.parametrize(
    "how", ["all but its first line, as the oldest", "its middle, as the oldest", "at the head"]
)
def test_lines_copied_from_a_rotation_anywhere_in_another_are_read_once(
    tmp_path: Path, how: str
) -> None:
    """Part of a rotation copied into another file (`tail -n +2 access.log.1 >
    access.log.2`, a stretch of its middle, or the whole of it before the current file's
    own lines): wherever the copy begins and ends, its lines are read once, counted and
    said, and no decision moves (before: read twice, as late)."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    cut = _rotated(lines, logs, 330)
    once = replay_json("--config", str(cfg))
    if how == "all but its first line, as the oldest":
        copied = lines[1:cut]
        (logs / "access.log.2").write_text("".join(copied))
    elif how == "its middle, as the oldest":
        copied = lines[100 * RATE : 200 * RATE]
        (logs / "access.log.2").write_text("".join(copied))
    else:  # (from its first line: the file itself is left unread, as a copy)
        copied = lines[100 * RATE : cut]
        (logs / "access.log").write_text("".join(lines[100 * RATE :]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    counts = src["lines"]
    assert src["repeated_lines"] == len(copied), src
    assert counts == once["sources"]["traffic"]["lines"], src
    assert src["outside_history"] == src["out_of_order_lines"] == 0, src
    assert doc["configs"][0]["decisions"] == once["configs"][0]["decisions"]
    # (Read after the file it was copied from, whatever its name.)
    copy = "access.log" if how == "at the head" else "access.log.2"
    said = f"{logs / copy}: {len(copied)} line(s) read before (the same lines: a copy of a "
    assert any(p.startswith(said) for p in src["problems"]), src["problems"]


@pytest.mark.parametrize("how", ["whole", "a stretch of it", "three seconds of it, later"])
def test_a_log_holding_its_own_lines_again_reads_them_once(tmp_path: Path, how: str) -> None:
    """A log appended to itself (`cat access.log access.log`), or holding a stretch of its
    lines again further on (a shipper that sent them twice): those read again are left out,
    counted and said, and the replay is the one of the log read once. The one line stamped
    at the very time the log had reached is taken for a request alike to it (alike lines at
    one time are requests alike), and read."""
    cfg, lines = _ten_minutes(tmp_path)
    log = tmp_path / "logs" / "access.log"
    log.write_text("".join(lines))
    once = replay_json("--config", str(cfg))
    if how == "whole":
        log.write_text("".join(lines + lines))
        again = len(lines)
    elif how == "a stretch of it":
        i, j = 100 * RATE, 130 * RATE
        log.write_text("".join(lines[:j] + lines[i:j] + lines[j:]))
        again = j - i
    else:  # (its last line below the time the log reached: each line of it left out)
        i, j, k = 20 * RATE, 23 * RATE, 40 * RATE
        log.write_text("".join(lines[:k] + lines[i:j] + lines[k:]))
        again = j - i
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    alike = 0 if how.endswith("later") else 1  # (the line at the very time reached)
    assert src["repeated_lines"] == again - alike, src
    assert src["out_of_order_lines"] == src["outside_history"] == 0, src
    counts = dict(src["lines"], ok=src["lines"]["ok"] - alike)
    assert counts == once["sources"]["traffic"]["lines"], src
    assert doc["configs"][0]["decisions"] == once["configs"][0]["decisions"]
    said = f"{log}: {again - alike} line(s) read before (the same lines: a copy of a rotation or "
    assert any(p.startswith(said) for p in src["problems"]), src["problems"]


def test_lines_out_of_order_are_said_so_never_outside_the_history(tmp_path: Path) -> None:
    """A log concatenated newest first (`cat access.log access.log.1`): the lines found
    after later ones are not replayed (replay reads a log as it was written), and are
    counted and said as such, never as "outside the recorded history"."""
    cfg, lines = _ten_minutes(tmp_path)
    log = tmp_path / "logs" / "access.log"
    half = len(lines) // 2
    log.write_text("".join(lines[half:] + lines[:half]))
    late = half
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["outside_history"] == 0, src
    assert src["out_of_order_lines"] + src["lines"]["late"] == late, src
    assert src["out_of_order_lines"] > 0
    text = replay("--config", str(cfg)).stdout
    assert (
        f"    {src['out_of_order_lines']} line(s) not replayed: stamped within the history, but "
        "found after lines later than them (a log concatenated out of order, or the same lines "
        "twice)"
    ) in text


def test_a_traffic_rule_firing_after_the_live_rollback_is_said_not_a_measurement(
    tmp_path: Path,
) -> None:
    """Live, green was rolled back on its probes; nginx then sent it no request. A what-if
    without the probe rules sees green's traffic window empty out until only the errors
    before the rollback are left, and fires: the report says that detection is not a
    measurement, never a plain delay."""
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(120, interval=1.0)
    tl.rounds(3, interval=1.0, green="http_5xx")
    live_at = tl.wall
    tl.rolled_back()
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(120, interval=1.0, green="http_5xx")
    tl.close()
    lines = [
        line(
            GREEN if t0 + i / RATE < live_at else BLUE,
            "502" if live_at - 3 <= t0 + i / RATE < live_at else "200",
            msec=t0 + i / RATE,
        )
        for i in range(240 * RATE)
    ]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "access.log").write_text("".join(lines))
    extra = _signal(tmp_path / "logs", 0.5).replace('severity = "P2"', 'severity = "P0"')
    extra = extra.replace('window = "60s"', 'window = "20s"').replace(
        "min_samples = 50", "min_samples = 20"
    )
    cfg = config(tmp_path, tmp_path / "state", extra=extra, interval="1s", qos_window="10s")
    live = replay_json("--config", str(cfg))
    [inc] = live["configs"][0]["incidents"]
    assert inc["detected_rule"] == "consecutive_failures" and inc["bound"] is None, inc
    doc = replay_json("--config", str(cfg), "--set", "policy.builtin_rules=false")
    [inc] = doc["configs"][0]["incidents"]
    assert inc["detected_rule"] == "errors" and inc["delay_s"] > 10, inc
    assert inc["bound"] == (
        "not a measurement: from the live rollback on green got no requests, so this traffic "
        "rule judged a window of fewer and older requests than it would have held had the "
        "color kept serving"
    )


def test_a_traffic_rule_that_never_fires_after_a_live_traffic_rollback_says_until_when(
    tmp_path: Path,
) -> None:
    """Live, a traffic rule rolled green back after a minute of 8 % 5xx; nginx then sent it
    no request. A what-if with a higher threshold does not fire on the requests before the
    rollback, and has none after it: "not detected" is said to hold only until the live
    rollback, never as a plain miss (the color's failure went on unseen)."""
    tl = Timeline(tmp_path / "state")
    t0 = tl.wall
    tl.start(active="green", interval=1.0)
    tl.rounds(180, interval=1.0)
    live_at = tl.wall
    tl.incident(
        "rollback_completed",
        source="green",
        target="blue",
        reason="P0 errors: 0.083 > 0.05 on green; rolling back to blue",
        severity="P0",
        evidence={"rule": "errors", "color": "green"},
    )
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(120, interval=1.0)
    tl.close()
    burst = live_at - 60
    lines = [
        line(
            GREEN if t0 + i / RATE < live_at else BLUE,
            "502" if burst <= t0 + i / RATE < live_at and i % 12 == 0 else "200",
            msec=t0 + i / RATE,
        )
        for i in range(300 * RATE)
    ]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "access.log").write_text("".join(lines))
    extra = _signal(tmp_path / "logs", 0.05).replace('severity = "P2"', 'severity = "P0"')
    cfg = config(tmp_path, tmp_path / "state", extra=extra, interval="1s", qos_window="10s")
    live = replay_json("--config", str(cfg))
    [inc] = live["configs"][0]["incidents"]
    assert inc["detected_rule"] == "errors" and inc["bound"] is None, inc
    doc = replay_json("--config", str(cfg), "--set", "rules.0.above=0.2")
    [inc] = doc["configs"][0]["incidents"]
    assert inc["covered"] is True and inc["detected_at"] is None and inc["nearest"] is None, inc
    bound = (
        "until the live rollback only: from it on green got no requests, so this config's "
        "traffic rule(s) (errors) judged none of what it would have served had it kept serving"
    )
    assert inc["bound"] == bound, inc
    text = replay("--config", str(cfg), "--set", "rules.0.above=0.2").stdout
    assert f"    not detected\n      ({bound})\n" in text, text


def _traffic_rollback(tmp: Path, at: float, rule: str) -> None:
    """The live guard's rollback of green at `at` on the traffic rule `rule`, journaled."""
    journal = Journal(tmp / "state" / "events.jsonl", "lab", lambda: at)
    journal.open()
    journal.append(
        "rollback_completed",
        source="green",
        target="blue",
        reason=f"P0 {rule}",
        severity="P0",
        evidence={"rule": rule, "color": "green"},
    )
    journal.close()


@pytest.mark.parametrize(
    "how",
    [
        "rotated away",
        "cut short",
        "corrupt",
        "no file",
        "an empty file",
        "newest first",
        "reversed",
    ],
)
def test_an_incident_the_log_holds_nothing_of_is_not_covered(tmp_path: Path, how: str) -> None:
    """Live, a traffic rule rolled green back at the 5xx minute; the log files replayed hold
    no line of that time (the rotation before the current file deleted, or cut short; no
    log at all, or an empty one), or hold them only after later lines (a log concatenated
    newest first, or written in reverse), which the rule judged that time without. The
    config's traffic rule could not see it: not covered, and why, never "not detected"."""
    cfg, lines = _ten_minutes(tmp_path)
    _traffic_rollback(tmp_path, float(json.loads(lines[0])["msec"]) + 310, "errors")
    logs = tmp_path / "logs"
    cut = 400 * RATE  # after the 5xx minute
    if how == "newest first":
        (logs / "access.log").write_text("".join(lines[cut:] + lines[:cut]))
    elif how == "reversed":
        (logs / "access.log").write_text("".join(reversed(lines)))
    elif how == "an empty file":
        (logs / "access.log").write_text("")
    elif how != "no file":
        (logs / "access.log").write_text("".join(lines[cut:]))
    if how == "cut short":
        (logs / "access.log.1").write_text("".join(lines[: 200 * RATE]))
    if how == "corrupt":
        # Bits flipped in its middle: zlib decompresses them to garbage, lines that read as
        # other requests at other times, and fails only at the member's end.
        packed = bytearray(gzip.compress("".join(lines[:cut]).encode(), mtime=0))
        middle = len(packed) // 2
        packed[middle : middle + 40] = bytes(b ^ 0x55 for b in packed[middle : middle + 40])
        (logs / "access.log.1.gz").write_bytes(bytes(packed))
    doc = replay_json("--config", str(cfg))
    [inc] = doc["configs"][0]["incidents"]
    assert inc["covered"] is False and inc["detected_at"] is None, inc
    src = doc["sources"]["traffic"]
    if how in ("rotated away", "corrupt"):
        assert inc["not_covered"] == (
            f"signal traffic: its lines begin at {src['lines_span'][0]}, after it (rotated away?)"
        )
        if how == "corrupt":
            said = f"{logs / 'access.log.1.gz'}: damaged (Error -3 while decompressing data: "
            assert any(p.startswith(said) and p.endswith(
                "not read (a damaged gzip member decompresses to bytes that cannot be trusted)"
            ) for p in src["problems"]), src["problems"]  # fmt: skip
            assert src["lines"].get("unparsed", 0) == 0, src
    elif how == "no file":
        assert inc["not_covered"] == (
            f"signal traffic: it could not be replayed: no file at {logs / 'access.log'} (nor "
            "rotated beside it)"
        )
    elif how == "an empty file":
        assert inc["not_covered"] == (
            "signal traffic: not one line of it was replayed (no file, an empty one, or none "
            "in the history)"
        )
    elif how in ("newest first", "reversed"):
        assert inc["not_covered"].startswith("signal traffic: "), inc
        assert inc["not_covered"].endswith(
            ", within the window it was judged on, were found after later lines (a log "
            "concatenated out of order, lines copied): not read at their time"
        ), inc
    else:
        [[lo, hi]] = src["holes"]
        assert inc["not_covered"] == (
            f"signal traffic: no line of it from {lo} to {hi}, between two files, within the "
            "window it was judged on"
        )
        assert any("begins 200s after" in p for p in src["problems"]), src["problems"]


def test_a_to_just_after_a_decision_between_two_records_keeps_it(tmp_path: Path) -> None:
    """The traffic rule decides at the end of a slot of log lines, between two probe
    records (a second apart). `--to` just after that decision, before the next record:
    the daemon ran up to `--to`, so the decision is the period's, as over the whole."""
    cfg, lines = _ten_minutes(tmp_path)
    shifted = []  # (0.3 s later than the probe records, which are half a second apart)
    for text in lines:
        doc = json.loads(text)
        doc["msec"] = f"{float(doc['msec']) + 0.3:.3f}"
        shifted.append(json.dumps(doc) + "\n")
    (tmp_path / "logs" / "access.log").write_text("".join(shifted))
    [rb] = decisions(replay_json("--config", str(cfg)), "rollback_completed")
    at = parse_rfc3339(rb["at"])
    assert round(at % 0.5, 3) not in (0.0, 0.5), rb  # between two records
    bounded = replay_json(
        "--config", str(cfg), "--from", rfc3339(at - 100.0), "--to", rfc3339(at + 0.01)
    )
    assert decisions(bounded, "rollback_completed") == [rb]


def test_a_decision_on_a_window_with_a_hole_says_it_was_taken_on_what_was_left(
    tmp_path: Path,
) -> None:
    """The rotation before the 5xx minute was cut short (a copy, a full disk): no line from
    250 s to 320 s. The traffic rule fires on the burst's first lines after the hole, over
    a window that lost most of its lines: the decision says so, under it, never looks as
    sound as one over a whole window (the same decision without the hole has no caveat)."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    (logs / "access.log").write_text("".join(lines))
    whole = decisions(replay_json("--config", str(cfg)), "rollback_completed")
    assert [d["caveat"] for d in whole] == [None], whole
    (logs / "access.log.1").write_text("".join(lines[: 250 * RATE]))
    (logs / "access.log").write_text("".join(lines[320 * RATE :]))
    doc = replay_json("--config", str(cfg))
    [decided] = decisions(doc, "rollback_completed")
    [[lo, hi]] = doc["sources"]["traffic"]["holes"]
    caveat = (
        f"signal traffic: no line of it from {lo} to {hi}, between two files, within the "
        "window it was judged on"
    )
    assert decided["rule"] == "errors" and decided["caveat"] == caveat, decided
    text = replay("--config", str(cfg)).stdout
    assert f"    taken on what was left: {caveat}\n" in text, text


def test_a_guard_window_released_over_a_hole_in_the_log_says_so(tmp_path: Path) -> None:
    """The traffic rule rolls green back 12 s into the 5xx minute; the log then loses its
    lines for half a minute (a rotation cut short), the 10 s guard window within it. The
    release judged the active color's real 5xx ratio on what was left: said under it, as
    under a rule's decision, and never under the rollback, whose window was whole."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    (logs / "access.log.1").write_text("".join(lines[: 315 * RATE]))
    (logs / "access.log").write_text("".join(lines[345 * RATE :]))
    doc = replay_json("--config", str(cfg))
    [rollback] = decisions(doc, "rollback_completed")
    [released] = decisions(doc, "qos_released")
    assert rollback["caveat"] is None, rollback
    [[lo, hi]] = doc["sources"]["traffic"]["holes"]
    assert released["caveat"] == (
        f"signal traffic: no line of it from {lo} to {hi}, between two files, within the "
        "window it was judged on"
    ), released


def _garbled(t0: float, n: int) -> list[str]:
    """`n` lines as a corrupt deflate stream gives them: an `msec` whose digits run into
    other text (500 years on), or cut short (1975, the year 17), or whole and far ahead."""
    return [
        text + "\n"
        for i in range(n)
        for text in (
            f'{{"msec":"{int(t0 * 10) + i}sponse_time":"0.018"}}',
            f'{{"msec":"{int(t0 / 10)}":"8.001"}}',
            '{"msec":"17onse_time":"0.002"}',
            f'{{"msec":"{t0 * 10 + i:.3f}","status":"200"}}',
        )
    ]


@pytest.mark.parametrize("damage", ["bytes flipped", "garbled lines"])
def test_a_corrupt_rotation_costs_its_own_lines_never_those_of_the_files_after_it(
    tmp_path: Path, damage: str
) -> None:
    """The oldest rotation damaged in its middle: 40 bytes of `access.log.2.gz` flipped,
    or the lines a corrupt stream decompresses to before its check fails, their times run
    into other text or cut short. What is left of it is read, its damage said, and every
    line of the intact files after it is replayed at its time, the 5xx minute decided as
    over the clean files. Before, the garbled times carried the log's clock 500 years on
    and most lines after them were counted out of order."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    (logs / "access.log").write_text("".join(lines))
    clean = replay_json("--config", str(cfg))
    cut, rest = 200 * RATE, 400 * RATE
    if damage == "bytes flipped":
        packed = bytearray(gzip.compress("".join(lines[:cut]).encode(), mtime=0))
        middle = len(packed) // 2
        packed[middle : middle + 40] = bytes(b ^ 0x5A for b in packed[middle : middle + 40])
        (logs / "access.log.2.gz").write_bytes(bytes(packed))
    else:
        t0 = parse_rfc3339(clean["history"]["from"])
        garbled = lines[: cut // 2] + _garbled(t0, 60) + lines[cut // 2 + 240 : cut]
        (logs / "access.log.2").write_text("".join(garbled))
    (logs / "access.log.1").write_text("".join(lines[cut:rest]))
    (logs / "access.log").write_text("".join(lines[rest:]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["out_of_order_lines"] == 0, src
    assert src["lines"]["ok"] >= len(lines) - cut, src
    if damage == "bytes flipped":
        said = f"{logs / 'access.log.2.gz'}: damaged (Error -3 while decompressing data: "
        assert any(p.startswith(said) for p in src["problems"]), src["problems"]
    assert decisions(doc, "rollback_completed") == decisions(clean, "rollback_completed")


def test_lines_stamped_before_the_history_are_outside_it_and_out_of_its_span(
    tmp_path: Path,
) -> None:
    """A rotation whose lines are all stamped an hour before the history began (a clock
    wrong on the host that wrote them), and a line stamped at the epoch: outside the
    history (before its first record), never "late", and never the start of the span of
    lines the rules saw."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    cut = 330 * RATE
    early = [line(GREEN, "200", msec=float(json.loads(x)["msec"]) - 3600.0) for x in lines[:cut]]
    (logs / "access.log.1").write_text("".join(early))
    (logs / "access.log").write_text("".join([*lines[cut:], line(GREEN, "200", msec=1.0)]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["lines"]["late"] == 0, src
    assert src["lines"]["ok"] == len(lines) - cut, src
    assert src["outside_history"] == cut + 1, src
    first = float(json.loads(lines[cut])["msec"])
    assert parse_rfc3339(src["lines_span"][0]) >= first - 1.0, src["lines_span"]


def test_a_rule_without_a_name_is_found_by_the_name_the_guard_gives_it(tmp_path: Path) -> None:
    """A `[[rules]]` row without `name` is `signal.stat` in the guard's evidence: the
    traffic caveat and the log's coverage find it by that name too. Here the log is cut
    short within the window the live rule judged: not covered."""
    cfg, lines = _ten_minutes(tmp_path)
    text = cfg.read_text().replace('name = "errors"\n', "")
    cfg.write_text(text)
    _traffic_rollback(tmp_path, float(json.loads(lines[0])["msec"]) + 340, "traffic.error_ratio")
    logs = tmp_path / "logs"
    (logs / "access.log.1").write_text("".join(lines[: 300 * RATE]))
    (logs / "access.log").write_text("".join(lines[330 * RATE :]))  # 30 s cut out
    doc = replay_json("--config", str(cfg))
    [inc] = doc["configs"][0]["incidents"]
    # (The replayed rule fired too, on the window with the hole: no detection time.)
    assert inc["covered"] is False and inc["detected_at"] is None, inc
    assert "within the window it was judged on" in inc["not_covered"], inc


@pytest.mark.parametrize(
    "how", ["first line a day ahead", "first lines an hour ahead", "lines before the history"]
)
def test_a_rotation_wholly_before_the_history_changes_nothing_of_the_files_after_it(
    tmp_path: Path, how: str
) -> None:
    """The current log begins with lines stamped ahead (nothing before them in it to tell,
    only the lines after them), or with lines from before the history; then an unrelated
    rotation a day older is put beside it. The current log reads alike with or without it
    (its lines counted outside the history, nothing else moved), and a log beginning with
    lines stamped ahead is replayed whole, those lines with the first line after them
    (before: every line waited behind the first, and none was replayed)."""
    cfg, lines = _ten_minutes(tmp_path)
    logs = tmp_path / "logs"
    t0 = float(json.loads(lines[0])["msec"])
    n = 47
    if how == "first line a day ahead":
        first = [line(GREEN, "200", msec=t0 + 86_400.0)]
    elif how == "first lines an hour ahead":
        first = [line(GREEN, "200", msec=t0 + 3600.0 + i / RATE) for i in range(n)]
    else:
        first = [line(GREEN, "200", msec=t0 - 60.0 + i / RATE) for i in range(n)]
    (logs / "access.log").write_text("".join(first + lines))
    alone = replay_json("--config", str(cfg))
    src = alone["sources"]["traffic"]
    assert src["out_of_order_lines"] == 0, src
    if how == "lines before the history":
        assert src["lines"]["ok"] == len(lines) and src["outside_history"] == n, src
    else:
        assert src["lines"]["ok"] == len(lines) + len(first), src
        assert src["ahead_lines"] == len(first) and src["outside_history"] == 0, src
    old = [line(GREEN, "200", msec=t0 - 86_400.0 + i / RATE) for i in range(1800 * RATE)]
    (logs / "access.log.1").write_text("".join(old))
    doc = replay_json("--config", str(cfg))
    both = doc["sources"]["traffic"]
    assert both["lines"] == src["lines"]
    assert both["outside_history"] == src["outside_history"] + len(old)
    assert (both["ahead_lines"], both["out_of_order_lines"], both["repeated_lines"]) == (
        src["ahead_lines"],
        0,
        0,
    )
    assert doc["configs"][0]["decisions"] == alone["configs"][0]["decisions"]


@pytest.mark.parametrize("where", ["a year ahead, first in the newer file", "at the epoch, last"])
def test_one_line_stamped_far_off_at_a_files_edge_makes_no_hole(tmp_path: Path, where: str) -> None:
    """Where one file ends and the next begins, one line stamped far off (a year ahead as
    the newer file's first line, or at the epoch as the older file's last): no hole is
    made of it, the incident the traffic rule decided live within that window is covered
    and detected as without it (before: a year-long hole, and "not covered")."""
    cfg, lines = _ten_minutes(tmp_path)
    t0 = float(json.loads(lines[0])["msec"])
    _traffic_rollback(tmp_path, t0 + 310, "errors")
    logs = tmp_path / "logs"
    cut = _rotated(lines, logs, 305)  # (within the window the rule judged at 310 s)
    plain = replay_json("--config", str(cfg))
    [inc] = plain["configs"][0]["incidents"]
    assert inc["covered"] is True and inc["detected_at"] is not None, inc
    if where.startswith("a year"):
        far = line(GREEN, "200", msec=t0 + 305 + 365 * 86_400.0)
        (logs / "access.log").write_text("".join([far, *lines[cut:]]))
    else:
        (logs / "access.log.1").write_text("".join([*lines[:cut], line(GREEN, "200", msec=1.0)]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["holes"] == [], src["problems"]
    assert doc["configs"][0]["incidents"] == plain["configs"][0]["incidents"]


def test_a_shorter_copy_read_after_its_rotation_makes_no_hole(tmp_path: Path) -> None:
    """`head -2000 access.log.1 > access.log.3`: the copy is read right after the rotation
    it copies, and ends long before it. Where the current file begins is judged from the
    furthest any file reached, not from the copy's end: no hole, the incident there
    covered (before: "no line of it" for the minutes the rotation itself held)."""
    cfg, lines = _ten_minutes(tmp_path)
    t0 = float(json.loads(lines[0])["msec"])
    _traffic_rollback(tmp_path, t0 + 310, "errors")
    logs = tmp_path / "logs"
    _rotated(lines, logs, 305)
    plain = replay_json("--config", str(cfg))
    (logs / "access.log.3").write_text("".join(lines[: 100 * RATE]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["holes"] == [] and src["repeated_lines"] == 100 * RATE, src
    assert src["lines"] == plain["sources"]["traffic"]["lines"]
    assert doc["configs"][0]["incidents"] == plain["configs"][0]["incidents"]


def test_compare_judges_each_configs_coverage_by_the_logs_it_read(tmp_path: Path) -> None:
    """`--compare` with a config whose access log is not there: its traffic rule could
    not see the incident the live guard decided on traffic; [B] says not covered, and why,
    as it does alone, never "not detected" (before: judged by [A]'s logs)."""
    cfg, lines = _ten_minutes(tmp_path)
    _traffic_rollback(tmp_path, float(json.loads(lines[0])["msec"]) + 310, "errors")
    (tmp_path / "logs" / "access.log").write_text("".join(lines))
    other = tmp_path / "other.toml"
    nowhere = tmp_path / "nowhere" / "access.log"
    other.write_text(
        cfg.read_text().replace(f"file:{tmp_path / 'logs'}/access.log", f"file:{nowhere}")
    )
    alone = replay_json("--config", str(other))
    doc = replay_json("--config", str(cfg), "--compare", str(other))
    [mine], [theirs] = (c["incidents"] for c in doc["configs"])
    assert mine["covered"] is True and mine["detected_at"] is not None, mine
    assert theirs == alone["configs"][0]["incidents"][0], theirs
    assert theirs["covered"] is False and theirs["not_covered"] == (
        f"signal traffic: it could not be replayed: no file at {nowhere} (nor rotated beside it)"
    ), theirs


def test_a_hole_the_lines_of_a_file_read_after_fill_is_none(tmp_path: Path) -> None:
    """The contents of `access.log.1` and `access.log` swapped (the newer lines under the
    older name): read in their names' order, `access.log.2` ends minutes before
    `access.log.1` begins; the lines of that stretch, in `access.log`, handed over after,
    fill it. The incident there is not "no line of it between two files": every line is
    there (said instead as lines found after later ones, if they were)."""
    cfg, lines = _ten_minutes(tmp_path)
    t0 = float(json.loads(lines[0])["msec"])
    _traffic_rollback(tmp_path, t0 + 310, "errors")
    logs = tmp_path / "logs"
    (logs / "access.log.2").write_text("".join(lines[: 100 * RATE]))
    (logs / "access.log.1").write_text("".join(lines[300 * RATE :]))
    (logs / "access.log").write_text("".join(lines[100 * RATE : 300 * RATE]))
    doc = replay_json("--config", str(cfg))
    src = doc["sources"]["traffic"]
    assert src["holes"] == [], src
    [inc] = doc["configs"][0]["incidents"]
    assert inc["covered"] is False and inc["not_covered"].endswith(
        "were found after later lines (a log concatenated out of order, lines copied): not "
        "read at their time"
    ), inc


@pytest.mark.parametrize("what", ["rule", "guard window"])
def test_a_hole_within_one_file_gives_the_same_caveat_as_one_between_two(
    tmp_path: Path, what: str
) -> None:
    """Lines lost within one file (a log truncated and written on, lines cut out): no line
    from 250 s to 320 s (before the burst: the rule's window), or from 315 s to 345 s (the
    guard window after the rollback). The decision taken on what was left says so, as it
    does over a hole between two files, and the hole is said once, under the source."""
    cfg, lines = _ten_minutes(tmp_path)
    cut = (250, 320) if what == "rule" else (315, 345)
    (tmp_path / "logs" / "access.log").write_text(
        "".join(lines[: cut[0] * RATE] + lines[cut[1] * RATE :])
    )
    doc = replay_json("--config", str(cfg))
    [[lo, hi]] = doc["sources"]["traffic"]["holes"]
    caveat = (
        f"signal traffic: no line of it from {lo} to {hi}, within a file, within the window "
        "it was judged on"
    )
    [rollback] = decisions(doc, "rollback_completed")
    [released] = decisions(doc, "qos_released")
    if what == "rule":
        assert rollback["rule"] == "errors" and rollback["caveat"] == caveat, rollback
    else:
        assert rollback["caveat"] is None and released["caveat"] == caveat, released
    [said] = [p for p in doc["sources"]["traffic"]["problems"] if "within a file" in p]
    assert said.startswith(f"no line from {lo} to {hi} ("), said
