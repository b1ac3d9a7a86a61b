"""`guardd replay` over a recorded history: the decisions, the what-if, the incidents,
the exit statuses, and that it writes nothing where guardd keeps its state."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guardd.observations import ReadReport, read_history
from guardd.timestamps import parse_rfc3339, rfc3339
from tests.harness.daemon import nobody_prefix
from tests.replay.history import DAY0, GUARDD, Timeline, config, decisions, replay, replay_json

INTERVAL = 0.2


def _green_fails(tl: Timeline, *, failing: int = 30) -> float:
    """Healthy for a while, then green (active) fails `failing` rounds; the live guard
    rolled back at the third failure (journaled). Returns the wall time of that rollback."""
    tl.start(active="green")
    tl.rounds(150)
    tl.rounds(3, green="http_5xx")
    at = tl.wall
    tl.rolled_back()
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(failing - 3, green="http_5xx")
    tl.rounds(150)
    return at


@pytest.fixture
def tl(tmp_path: Path) -> Iterator[Timeline]:
    timeline = Timeline(tmp_path / "state")
    yield timeline
    timeline.close()


def test_a_rollback_is_replayed_by_the_same_rule_at_the_same_time(
    tmp_path: Path, tl: Timeline
) -> None:
    live_at = _green_fails(tl)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    rollbacks = decisions(doc, "rollback_completed")
    assert len(rollbacks) == 1, doc["configs"][0]["decisions"]
    rb = rollbacks[0]
    assert (rb["color"], rb["to"], rb["rule"], rb["severity"]) == (
        "green",
        "blue",
        "consecutive_failures",
        "P0",
    )
    assert abs(parse_rfc3339(rb["at"]) - live_at) <= INTERVAL
    assert rb["evidence"]["consecutive_failures"] == 3
    [incident] = doc["configs"][0]["incidents"]
    assert incident["event"] == "rollback_completed"
    assert incident["detected_at"] == rb["at"]
    assert abs(incident["delay_s"]) <= INTERVAL
    assert incident["bound"] is None  # as soon as live: nothing after its rollback needed
    # A rollback takes the QoS lock (in a private folder), and the guard window releases it.
    assert decisions(doc, "qos_locked") and decisions(doc, "qos_released")
    assert doc["configs"][0]["summary"]["rollbacks"] == 1
    text = replay("--config", str(cfg))
    assert text.returncode == 0, text.stderr
    assert "rollback        green -> blue  P0  consecutive_failures" in text.stdout
    assert "detected at" in text.stdout
    assert "Summary: 1 rollback(s), 0 hold(s)" in text.stdout


def test_a_higher_threshold_rolls_back_later_and_the_summary_says_so(
    tmp_path: Path, tl: Timeline
) -> None:
    live_at = _green_fails(tl)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg), "--set", "policy.consecutive_failures=10")
    [rb] = decisions(doc, "rollback_completed")
    assert rb["rule"] == "consecutive_failures"
    assert rb["evidence"]["consecutive_failures"] == 10
    # Seven more failed rounds of green than live: later by about 7 intervals.
    delay = parse_rfc3339(rb["at"]) - live_at
    assert 6 * INTERVAL <= delay <= 8 * INTERVAL
    [incident] = doc["configs"][0]["incidents"]
    assert incident["delay_s"] == pytest.approx(delay, abs=0.002)
    # From the live rollback on, green was probed as a standby (every 200 ms), not at the
    # config's fast_interval (100 ms) as a guard still serving it would have: said.
    bound = (
        "an upper bound: after the live rollback, green was recorded every 0.2s, not at "
        "this config's fast_interval 0.1s"
    )
    assert incident["bound"] == bound
    text = replay("--config", str(cfg), "--set", "policy.consecutive_failures=10")
    assert f"({incident['delay_s']:+g}s, rollback)" in text.stdout
    assert f"  ({bound})" in text.stdout
    # What was tried is in the report itself, not only on the command line that ran it.
    assert f"  {cfg} --set policy.consecutive_failures=10\n" in text.stdout


def test_a_cadence_faster_than_the_recorded_one_is_said(tmp_path: Path, tl: Timeline) -> None:
    """The history was probed every 200 ms: a what-if at 50 ms sees rounds only that
    often, and the report says so, with both figures; at the recorded cadence, no note."""
    _green_fails(tl)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    assert replay_json("--config", str(cfg))["configs"][0]["notes"] == []
    faster = ("--config", str(cfg), "--set", 'probe.interval="50ms"',
              "--set", 'probe.fast_interval="50ms"')  # fmt: skip
    [note] = replay_json(*faster)["configs"][0]["notes"]
    assert note.startswith("probe.interval 0.05s is faster than the history's 0.2s"), note
    assert note in replay(*faster).stdout


def _slow_history(tl: Timeline, *, blue_silent_rounds: int = 0) -> None:
    """A history probed every 500 ms: green fails and the live guard rolled back; after
    `blue_silent_rounds` rounds in which only green was probed (blue's prober stuck)."""
    tl.start(active="green", interval=0.5)
    tl.rounds(150, interval=0.5)
    for _ in range(blue_silent_rounds):
        tl.tick(0.5)
        tl.recorder.probe("green", "ok", 0.004, None, 200)
    tl.rounds(3, interval=0.5, green="http_5xx")
    tl.rolled_back()
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(20, interval=0.5, green="http_5xx")
    tl.rounds(300, interval=0.5)
    tl.close()


@pytest.mark.parametrize("faster", ["100ms", "250ms", "400ms"])
def test_a_faster_cadence_tried_decides_as_the_recorded_one_between_rounds(
    tmp_path: Path, tl: Timeline, faster: str
) -> None:
    """The history holds a round every 500 ms: a what-if probing faster finds a color's
    last round older than three of its own intervals between any two recorded ones. That
    is no news of the upstreams: it is never judged stale for it (no alert, no hold, no
    refused rollback counted in the summary); the decisions are the recorded cadence's."""
    _slow_history(tl)
    cfg = config(tmp_path, tmp_path / "state", interval="500ms", qos_window="10s")
    base = replay_json("--config", str(cfg))["configs"][0]
    tried = replay_json("--config", str(cfg), "--set", f'probe.interval="{faster}"')
    got = tried["configs"][0]
    assert got["summary"]["rollbacks"] == base["summary"]["rollbacks"] == 1
    assert got["summary"]["holds"] == base["summary"]["holds"] == 0
    assert got["summary"]["alerts"] == base["summary"]["alerts"]
    assert not [d for d in got["decisions"] if "stale" in d.get("reason", "")], got["decisions"]
    [rb] = decisions(tried, "rollback_completed")
    [was] = [d for d in base["decisions"] if d["event"] == "rollback_completed"]
    assert parse_rfc3339(rb["at"]) == pytest.approx(parse_rfc3339(was["at"]), abs=0.5)


@pytest.mark.parametrize(("interval", "fast"), [("2s", "2s"), ("2s", "500ms"), ("5s", "5s")])
def test_a_slower_cadence_tried_sees_only_the_rounds_it_would_have_made(
    tmp_path: Path, tl: Timeline, interval: str, fast: str
) -> None:
    """A 500 ms history replayed at 2 s (or 5 s) is fed one recorded round of each color
    per 2 s: three failures in a row take some 4 s more than live, not the history's
    1.5 s; confirming at `fast_interval` 500 ms takes every recorded round again; the
    guard window counts the probes the slower guard made. The report says so."""
    _slow_history(tl)
    failing_from = DAY0 + 3600 + 150 * 0.5  # green's first failing round ends 0.5 s after
    every = {"2s": 2.0, "5s": 5.0, "500ms": 0.5}
    cfg = config(tmp_path, tmp_path / "state", interval="500ms", qos_window="1m")
    doc = replay_json(
        "--config", str(cfg), "--set", f'probe.interval="{interval}"',
        "--set", f'probe.fast_interval="{fast}"',
    )  # fmt: skip
    got = doc["configs"][0]
    [note] = got["notes"]
    assert note.startswith(
        f"probe rounds as this config would have made them (probe.interval {every[interval]:g}s, "
        f"fast_interval {every[fast]:g}s while confirming a failure)"
    ), note
    [rb] = decisions(doc, "rollback_completed")
    at = parse_rfc3339(rb["at"])
    if rb["rule"] == "consecutive_failures":
        # The first failing round seen comes within one cadence of the failure's start;
        # the two more the rule needs come a confirming cadence apart each.
        first_seen = at - 2 * every[fast]
        assert failing_from < first_seen <= failing_from + every[interval] + 0.25, rb
    else:
        # At 5 s the P1 ratio rule is quicker: two failing rounds of seven, 5 s apart.
        assert rb["rule"] == "p1_error_ratio", rb
        assert failing_from + every[interval] <= at <= failing_from + 2 * every[interval] + 0.25
    [released] = decisions(doc, "qos_released")
    held_over = int(released["reason"].split("SLOs held over ")[1].split()[0])
    assert held_over <= 65 / every[interval] + 1, released["reason"]
    text = replay("--config", str(cfg), "--set", f'probe.interval="{interval}"').stdout
    assert "probe rounds as this config would have made them" in text


@pytest.mark.parametrize(("fast", "confirm"), [("250ms", 0.25), ("400ms", 0.4), ("500ms", 0.5)])
def test_a_slower_confirming_cadence_tried_waits_for_the_rounds_it_would_have_made(
    tmp_path: Path, tl: Timeline, fast: str, confirm: float
) -> None:
    """Live, green failing was confirmed at `fast_interval` 250 ms: those rounds are in the
    history. A what-if confirming every 500 ms (or 400 ms) sees the recorded round nearest
    each of its own: the third failure in a row comes two such intervals after the first
    (within half a recorded round), never sooner. Confirming as recorded, every one counts."""
    tl.start(active="green", interval=0.5)
    tl.rounds(150, interval=0.5)
    # The first failing round comes at the interval, the live guard confirming the next
    # ones at 250 ms (green is probed half-way through each round, after blue).
    tl.rounds(1, interval=0.5, green="http_5xx")
    first_failing = tl.wall
    tl.rounds(12, interval=0.25, green="http_5xx")
    tl.rolled_back()
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(100, interval=0.5)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state", interval="500ms", qos_window="10s")
    doc = replay_json("--config", str(cfg), "--set", f'probe.fast_interval="{fast}"')
    [rb] = decisions(doc, "rollback_completed")
    assert rb["rule"] == "consecutive_failures", rb
    took = parse_rfc3339(rb["at"]) - first_failing
    assert took == pytest.approx(2 * confirm, abs=0.126), (took, rb)
    if confirm > 0.25:
        [note] = doc["configs"][0]["notes"]
        assert f"fast_interval {confirm:g}s while confirming a failure)" in note, note


def test_a_color_not_probed_for_longer_than_the_recorded_cadence_allows_is_still_stale(
    tmp_path: Path, tl: Timeline
) -> None:
    """Blue was not probed for 4 s of a 500 ms history (eight rounds lost) just before
    green failed: the rollback target is stale, at the recorded cadence and at a faster
    one alike, and the guard refuses to roll back to it until it is probed again."""
    _slow_history(tl, blue_silent_rounds=8)
    cfg = config(tmp_path, tmp_path / "state", interval="500ms", qos_window="10s")
    for args in ((), ("--set", 'probe.interval="100ms"')):
        doc = replay_json("--config", str(cfg), *args)
        stale = [d for d in doc["configs"][0]["decisions"] if "blue is stale" in d["reason"]]
        assert stale, (args, doc["configs"][0]["decisions"])


def test_a_higher_threshold_misses_a_short_incident_and_says_not_detected(
    tmp_path: Path, tl: Timeline
) -> None:
    _green_fails(tl, failing=6)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    assert len(decisions(replay_json("--config", str(cfg)), "rollback_completed")) == 1
    doc = replay_json("--config", str(cfg), "--set", "policy.consecutive_failures=10")
    assert decisions(doc, "rollback_completed") == []
    assert doc["configs"][0]["summary"]["rollbacks"] == 0
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] is None
    text = replay("--config", str(cfg), "--set", "policy.consecutive_failures=10")
    assert "not detected" in text.stdout
    assert "Summary: 0 rollback(s)" in text.stdout


def test_both_colors_down_is_a_hold_not_a_rollback(tmp_path: Path, tl: Timeline) -> None:
    tl.start(active="green")
    tl.rounds(150)
    tl.rounds(2, blue="connect_error")
    tl.rounds(40, blue="connect_error", green="http_5xx")
    live_at = tl.wall - 38 * INTERVAL
    tl.incident("hold", source="green", target="blue", reason="both down", severity="P0")
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    assert decisions(doc, "rollback_completed") == []
    holds = decisions(doc, "hold")
    assert holds, doc["configs"][0]["decisions"]
    assert holds[0]["color"] == "green"
    assert "rollback target blue is unhealthy" in holds[0]["reason"]
    assert abs(parse_rfc3339(holds[0]["at"]) - live_at) <= INTERVAL
    assert doc["configs"][0]["incidents"][0]["detected_by"] == "hold"


def test_a_clean_history_gives_no_decision(tmp_path: Path, tl: Timeline) -> None:
    tl.start(active="green")
    tl.rounds(600)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    assert doc["configs"][0]["decisions"] == []
    # One tick per round of the active color, as the daemon's decision loop: a probe and
    # the period falling due together wake it once.
    assert 600 <= doc["configs"][0]["ticks"] <= 602
    text = replay("--config", str(cfg))
    assert "No decision" in text.stdout
    assert "Incidents in" in text.stdout and "none in this period" in text.stdout


def test_compare_replays_both_configs_over_the_same_history(tmp_path: Path, tl: Timeline) -> None:
    _green_fails(tl, failing=6)
    tl.close()
    state = tmp_path / "state"
    base = config(tmp_path, state)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    # Another instance name, another state.dir: the history is the first config's.
    other = config(other_dir, other_dir / "elsewhere", extra="", instance="candidate")
    text = other.read_text().replace("consecutive_failures = 3", "consecutive_failures = 10")
    other.write_text(text)
    doc = replay_json("--config", str(base), "--compare", str(other))
    assert [c["label"] for c in doc["configs"]] == ["A", "B"]
    assert doc["configs"][0]["summary"]["rollbacks"] == 1
    assert doc["configs"][1]["summary"]["rollbacks"] == 0
    shown = replay("--config", str(base), "--compare", str(other)).stdout
    assert "[A] rollback" in shown
    assert "Summary [A]: 1 rollback(s)" in shown
    assert "Summary [B]: 0 rollback(s)" in shown
    assert "[B] not detected" in shown


def test_from_and_to_bound_the_decisions(tmp_path: Path, tl: Timeline) -> None:
    live_at = _green_fails(tl)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    before = replay_json("--config", str(cfg), "--to", _iso(live_at - 5))
    assert decisions(before, "rollback_completed") == []
    assert before["configs"][0]["incidents"] == []
    around = replay_json(
        "--config", str(cfg), "--from", _iso(live_at - 20), "--to", _iso(live_at + 5)
    )
    assert len(decisions(around, "rollback_completed")) == 1
    # The windows are full at --from, as the daemon's were: the history before it (the
    # longest window, 30 s) is replayed too, its decisions not reported.
    [late] = decisions(
        replay_json("--config", str(cfg), "--from", _iso(live_at - 0.5)), "rollback_completed"
    )
    assert late["evidence"]["samples"] >= 140
    assert abs(parse_rfc3339(late["at"]) - live_at) <= INTERVAL
    # A relative time counts back from now: the whole (older) history is before it, and
    # there is nothing to judge in the period.
    recent = replay("--config", str(cfg), "--from", "2h", "--json")
    assert recent.returncode == 1, recent.stdout
    assert "no history between" in recent.stderr and recent.stdout == ""


def _detected_a_round_sooner(
    tmp_path: Path, tl: Timeline
) -> tuple[Path, tuple[str, str], dict[str, Any]]:
    """Green rolled back live; a `--set` that detects it a round sooner. The config, that
    `--set`, and the incident as the whole history replayed with it gives it."""
    tl.green_rolled_back()
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    sooner = ("--set", "policy.consecutive_failures=2")
    [whole] = replay_json("--config", str(cfg), *sooner)["configs"][0]["incidents"]
    assert whole["delay_s"] < 0, whole
    return cfg, sooner, whole


def test_an_incident_just_after_from_detected_just_before_it_is_detected(
    tmp_path: Path, tl: Timeline
) -> None:
    """`--from` pasted from the journal's incident time, with a config that detects it a
    round sooner: its decision falls in the warm-up before `--from`. The incident is
    detected (its delay as ever), never "not covered" for a history said to begin after
    it, nor "not detected"; and the decision is no decision of the period."""
    cfg, sooner, whole = _detected_a_round_sooner(tmp_path, tl)
    doc = replay_json("--config", str(cfg), *sooner, "--from", whole["at"])
    [inc] = doc["configs"][0]["incidents"]
    assert inc["covered"] is True, inc
    assert (inc["detected_at"], inc["delay_s"]) == (whole["detected_at"], whole["delay_s"])
    assert decisions(doc, "rollback_completed") == []
    assert doc["configs"][0]["unmatched"] == []


def test_a_decision_just_before_to_detecting_an_incident_after_it_is_no_false_alarm(
    tmp_path: Path, tl: Timeline
) -> None:
    """`--to` between a config's rollback and the live one it detects a round sooner: the
    decision is in the period, the incident after it. It is not "where the live guard did
    not act" (it did, just after `--to`): a note says which incident it is near."""
    cfg, sooner, whole = _detected_a_round_sooner(tmp_path, tl)
    cut = _iso((parse_rfc3339(whole["detected_at"]) + parse_rfc3339(whole["at"])) / 2)
    doc = replay_json("--config", str(cfg), *sooner, "--to", cut)
    c = doc["configs"][0]
    assert c["incidents"] == [] and len(decisions(doc, "rollback_completed")) == 1
    assert c["unmatched"] == [], c["unmatched"]
    note = (
        "1 decision(s) near an end of the period are within the match window of a live "
        f"incident outside it, never 'where the live guard did not act': "
        f"{whole['detected_at']} (the live incident at {whole['at']})"
    )
    assert note in c["notes"], c["notes"]
    assert (
        "Decided where the live guard did not"
        not in replay("--config", str(cfg), *sooner, "--to", cut).stdout
    )


def _iso(ts: float) -> str:
    from guardd.timestamps import rfc3339  # noqa: PLC0415

    return rfc3339(ts)


def test_an_invalid_config_prints_what_check_config_prints(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "state")
    cfg.write_text(cfg.read_text().replace("consecutive_failures = 3", "consecutive_failures = 0")
                   + "\n[bogus]\nx = 1\n")  # fmt: skip
    done = replay("--config", str(cfg))
    check = subprocess.run(
        [*GUARDD, "check-config", "--offline", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == check.returncode == 2
    assert done.stderr == check.stderr
    assert f"{cfg}: policy.consecutive_failures: must be >= 1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("policy.consecutive_failures=0", "policy.consecutive_failures: must be >= 1"),
        ("policy.consecutive_failures=ten", "policy.consecutive_failures: --set: 'ten' is not"),
        ("policy.no_such_key=1", "policy.no_such_key: unknown key"),
        ('policy.window="soon"', "policy.window: must be a duration"),
        ("rules.3.above=0.1", "rules.3.above: --set: the file has no rules"),
        ("policy.window.x=1", "policy.window.x: --set: policy.window is not a table"),
        ("nonsense", "(--set): --set 'nonsense': not KEY=VALUE"),
    ],
)
def test_a_bad_set_is_reported_as_the_files_problems_are(
    tmp_path: Path, setting: str, said: str
) -> None:
    cfg = config(tmp_path, tmp_path / "state")
    done = replay("--config", str(cfg), "--set", setting)
    assert done.returncode == 2
    assert f"{cfg}: " in done.stderr
    assert said in done.stderr
    assert "Traceback" not in done.stderr


def test_set_reaches_into_the_rules(tmp_path: Path, tl: Timeline) -> None:
    _green_fails(tl)
    tl.close()
    rule = (
        '\n[[rules]]\nsignal = "probe"\nstat = "consecutive_failures"\nabove = 1\n'
        'severity = "P2"\nname = "wobbly"\n'
    )
    cfg = config(tmp_path, tmp_path / "state", extra=rule)
    doc = replay_json("--config", str(cfg), "--set", 'rules.0.severity="P0"')
    [rb] = decisions(doc, "rollback_completed")
    assert rb["rule"] == "wobbly"


def test_bad_times_exit_2(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "state")
    done = replay("--config", str(cfg), "--from", "last tuesday")
    assert done.returncode == 2
    assert "--from/--to" in done.stderr and "ISO 8601" in done.stderr


def test_no_history_exits_1_naming_the_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config(tmp_path, state)
    done = replay("--config", str(cfg))
    assert done.returncode == 1
    assert f"{state / 'observations'}: no such directory" in done.stderr
    (state / "observations").mkdir(parents=True)
    (state / "observations" / "notes.txt").write_text("hello\n")
    done = replay("--config", str(cfg))
    assert done.returncode == 1
    assert "no observation file" in done.stderr
    assert not state.joinpath("events.jsonl").exists()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path)] = (st.st_mtime_ns, st.st_mode, path.read_bytes() if path.is_file() else b"")
    out[str(folder)] = (folder.stat().st_mtime_ns, folder.stat().st_mode, b"")
    return out


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder any uid may enter (pytest's are 0700), for a replay run as `nobody`."""
    where = Path(tempfile.mkdtemp(prefix="guardd-replay-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_replay_writes_nothing_in_state_dir_even_read_only(open_dir: Path) -> None:
    state = open_dir / "state"
    tl = Timeline(state)
    _green_fails(tl)
    tl.close()
    cfg = config(open_dir, state)
    cfg.chmod(0o644)
    for path in state.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)
    state.chmod(0o555)
    before = _snapshot(state)
    # As `nobody`, who may read the state folder and write nothing in it.
    done = replay("--config", str(cfg), "--json", prefix=nobody_prefix())
    assert done.returncode == 0, done.stderr
    assert '"rollback_completed"' in done.stdout
    assert _snapshot(state) == before
    # And as root, who could: still nothing written, no lock file anywhere it was configured.
    done = replay("--config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert _snapshot(state) == before
    assert not (open_dir / "run").exists()
    assert sorted(p.name for p in state.iterdir()) == ["events.jsonl", "observations"]


def test_a_restart_in_the_history_is_a_restart_in_the_replay(tmp_path: Path, tl: Timeline) -> None:
    # Run 1: green fails, the live guard rolls back to blue. Then the daemon restarts
    # (serving blue), and in run 2 blue fails too.
    _green_fails(tl, failing=10)
    tl.start(active="blue")
    tl.rounds(100)
    tl.rounds(10, blue="http_5xx")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state", extra="")
    cfg.write_text(cfg.read_text().replace("[policy]\n", "[policy]\nmax_rollbacks = 1\n"))
    doc = replay_json("--config", str(cfg), "--set", 'policy.rollback_to="previous"')
    assert doc["history"]["runs"] == 2
    [rb] = decisions(doc, "rollback_completed")
    assert (rb["color"], rb["to"]) == ("green", "blue")
    # The rollback budget survives the restart, as the daemon rebuilds it from its journal:
    # the second failure is a hold for an operator, not a second rollback.
    holds = decisions(doc, "hold")
    assert holds, doc["configs"][0]["decisions"]
    assert holds[0]["color"] == "blue"
    assert "rollback budget spent" in holds[0]["reason"]
    assert parse_rfc3339(holds[0]["at"]) > parse_rfc3339(rb["at"])


def test_history_no_file_of_which_can_be_opened_exits_1_naming_it(open_dir: Path) -> None:
    state = open_dir / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(20)
    tl.close()
    cfg = config(open_dir, state)
    cfg.chmod(0o644)
    for path in state.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o600)  # root's alone
    state.chmod(0o755)
    [day] = (state / "observations").iterdir()
    done = replay("--config", str(cfg), prefix=nobody_prefix())
    assert done.returncode == 1, done.stdout
    assert f"{day}: cannot open: Permission denied" in done.stderr


@pytest.mark.parametrize(
    ("by", "event", "replayed_as"),
    [
        ("uid:0(root)", "switch", "switch"),
        ("uid:0(root)", "promote", "promote"),
        ("external", "external_switch", "external_switch"),
    ],
)
def test_switches_made_by_others_are_made_in_the_replay_too(
    tmp_path: Path, tl: Timeline, by: str, event: str, replayed_as: str
) -> None:
    tl.start(active="green")
    tl.rounds(100)
    tl.recorder.switch("green", "blue", by=by, reason="moved by hand", event=event)
    tl.rounds(100)
    tl.rounds(10, blue="http_5xx")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg), "--set", 'policy.rollback_to="previous"')
    [moved] = decisions(doc, replayed_as)
    assert (moved["color"], moved["to"], moved["by"]) == ("green", "blue", by)
    # Then blue, now served, fails: the replayed guard rolls back from it.
    [rb] = decisions(doc, "rollback_completed")
    assert (rb["color"], rb["to"]) == ("blue", "green")


@pytest.mark.parametrize("failing_after", [0.0, 0.03, 0.07])
def test_a_switch_made_outside_guardd_is_adopted_when_the_daemon_adopted_it(
    tmp_path: Path, tl: Timeline, failing_after: float
) -> None:
    """The daemon adopts a switch made outside it at a tick, and journals it then; the
    replayed guard adopts it at that moment too, not a tick later: green, failing from
    the adoption on, is rolled back at its third failure (the config's rule), exactly
    when the daemon would have, whatever the phase of the probe rounds."""
    tl.start(active="blue")
    tl.rounds(100)
    tl.tick(failing_after)
    adopted_at = tl.wall
    tl.recorder.switch("blue", "green", by="external", reason="adopted", event="external_switch")
    tl.tick(-failing_after)  # the rounds keep their own phase
    third = []
    for _ in range(6):
        tl.rounds(1, green="http_5xx")
        third.append(tl.wall)
    tl.rounds(20)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    [moved] = decisions(doc, "external_switch")
    assert parse_rfc3339(moved["at"]) == pytest.approx(adopted_at, abs=1e-3)
    [rb] = decisions(doc, "rollback_completed")
    assert (rb["color"], rb["to"]) == ("green", "blue")
    # Green's failing rounds after the adoption: the third one decides.
    after = [t for t in third if t > adopted_at]
    assert parse_rfc3339(rb["at"]) == pytest.approx(after[2], abs=1e-3)


@pytest.mark.parametrize("with_severity", [True, False])
def test_a_fleet_nodes_rollback_applied_from_its_leader_is_not_this_configs_detection(
    tmp_path: Path, tl: Timeline, with_severity: bool
) -> None:
    """A follower applied the leader's rollback after green's first failure here (the
    leader saw it sooner); replaying the follower's history, its config decides from this
    node's own probes, at the third failure, and the incident is credited to that, never
    to the leader's switch. Records from before switches carried `severity` count alike."""
    tl.start(active="green")
    tl.rounds(150)
    tl.rounds(1, green="http_5xx")
    fleet_at = tl.wall
    tl.incident(
        "rollback_completed",
        source="green",
        target="blue",
        reason="P0 consecutive_failures: 3 >= 3 on green; rolling back to blue",
        severity="P0",
        by="fleet:lb-a",
    )
    if with_severity:
        tl.recorder.switch(
            "green",
            "blue",
            by="fleet:lb-a",
            reason="fleet",
            event="rollback_completed",
            severity="P0",
        )
    else:  # as written before switch records carried the rule's severity
        tl.recorder.add(
            "switch",
            **{"from": "green", "to": "blue"},
            by="fleet:lb-a",
            reason="fleet",
            event="rollback_completed",
        )
    tl.rounds(2, green="http_5xx")
    own_at = tl.wall
    tl.rounds(27, green="http_5xx")
    tl.rounds(150)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    [rb] = decisions(doc, "rollback_completed")
    assert (rb["by"], rb["rule"], rb["color"], rb["to"]) == (
        "guardd",
        "consecutive_failures",
        "green",
        "blue",
    )
    assert abs(parse_rfc3339(rb["at"]) - own_at) <= INTERVAL
    assert parse_rfc3339(rb["at"]) - fleet_at > INTERVAL
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] == rb["at"]
    assert incident["delay_s"] > INTERVAL  # later than the leader, and said so


def test_an_operators_fleet_wide_rollback_is_replayed_as_the_operators(
    tmp_path: Path, tl: Timeline
) -> None:
    tl.start(active="green")
    tl.rounds(100)
    tl.recorder.switch(
        "green",
        "blue",
        by="fleet:uid:0(root)",
        reason="rolled back by hand",
        event="rollback_completed",
        severity=None,
    )
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    [moved] = decisions(doc, "rollback_completed")
    assert (moved["by"], moved["color"], moved["to"]) == ("fleet:uid:0(root)", "green", "blue")
    assert moved["rule"] is None


def test_the_runs_counted_are_those_of_the_period(tmp_path: Path, tl: Timeline) -> None:
    """`history.runs` counts the runs replayed: those begun within `--from`/`--to` (and its
    warm-up) and the run going on when it begins, not every `start` in the files."""
    starts = []
    for _ in range(3):
        tl.start(active="green")
        starts.append(tl.wall)
        tl.rounds(300)  # a minute a run
        tl.tick(600.0)  # then ten minutes down
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")

    def runs(*bounds: str) -> int:
        n = replay_json("--config", str(cfg), *bounds)["history"]["runs"]
        assert isinstance(n, int)
        return n

    assert runs() == 3
    # From the middle of the second run (its start is before the 30 s warm-up).
    middle = rfc3339(starts[1] + 45.0)
    assert runs("--from", middle) == 2
    assert runs("--from", middle, "--to", rfc3339(starts[2] - 60.0)) == 1
    assert runs("--to", rfc3339(starts[1] - 60.0)) == 1


@pytest.mark.parametrize(
    "setting",
    [
        "notify.0.url=SECRETunquoted",  # under notify: whatever its shape
        "probe.headers.Authorization=Bearer SECRETbare",  # a header; a credential's shape
        "upstreams.blue.token=SECRETtoken",  # a credential-like name
        "policy.window=https://user:SECRETpw@example.com/x",  # a URL
        "https://hooks.example.com/services/SECRETnoequals",  # no `=`: all of it a value
        "Bearer SECRETnokey",  # no `=`, a credential's shape
    ],
)
def test_a_bad_set_never_shows_a_value_that_may_be_a_secret(tmp_path: Path, setting: str) -> None:
    """A `--set` that cannot be read is named without its value when that value may be a
    secret, as the report shows such values (fail closed): stderr lands in CI logs."""
    cfg = config(tmp_path, tmp_path / "state")
    done = replay("--config", str(cfg), "--set", setting)
    assert done.returncode == 2, done.stderr
    assert f"{cfg}: " in done.stderr
    assert "SECRET" not in done.stderr + done.stdout
    assert "***" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_period_is_decided_on_the_state_the_whole_history_leaves_at_its_start(
    tmp_path: Path, tl: Timeline
) -> None:
    """`--from` shows what replaying the whole history shows from that time on, wherever
    it falls: before the incident, while the color rolled away from still fails, under the
    QoS lock the rollback took, after its release. The guard's state at `--from` (a
    rollback, its lock, the colors' windows) follows from everything before it."""
    rolled_back_at = _green_fails(tl, failing=300)  # green fails for a minute
    tl.close()
    # A guard window longer than the policy's (30 s): a period may begin under the lock
    # after its rollback fell out of the policy's window.
    cfg = config(tmp_path, tmp_path / "state", qos_window="60s")
    whole = replay_json("--config", str(cfg))["configs"][0]["decisions"]
    assert [d["event"] for d in whole][:2] == ["rollback_completed", "qos_locked"], whole
    for offset in (-5.0, 10.0, 45.0, 75.0):
        since = rolled_back_at + offset
        doc = replay_json("--config", str(cfg), "--from", rfc3339(since))
        got = doc["configs"][0]["decisions"]
        want = [d for d in whole if parse_rfc3339(d["at"]) >= since]
        assert got == want, (offset, got, want)
    # Not vacuous: a period begins under the lock, 45 s after its rollback, and holds its
    # release.
    assert any(
        d["event"] == "qos_released" and parse_rfc3339(d["at"]) >= rolled_back_at + 45.0
        for d in whole
    ), whole


@pytest.mark.parametrize(
    ("resumed", "recorded", "step_s"),
    [(True, True, 0.0), (True, True, -30.0), (True, False, 0.0), (False, True, 0.0)],
)
def test_an_operators_resume_in_the_journal_refills_the_replayed_budget(
    tmp_path: Path, tl: Timeline, resumed: bool, recorded: bool, step_s: float
) -> None:
    """One rollback spends a budget of one; an operator switches back to green and
    resumes: green's next failure is rolled back, as live. Without that resume, the same
    history is a hold (the budget spent). The daemon records the resume on its monotonic
    clock: a wall clock stepped back 30 s just before it (the journal's time 30 s early,
    before the rollback) moves it nowhere. A history from before such records (`recorded`
    false) takes it from the journal."""
    tl.start(active="green", operator=recorded)
    tl.rounds(30)
    tl.rounds(8, green="http_5xx")
    tl.rounds(10)
    tl.recorder.switch("blue", "green", by="uid:0(root)", reason="fixed", event="switch")
    tl.rounds(20)
    tl.wall += step_s  # NTP steps the host's wall clock (records and journal alike)
    if resumed and recorded:
        tl.operator("resumed", reason="budget checked", by="uid:0(root)")
    elif resumed:
        tl.incident("resumed", reason="budget checked", by="uid:0(root)")
    tl.rounds(20)
    failed_at = tl.wall
    tl.rounds(8, green="http_5xx")
    tl.rounds(10)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg), "--set", "policy.max_rollbacks=1")
    rollbacks = decisions(doc, "rollback_completed")
    holds = decisions(doc, "hold")
    if resumed:
        assert len(rollbacks) == 2 and holds == [], doc["configs"][0]["decisions"]
        assert abs(parse_rfc3339(rollbacks[1]["at"]) - failed_at) <= 1.0, rollbacks
        # The resume replayed is listed among the decisions, as the operator's switch is.
        [again] = decisions(doc, "resumed")
        assert (again["by"], again["reason"]) == ("uid:0(root)", "budget checked"), again
        text = replay("--config", str(cfg), "--set", "policy.max_rollbacks=1").stdout
        assert "resumed" in text and "budget checked" in text
    else:
        assert len(rollbacks) == 1 and len(holds) == 1, doc["configs"][0]["decisions"]
        assert "budget" in holds[0]["reason"], holds


@pytest.mark.parametrize(("rounds_before", "says"), [(0, True), (100, False)])
def test_an_operators_move_while_the_replayed_lock_holds_is_said_to_need_force(
    tmp_path: Path, tl: Timeline, rounds_before: int, says: bool
) -> None:
    """Live, nothing stood in the way of the operator's switch; the replayed config still
    held the QoS lock of its rollback then, and guardctl would have refused: the move is
    replayed as recorded, and its reason says so. Long after, nothing is said."""
    tl.start(active="green")
    tl.rounds(30)
    tl.rounds(8, green="http_5xx")
    tl.rounds(rounds_before)
    tl.recorder.switch("blue", "green", by="uid:0(root)", reason="fixed", event="switch")
    tl.rounds(20)
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    [moved] = decisions(doc, "switch")
    assert moved["to"] == "green" and moved["reason"].startswith("fixed"), moved
    assert ("would have refused this move without --force" in moved["reason"]) is says, moved


def test_a_hold_resumed_while_its_color_still_fails_is_a_hold_again_at_once(
    tmp_path: Path, tl: Timeline
) -> None:
    """Blue, the rollback target, is active and fails: a hold. The operator resumes while
    it still fails; live, the woken tick holds again within milliseconds, and so does the
    replay, at the resume, not at the next probe round."""
    tl.start(active="blue")
    tl.rounds(30)
    tl.rounds(20, blue="http_5xx")
    tl.tick(0.05)  # between two probe records
    resumed_at = tl.wall
    tl.operator("resumed", reason="looking at it", by="uid:0(root)")
    tl.rounds(10, blue="http_5xx")
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    holds = decisions(doc, "hold")
    assert len(holds) == 2, doc["configs"][0]["decisions"]
    assert abs(parse_rfc3339(holds[1]["at"]) - resumed_at) <= 0.01, (holds, resumed_at)


@pytest.mark.parametrize("fails_again", [False, True])
def test_a_color_back_from_an_outage_both_had_is_judged_by_its_probes_from_the_rollback(
    tmp_path: Path, tl: Timeline, fails_again: bool
) -> None:
    """Both colors fail (a hold), then blue recovers while green still fails: traffic is
    rolled back to blue, and blue is judged from then on, never held at once as "failing"
    on the outage still in its window. Failing again, it is caught by its new probes."""
    tl.start(active="green")
    tl.rounds(100)
    tl.rounds(20, blue="http_5xx", green="http_5xx")
    tl.rounds(10, green="http_5xx")
    again_from = tl.wall
    tl.rounds(5 if fails_again else 0, blue="http_5xx", green="http_5xx")
    tl.rounds(100, green="http_5xx")
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    [rb] = decisions(doc, "rollback_completed")
    assert (rb["color"], rb["to"]) == ("green", "blue"), rb
    after = [h for h in decisions(doc, "hold") if parse_rfc3339(h["at"]) > parse_rfc3339(rb["at"])]
    if fails_again:
        # The first hold after the rollback: blue's third new failure, no sooner.
        again = after[0]
        assert again["color"] == "blue" and again["rule"] == "consecutive_failures", after
        # (blue is probed half-way through each round)
        assert parse_rfc3339(again["at"]) == pytest.approx(again_from + 2.5 * INTERVAL, abs=0.01)
    else:
        assert after == [], after


@pytest.mark.parametrize(
    "what_if",
    [
        ("--set", "policy.consecutive_failures=10"),
        ("--set", 'probe.interval="1s"'),
        ("--set", 'probe.interval="1s"', "--set", "policy.consecutive_failures=10"),
    ],
)
def test_a_config_without_fast_interval_is_replayed_and_tried_like_any(
    tmp_path: Path, tl: Timeline, what_if: tuple[str, ...]
) -> None:
    """`probe.fast_interval` is optional (it defaults to `probe.interval`): what-ifs that
    detect later than live or thin the recorded rounds report as with it set, never a
    traceback."""
    _green_fails(tl)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state", qos_window="10s")
    cfg.write_text(cfg.read_text().replace('fast_interval = "100ms"\n', ""))
    doc = replay_json("--config", str(cfg), *what_if)
    [rb] = decisions(doc, "rollback_completed")
    assert rb["color"] == "green", rb
    text = replay("--config", str(cfg), *what_if)
    assert text.returncode == 0 and "Traceback" not in text.stderr, text.stderr[-800:]


def test_a_slower_cadence_tried_hears_the_front_door_as_often_as_it_would_have_asked(
    tmp_path: Path, tl: Timeline
) -> None:
    """The front door failed three answers in a row (200 ms apart) while green's probes
    passed: live, a mismatch. A what-if at 1 s asks the front door once a second too: it
    hears one failure, as a guard at that cadence would have, and sees no mismatch."""
    tl.start(active="green")
    tl.rounds(150, front_door=True)
    tl.rounds(3, front_door=False)
    tl.rounds(150, front_door=True)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state", qos_window="10s")
    door = ("--set", 'switch.verify_url="http://127.0.0.1:11/"')
    recorded = replay_json("--config", str(cfg), *door)
    assert [d for d in decisions(recorded, "alert") if "front door" in d["reason"]]
    slower = replay_json("--config", str(cfg), *door, "--set", 'probe.interval="1s"',
                         "--set", 'probe.fast_interval="1s"')  # fmt: skip
    assert not [d for d in decisions(slower, "alert") if "front door" in d["reason"]], decisions(
        slower, "alert"
    )


@pytest.mark.parametrize("header", [False, True], ids=["verify_url", "verify_header"])
def test_a_replayed_rollback_verifies_at_once_with_or_without_a_verify_header(
    tmp_path: Path, tl: Timeline, header: bool
) -> None:
    """A replayed switch succeeds and verifies at once (docs/contract.md): with
    `switch.verify_header` too, whose answers must name the target, the front door of
    the replay names the color its switch serves. Before, such a config never verified:
    each rollback waited out its verify budget, was undone, and became a hold."""
    _two_rollbacks(tl)
    cfg = config(tmp_path, tmp_path / "state")
    sets = ["--set", 'switch.verify_url="http://127.0.0.1:11/"']
    if header:
        sets += ["--set", 'switch.verify_header="X-Served-Color"']
    doc = replay_json("--config", str(cfg), *sets)
    events = [d["event"] for d in doc["configs"][0]["decisions"]]
    moves = [e for e in events if e.startswith("rollback") or e in ("hold", "alert")]
    assert moves == ["rollback_completed"] * 2, events
    assert events.count("qos_released") == 2, events


def test_an_operators_rollback_is_no_detection_of_the_config(tmp_path: Path, tl: Timeline) -> None:
    """An operator rolled green back by hand (`guardctl rollback`), green healthy all along:
    the replay moves traffic as they did, but that move is theirs. Credited to the config,
    every config would "detect" every incident an operator ended, at once; the incident is
    undetected, and the replayed move is no decision "where the live guard did not"."""
    tl.start(active="green")
    tl.rounds(150)
    by = "uid:0(root)"
    tl.incident("rollback_completed", source="green", target="blue", reason="manual", by=by)
    tl.recorder.switch("green", "blue", by=by, reason="manual", event="rollback_completed")
    tl.rounds(150)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] is None, incident
    assert doc["configs"][0]["unmatched"] == []
    moved = [d for d in doc["configs"][0]["decisions"] if d["event"] == "rollback_completed"]
    assert [d["by"] for d in moved] == [by], moved


def _two_rollbacks(tl: Timeline, *, step_back: float = 0.0) -> None:
    """Green fails twice and is rolled back each time (live, journaled), promoted back
    between; the wall clock stepped back `step_back` seconds before the second failure."""
    for second in (False, True):
        if second:
            tl.recorder.switch("blue", "green", by="deploy", reason="promote", event="promote")
            tl.rounds(150)
            tl.wall -= step_back
        else:
            tl.start(active="green")
        tl.rounds(150)
        tl.rounds(3, green="http_5xx")
        tl.rolled_back()
        tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
        tl.rounds(30, green="http_5xx")
    tl.rounds(150)
    tl.close()


def test_a_decision_no_live_incident_matches_is_said(tmp_path: Path, tl: Timeline) -> None:
    """A config that acts where the live guard did not (here: the second rollback lost
    from the journal and the observations alike, as if the live guard never took it)
    shows it under its own heading, in the JSON as `unmatched`; one whose every decision
    matches an incident shows none."""
    _two_rollbacks(tl)
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    assert doc["configs"][0]["unmatched"] == []
    assert "Decided where the live guard did not" not in replay("--config", str(cfg)).stdout
    journal = tmp_path / "state" / "events.jsonl"
    *kept, _second = journal.read_text().splitlines(keepends=True)  # (`started`, the first)
    journal.write_text("".join(kept))
    [day] = (tmp_path / "state" / "observations").iterdir()
    records = gzip.decompress(day.read_bytes()).decode().splitlines(keepends=True)
    rolled_live = [i for i, r in enumerate(records) if '"by":"guardd"' in r and "switch" in r]
    del records[rolled_live[-1]]
    day.write_bytes(gzip.compress("".join(records).encode()))
    doc = replay_json("--config", str(cfg))
    [extra] = doc["configs"][0]["unmatched"]
    [_, rolled] = decisions(doc, "rollback_completed")
    assert extra == {k: rolled[k] for k in ("at", "event", "color", "to", "rule", "severity")}
    assert len(doc["configs"][0]["incidents"]) == 1
    text = replay("--config", str(cfg)).stdout
    assert "Decided where the live guard did not:\n" in text
    assert (
        f"  {rolled['at']}  rollback green -> blue (consecutive_failures): no such incident in "
        f"the journal within {doc['configs'][0]['match_window_s']:g}s: the live guard did not "
        "act then"
    ) in text
    # Without a journal, nothing can be said to match or not: no such list.
    journal.unlink()
    assert replay_json("--config", str(cfg))["configs"][0]["unmatched"] == []


def test_decisions_are_listed_in_the_order_taken_across_a_wall_clock_stepped_back(
    tmp_path: Path, tl: Timeline
) -> None:
    """The wall clock stepped back an hour between two rollbacks: the second is stamped
    earlier than the first, and is listed after it, as taken; the period's line says the
    clock went back within it."""
    _two_rollbacks(tl, step_back=3600.0)
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    first, second = decisions(doc, "rollback_completed")
    assert parse_rfc3339(second["at"]) < parse_rfc3339(first["at"])
    text = replay("--config", str(cfg)).stdout
    assert text.index(first["at"]) < text.index(second["at"])
    assert "(the wall clock was stepped back within it: times repeat, see Skipped)" in text


def test_an_operators_move_to_the_color_already_served_is_said(
    tmp_path: Path, tl: Timeline
) -> None:
    """Live, an operator promoted green back after a rollback; a what-if that never rolled
    back (a dry run) already serves green then: no move is made, and the notes say so
    rather than leave the live promote unaccounted for."""
    _two_rollbacks(tl)
    promoted = next(
        r.ts
        for r in read_history(tmp_path / "state" / "observations", ReadReport())
        if r.kind == "switch" and r.doc.get("event") == "promote"
    )
    cfg = config(tmp_path, tmp_path / "state")
    assert replay_json("--config", str(cfg))["configs"][0]["notes"] == []
    doc = replay_json("--config", str(cfg), "--set", "policy.dry_run=true")
    assert decisions(doc, "rollback_completed") == [] and decisions(doc, "promote") == []
    said = (
        "1 operator move(s) made no move here, this config already serving their color: "
        f"promote to green at {rfc3339(promoted)}"
    )
    assert doc["configs"][0]["notes"] == [said]
