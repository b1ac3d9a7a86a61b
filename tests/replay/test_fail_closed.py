"""`guardd replay` fails closed: no record to judge is no verdict, an incident the history
does not cover is not "not detected", a reversed period is a usage error, and what came
from the environment or could not be read is said."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from guardd.replay import _report, env_settings
from guardd.timestamps import parse_rfc3339, rfc3339
from tests.harness.shell import redirected
from tests.replay.history import DAY0, GUARDD, Timeline, config, decisions, replay, replay_json


def _healthy(state: Path, rounds: int = 300) -> Timeline:
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(rounds)
    return tl


def test_an_only_file_of_random_bytes_or_empty_is_no_history_to_judge(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tl = _healthy(state)
    tl.incident("rollback_completed", source="green", target="blue", reason="x", severity="P0")
    tl.close()
    [day] = sorted((state / "observations").iterdir())
    cfg = config(tmp_path, state)
    for content in (os.urandom(4096), b""):
        day.write_bytes(content)
        for args in ([], ["--json"]):
            done = replay("--config", str(cfg), *args)
            assert done.returncode == 1, done.stdout
            assert "no history to judge" in done.stderr
            assert str(day) in done.stderr
            assert "No decision" not in done.stdout and "not detected" not in done.stdout
            assert "Traceback" not in done.stderr


def test_a_period_without_history_says_so_and_exits_1(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    lo, hi = rfc3339(DAY0 - 7200), rfc3339(DAY0 - 3600)
    done = replay("--config", str(cfg), "--from", lo, "--to", hi)
    assert done.returncode == 1, done.stdout
    assert f"no history between {lo} and {hi}" in done.stderr
    assert "no record in the period" in done.stderr
    assert "No decision" not in done.stdout


def test_an_incident_outside_the_recorded_time_is_not_covered_not_missed(
    tmp_path: Path,
) -> None:
    tl = _healthy(tmp_path / "state")
    tl.tick(7200)  # two hours nothing was recorded (the daemon was down)
    tl.rolled_back()
    end = tl.wall + 60
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    period = ("--from", rfc3339(DAY0), "--to", rfc3339(end))
    doc = replay_json("--config", str(cfg), *period)
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] is None and incident["covered"] is False
    assert incident["not_covered"] == "the history ends 2h before it", incident
    text = replay("--config", str(cfg), *period)
    assert text.returncode == 0, text.stderr
    assert "not covered by the history (the history ends 2h before it)" in text.stdout
    assert "not detected" not in text.stdout


def test_an_incident_too_early_for_a_what_if_says_what_the_what_if_needs(
    tmp_path: Path,
) -> None:
    """10 s of records before a live rollback: enough for 3 failures at 200 ms, not for
    the 100 a what-if asks. The incident is not covered, and says why, with the figures."""
    tl = Timeline(tmp_path / "state")
    tl.start(active="green")
    tl.rounds(50)
    tl.rolled_back()
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    [covered] = replay_json("--config", str(cfg))["configs"][0]["incidents"]
    assert covered["covered"] is True and covered["not_covered"] is None, covered
    what_if = ("--config", str(cfg), "--set", "policy.consecutive_failures=100")
    [incident] = replay_json(*what_if)["configs"][0]["incidents"]
    why = "the history begins 10s before it, and consecutive_failures = 100 at 0.2s take 20s"
    assert (incident["covered"], incident["not_covered"]) == (False, why), incident
    assert f"not covered by the history ({why})" in replay(*what_if).stdout


def test_an_incident_a_quicker_rule_caught_is_detected_whatever_the_counted_rule_needs(
    tmp_path: Path,
) -> None:
    """10 s of records before a live rollback, and green failing on: a what-if asking
    100 failures in a row could not have rolled back by that rule, but its P1 ratio rule
    did, within the match window. That is a detection, with its time, never "not
    covered" for the rule that did not fire."""
    tl = Timeline(tmp_path / "state")
    tl.start(active="green")
    tl.rounds(50)
    tl.rounds(3, green="http_5xx")
    live_at = tl.wall
    tl.rolled_back()
    tl.rounds(60, green="http_5xx")
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg), "--set", "policy.consecutive_failures=100")
    [rb] = decisions(doc, "rollback_completed")
    assert rb["rule"] == "p1_error_ratio", rb
    [incident] = doc["configs"][0]["incidents"]
    assert (incident["covered"], incident["not_covered"]) == (True, None), incident
    assert incident["detected_at"] == rb["at"]
    assert incident["delay_s"] == pytest.approx(parse_rfc3339(rb["at"]) - live_at, abs=0.002)


def test_a_rollback_decided_before_to_and_completed_after_it_is_in_the_period(
    tmp_path: Path,
) -> None:
    """The report places a live rollback at its decision (`rollback_started`): one whose
    switch completed after `--to` is still an incident of a period that holds the
    decision, matched with the replayed one."""
    tl = Timeline(tmp_path / "state")
    tl.start(active="green")
    tl.rounds(50)
    tl.rounds(3, green="http_5xx")
    decided = tl.wall
    tl.incident("rollback_started", id="rb-1", source="green", target="blue", severity="P0")
    tl.tick(0.25)
    tl.incident(
        "rollback_completed", rollback_id="rb-1", source="green", target="blue", severity="P0",
        reason="P0 consecutive_failures: 3 >= 3 on green; rolling back to blue",
        evidence={"rule": "consecutive_failures"},
    )  # fmt: skip
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg), "--to", rfc3339(decided + 0.1))
    [incident] = doc["configs"][0]["incidents"]
    assert incident["at"] == rfc3339(decided)
    assert incident["detected_at"] is not None and abs(incident["delay_s"]) <= 0.2, incident


def test_from_after_to_is_a_usage_error(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    for lo, hi in (
        ("2026-12-01T05:13Z", "2026-12-01T05:12Z"),
        ("1h", "2h"),
        ("now", "30s"),
        ("2026-12-01T05:12Z", "2026-12-01T05:12:00.000Z"),  # no time at all between
    ):
        done = replay("--config", str(cfg), "--from", lo, "--to", hi)
        assert done.returncode == 2, done.stdout
        assert f"--from {lo}" in done.stderr
        assert "is after" in done.stderr or "is the same time as" in done.stderr
        assert "usage error" in done.stderr
        assert done.stdout == ""


def test_records_before_the_period_are_counted_apart_as_warm_up(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state", rounds=600)  # 120 s of rounds from DAY0 + 3600
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")  # policy.window 30s: the warm-up
    all_records = replay_json("--config", str(cfg))["history"]
    assert all_records["warmup_records"] == 0
    doc = replay_json("--config", str(cfg), "--from", rfc3339(DAY0 + 3600 + 60))
    h = doc["history"]
    assert h["warmup_records"] > 0
    # 60 s of the 120 s are in the period; everything before it is replayed as its
    # warm-up, counted apart.
    assert h["records"] + h["warmup_records"] == all_records["records"]
    assert abs(h["records"] - all_records["records"] / 2) <= 10
    text = replay("--config", str(cfg), "--from", rfc3339(DAY0 + 3600 + 60)).stdout
    assert f"{h['records']} records (and {h['warmup_records']} before it" in text


def test_settings_from_the_environment_are_listed_secrets_redacted(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    env = {**os.environ, "GUARDD_POLICY__CONSECUTIVE_FAILURES": "7", "GUARDD_CONFIG": "/x"}
    for args in (["--json"], []):
        done = replay("--config", str(cfg), *args, env=env)
        assert done.returncode == 0, done.stderr
        assert "GUARDD_POLICY__CONSECUTIVE_FAILURES=7" in done.stdout
        assert "GUARDD_CONFIG" not in done.stdout  # names a file, not a setting
    listed = env_settings(
        {
            "GUARDD_NOTIFY__0__HEADERS__AUTHORIZATION": "Bearer abcdef123456",
            "GUARDD_POLICY__WINDOW": "60s",
            "HOME": "/root",
        }
    )
    assert listed == ["GUARDD_NOTIFY__0__HEADERS__AUTHORIZATION=***", "GUARDD_POLICY__WINDOW=60s"]
    # In any case, as the config takes them (pydantic-settings is not case-sensitive): a
    # setting that changed the config is never left out of the list.
    listed = env_settings(
        {
            "guardd_policy__window": "60s",
            "Guardd_Probe__Headers": '{"X": "y"}',
            "guardd_config": "x",
        }
    )
    assert listed == ["Guardd_Probe__Headers=***", "guardd_policy__window=60s"]


def test_a_misspelt_variable_is_warned_of_as_check_config_warns(tmp_path: Path) -> None:
    """`GUARDD_POLICY_WINDOW` (one underscore) names no setting: the what-if it was meant
    for did not apply, and replay says so on stderr as `check-config` does (once, with
    `--compare` too), and still runs."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    env = {**os.environ, "GUARDD_POLICY_WINDOW": "5"}
    warning = (
        "env GUARDD_POLICY_WINDOW: policy.window: warning: names no setting and is ignored; "
        "did you mean GUARDD_POLICY__WINDOW?\n"
    )
    for args in (["--json"], ["--compare", str(cfg)]):
        done = replay("--config", str(cfg), *args, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stderr == warning


#: Settings whose values hold a secret under a name that does not say so: a whole section
#: or table as JSON, a header of any name, a webhook's URL (its token in the path).
_HIDDEN_SECRETS = {
    "GUARDD_NOTIFY": '[{"kind":"webhook","url":"http://127.0.0.1:9/hooks/ENVHOOKSECRET"}]',
    "GUARDD_PROBE__HEADERS": '{"X-Api-Key":"ENVKEYSECRET"}',
    "GUARDD_PROBE__HEADERS__X_TRACE": "ENVHEADERSECRET",
}
_HIDDEN_SETS = (
    'notify.0.url="http://127.0.0.1:9/hooks/SETSECRET123"',
    'probe.headers={Authorization="Bearer SETBEARERSECRET"}',
    'upstreams.blue.url="http://u:SETPASSWORD@127.0.0.1:9/healthz"',
)


def test_a_secret_in_a_setting_is_never_shown_whatever_its_name(tmp_path: Path) -> None:
    """The settings from the environment and `--set` are shown with their values, but a
    value that may hold a secret is `***` (fail closed): a table or a list, anything
    under notify or headers, a URL."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    sink = '[[notify]]\nkind = "webhook"\nurl = "http://127.0.0.1:9/hooks/FILESECRET"\n'
    cfg = config(tmp_path, tmp_path / "state", extra=sink)
    listed = env_settings({**_HIDDEN_SECRETS, "GUARDD_POLICY__WINDOW": "60s"})
    assert listed == sorted(
        [*(f"{name}=***" for name in _HIDDEN_SECRETS), "GUARDD_POLICY__WINDOW=60s"]
    )
    sets = [x for s in (*_HIDDEN_SETS, "policy.consecutive_failures=5") for x in ("--set", s)]
    for args in (["--json"], []):
        done = subprocess.run(
            [*GUARDD, "replay", "--config", str(cfg), *sets, *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, **_HIDDEN_SECRETS},
        )
        assert done.returncode == 0, done.stderr
        out = done.stdout + done.stderr
        for secret in ("SECRET", "SETPASSWORD"):
            assert secret not in out, out
        assert "GUARDD_NOTIFY=***" in out
        if args:  # the JSON's `set` (the text shows it beside a `--compare` only)
            assert json.loads(done.stdout)["configs"][0]["set"][-2:] == [
                "upstreams.blue.url=***",
                "policy.consecutive_failures=5",
            ]


@pytest.mark.parametrize(
    "when",
    [
        "99999999d",
        "99999999999d",
        "123456789012345678901234567890s",
        "0001-01-01T00:00+01:00",
        "10000-01-01T00:00:00Z",
        "+275760-09-13",
    ],
)
def test_a_time_no_clock_can_say_is_a_usage_error(tmp_path: Path, when: str) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    for flag in ("--from", "--to"):
        done = replay("--config", str(cfg), flag, when)
        assert done.returncode == 2, done.stderr
        assert f"{when!r} is not a time from 1970 to 9999" in done.stderr
        assert "usage error" in done.stderr and "Traceback" not in done.stderr


def test_an_empty_time_is_a_usage_error_never_no_bound(tmp_path: Path) -> None:
    """`--from=` (a variable that was empty) is no time: refused, never read as "from the
    beginning" of the history."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    for given in ("--from=", "--to=", "--from= "):
        done = replay("--config", str(cfg), given)
        assert done.returncode == 2, done.stdout
        assert "is neither ISO 8601" in done.stderr and "usage error" in done.stderr


def test_a_file_named_after_no_real_day_is_no_file_of_the_history(tmp_path: Path) -> None:
    """A copy named `lab-9999-99-99.jsonl.gz` (or month 13) was a traceback: it is not a
    name the recorder gives, so it is no file of the history, as any other name; each such
    entry (a backup copy, an unzipped copy) is said not read, never ignored unsaid."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    first = replay_json("--config", str(cfg))["history"]
    assert first["problems"] == []
    [day] = (tmp_path / "state" / "observations").iterdir()
    strays = [
        "lab-9999-99-99.jsonl.gz",
        "lab-2026-13-01.jsonl.gz",
        f"{day.name}.bak",
        day.name.removesuffix(".gz"),
    ]
    for name in strays:
        (day.parent / name).write_bytes(day.read_bytes())
    (day.parent / "old").mkdir()
    done = replay("--config", str(cfg), "--json")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    history = json.loads(done.stdout)["history"]
    assert history["records"] == first["records"]
    assert history["problems"] == [
        f"{day.parent / name}: not read: not named <guard>-<YYYY-MM-DD>.jsonl.gz as the daemon "
        "names its files"
        for name in sorted([*strays, "old"])
    ]
    for n in range(30):
        (day.parent / f"junk-{n}").touch()
    problems = replay_json("--config", str(cfg))["history"]["problems"]
    assert len(problems) == 21 and problems[-1].endswith(
        "15 more entries not read, named otherwise"
    )


def test_a_set_value_too_long_to_read_is_a_usage_error(tmp_path: Path) -> None:
    """An integer of 5000 digits is more than tomllib reads (Python's int limit): a
    traceback before; a `--set` problem now, exit 2."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    done = replay("--config", str(cfg), "--set", "policy.consecutive_failures=" + "9" * 5000)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-500:]
    assert "policy.consecutive_failures: --set:" in done.stderr


def test_a_missing_journal_is_said_and_junk_lines_are_counted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tl = _healthy(state)
    tl.close()
    cfg = config(tmp_path, state)
    journal = state / "events.jsonl"
    journal.unlink()
    text = replay("--config", str(cfg))
    assert text.returncode == 0, text.stderr
    assert "none in this period" not in text.stdout
    assert f"Incidents: unknown: {journal}: cannot read the journal" in text.stdout
    # Besides lines that are no event: incidents of a color no guard has, or at no time.
    purple = {"event": "rollback_completed", "from": "purple", "to": "blue", "ts": rfc3339(DAY0)}
    garbage = {"event": "rollback_started", "from": "green", "to": "blue", "ts": "garbage"}
    timeless = {"event": "hold", "from": "green", "ts": "garbage"}
    lines = [json.dumps(e) for e in (purple, garbage, timeless)]
    journal.write_text('{"event": "hold"\nnot json\n{"no": "event"}\n' + "\n".join(lines) + "\n")
    doc = replay_json("--config", str(cfg))
    assert doc["journal_skipped"] == 6, doc["journal_skipped"]  # every line above
    assert doc["configs"][0]["incidents"] == []
    text = replay("--config", str(cfg))
    assert f"6 journal line(s) of {journal}: not an event as guardd writes it" in text.stdout
    assert "purple" not in text.stdout


def test_journal_incidents_written_by_hand_or_by_another_guard_are_shown_as_read(
    tmp_path: Path,
) -> None:
    """A journal edited by hand: a time without milliseconds is shown as every time of
    the report is; a rule that is no name (an object, a number) is no rule, never a
    Python repr; an incident of another guard is counted, never dropped unsaid."""
    state = tmp_path / "state"
    tl = _healthy(state)
    tl.close()
    cfg = config(tmp_path, state)
    at = DAY0 + 3600 + 10
    bare = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    hand = [
        {"event": "hold", "guard": "lab", "from": "green", "ts": bare,
         "evidence": {"rule": {"name": "x"}}},
        {"event": "hold", "guard": "lab", "from": "green", "ts": rfc3339(at + 1),
         "evidence": {"rule": 7}},
        {"event": "rollback_completed", "guard": "other", "from": "green", "to": "blue",
         "ts": rfc3339(at + 2)},
    ]  # fmt: skip
    (state / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in hand))
    doc = replay_json("--config", str(cfg))
    incidents = doc["configs"][0]["incidents"]
    assert [(i["at"], i["rule"]) for i in incidents] == [
        (rfc3339(at), None),
        (rfc3339(at + 1), None),
    ]
    assert doc["journal_other_guards"] == 1
    text = replay("--config", str(cfg)).stdout
    assert f"  {rfc3339(at)}  hold green (no rule)" in text
    assert "{'name'" not in text and "(7)" not in text
    assert f"1 incident(s) of {state / 'events.jsonl'}: of another guard" in text


def test_without_config_guardd_config_is_used_as_the_help_says(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    done = subprocess.run(
        [*GUARDD, "replay", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "GUARDD_CONFIG": str(cfg)},
    )
    assert done.returncode == 0, done.stderr
    assert str(cfg) in done.stdout
    helped = subprocess.run(
        [*GUARDD, "replay", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "$GUARDD_CONFIG" in helped.stdout and "usage" in helped.stdout
    assert "[--config PATH]" in helped.stdout


def test_a_reader_that_leaves_early_ends_it_quietly(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    for args in (["--json"], []):
        # The reader closes its end before replay writes a byte (`| (sleep 0.1)`).
        proc = subprocess.Popen(
            [*GUARDD, "replay", "--config", str(cfg), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        with proc.stderr:
            err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 1
        assert err == "", err
    # `| head -1`: the reader takes one line, then leaves.
    done = redirected("| head -1", *GUARDD, "replay", "--config", str(cfg), "--json", timeout=300)
    assert done.stdout == "{\n"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_missing_observations_folder_hints_at_state_dir(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "state")
    # The config's own state.dir.
    done = replay("--config", str(cfg))
    assert done.returncode == 1
    assert "this is the config's state.dir" in done.stderr
    assert '--set state.dir="/path/to/the/copy"' in done.stderr
    # No state.dir in the config: guardd's default (here $STATE_DIRECTORY).
    bare = tmp_path / "bare.toml"
    bare.write_text(
        "\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("dir ="))
    )
    done = subprocess.run(
        [*GUARDD, "replay", "--config", str(bare)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "STATE_DIRECTORY": str(tmp_path / "default-state")},
    )
    assert done.returncode == 1, done.stderr
    assert f"{tmp_path / 'default-state' / 'observations'}: no such directory" in done.stderr
    assert "the config sets no state.dir: this is guardd's default" in done.stderr
    assert '--set state.dir="/path/to/the/copy"' in done.stderr


def test_another_instances_history_is_named(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")  # instance "lab"
    tl.close()
    cfg = config(tmp_path, tmp_path / "state", instance="other")
    done = replay("--config", str(cfg))
    assert done.returncode == 1
    assert "no observation file" in done.stderr
    assert "it holds the files of instance(s) lab, not of 'other'" in done.stderr


def test_compare_says_what_set_and_the_history_apply_to(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    a = config(tmp_path, tmp_path / "state")
    b = config(tmp_path, tmp_path / "elsewhere", instance="candidate")
    sets = ("--set", "policy.consecutive_failures=5")
    doc = replay_json("--config", str(a), "--compare", str(b), *sets)
    notes = doc["configs"][1]["notes"]
    assert doc["configs"][0]["notes"] == []
    assert "--set applies to A only" in notes
    assert any("instance 'candidate' differs from A's 'lab'" in n for n in notes), notes
    assert any(
        f"state.dir {tmp_path / 'elsewhere'} differs" in n and "A's history" in n for n in notes
    ), notes
    text = replay("--config", str(a), "--compare", str(b), *sets).stdout
    assert "--set applies to A only" in text
    assert "replayed over A's history" in text
    same = replay_json("--config", str(a), "--compare", str(a))
    assert same["configs"][1]["notes"] == []


def test_the_day_file_being_written_reads_as_the_docs_say(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state", rounds=20)
    [day] = (tmp_path / "state" / "observations").iterdir()
    # Still being written: every whole line, then the unfinished member is complained of.
    live = subprocess.run(["gzip", "-dc", str(day)], capture_output=True, timeout=60, check=False)
    assert live.returncode == 1
    assert b"unexpected end of file" in live.stderr
    records = [json.loads(raw) for raw in live.stdout.splitlines()]
    assert len(records) == 1 + 2 * 20  # the run's start and each color's rounds
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    assert doc["history"]["records"] == len(records)
    tl.close()
    done = subprocess.run(["zcat", str(day)], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == live.stdout


def test_records_without_a_probe_round_of_both_colors_are_no_history_to_judge(
    tmp_path: Path,
) -> None:
    # Readable records the guard can never decide on (a run that only began, front-door
    # answers, one color's probes): "No decision" would be a verdict on nothing.
    def only_start(tl: Timeline) -> None:
        tl.start(active="green")

    def only_front_door(tl: Timeline) -> None:
        tl.start(active="green")
        for _ in range(50):
            tl.tick(0.2)
            tl.recorder.front_door(True, None)

    def only_green(tl: Timeline) -> None:
        tl.start(active="green")
        for _ in range(50):
            tl.tick(0.2)
            tl.recorder.probe("green", "ok", 0.004, None, 200)

    for i, write in enumerate((only_start, only_front_door, only_green)):
        state = tmp_path / f"s{i}"
        tl = Timeline(state)
        write(tl)
        tl.close()
        cfg = config(tmp_path, state)
        for args in ([], ["--json"]):
            done = replay("--config", str(cfg), *args)
            assert done.returncode == 1, (write.__name__, done.stdout)
            assert "no history to judge" in done.stderr, done.stderr
            assert "never took a decision tick" in done.stderr, done.stderr
            assert "No decision" not in done.stdout and "Traceback" not in done.stderr


def test_an_output_that_cannot_be_written_is_exit_1_and_one_line(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    for args in (["--json"], []):
        command = [*GUARDD, "replay", "--config", str(cfg), *args]
        assert (
            redirected(">/dev/null", *command, timeout=300).returncode == 0
        )  # the history itself is fine
        full = redirected(">/dev/full", *command, timeout=300)
        assert full.returncode == 1
        assert full.stderr == "guardd replay: cannot write the output: No space left on device\n"
        closed = redirected(">&-", *command, timeout=300)
        assert closed.returncode == 1
        assert closed.stderr == "guardd replay: cannot write the output: stdout is closed\n"


def test_a_history_that_ends_or_begins_within_an_incident_does_not_judge_it(
    tmp_path: Path,
) -> None:
    """The records stop 3 s before a rollback (a copy taken then, a disk that filled), or
    begin 1.2 s after one: the incident is listed as not covered by the history, never
    "none in this period", never "not detected"."""
    ends = tmp_path / "ends"
    tl = _healthy(ends / "state")
    tl.tick(3.0)  # the failures were never recorded
    tl.rolled_back()
    tl.close()
    begins = tmp_path / "begins"
    tl = Timeline(begins / "state")
    tl.rolled_back()
    at = tl.wall
    tl.tick(1.2)
    tl.start(active="blue")
    tl.rounds(300)
    tl.close()
    for root, period in (
        (ends, ()),
        (ends, ("--to", rfc3339(tl.wall + 3600))),
        (begins, ("--from", rfc3339(at - 60))),
    ):
        cfg = config(root, root / "state")
        doc = replay_json("--config", str(cfg), *period)
        [incident] = doc["configs"][0]["incidents"]
        assert incident["detected_at"] is None and incident["covered"] is False, incident
        text = replay("--config", str(cfg), *period)
        assert text.returncode == 0, text.stderr
        assert "not covered by the history" in text.stdout
        assert "not detected" not in text.stdout and "none in this period" not in text.stdout


def test_incidents_after_a_history_cut_short_are_listed_as_not_covered(tmp_path: Path) -> None:
    """The records end (a copy cut short, recording stopped) while the journal goes on:
    its later incidents, a minute and a day on, are listed as not covered by the history
    without `--to` too, so the report never looks complete when it is not."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    for later in (60.0, 86_400.0):
        tl.wall += later
        tl.journal.open()
        tl.rolled_back()
        tl.journal.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    found = doc["configs"][0]["incidents"]
    assert len(found) == 2, found
    assert all(i["covered"] is False and i["detected_at"] is None for i in found), found
    text = replay("--config", str(config(tmp_path, tmp_path / "state"))).stdout
    assert text.count("not covered by the history") == 2, text


def test_an_incident_in_a_stretch_of_stepped_wall_clock_is_in_the_period(tmp_path: Path) -> None:
    """The wall clock ran an hour ahead for a while (both the records and the journal):
    the period reaches the latest time recorded, not the last record's, and the rollback
    taken then is matched."""
    tl = _healthy(tmp_path / "state")
    tl.wall += 3600.0  # stepped ahead
    tl.rounds(3, green="http_5xx")
    tl.rolled_back()
    stepped = tl.wall
    tl.rounds(50)
    tl.wall -= 3600.0  # and back
    tl.rounds(100)
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    assert parse_rfc3339(doc["history"]["to"]) >= stepped, doc["history"]
    [incident] = doc["configs"][0]["incidents"]
    assert incident["covered"] is True and incident["detected_at"] is not None, incident


def _two_days(state: Path) -> Path:
    """A run that goes on past midnight (green served, failing on the second day, and
    rolled back); its first day pruned away. Returns the second day's file."""
    tl = Timeline(state, wall=DAY0 - 60)
    tl.start(active="green")
    tl.rounds(600)  # two minutes: past midnight
    tl.rounds(3, green="http_5xx")
    tl.rounds(20, green="http_5xx")
    tl.close()
    first, second = sorted((state / "observations").iterdir())
    first.unlink()  # `state.keep_observations` let it go
    return second


def test_a_history_that_begins_mid_run_knows_its_color_from_the_days_head(
    tmp_path: Path,
) -> None:
    """The oldest file kept begins mid-run: its `context` head says which color was
    served, and the day is replayed as the daemon lived it."""
    _two_days(tmp_path / "state")
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    [rb] = decisions(doc, "rollback_completed")
    assert rb["color"] == "green" and rb["to"] == "blue", rb
    assert not any("mid-run" in p for p in doc["history"]["problems"])


def test_a_history_that_begins_mid_run_without_a_head_is_not_replayed_on_a_guess(
    tmp_path: Path,
) -> None:
    """Files written before days had a head: which color was served is unknown, so the
    records are left out and said, never replayed as if blue (or green) were served."""
    day = _two_days(tmp_path / "state")
    lines = gzip.decompress(day.read_bytes()).splitlines(keepends=True)
    assert json.loads(lines[0])["kind"] == "context"
    day.write_bytes(gzip.compress(b"".join(lines[1:])))
    cfg = config(tmp_path, tmp_path / "state")
    done = replay("--config", str(cfg))
    assert done.returncode == 1, done.stdout
    assert "the history begins mid-run, without a start record" in done.stderr
    assert "record before the served color was known" in done.stderr
    assert "No decision" not in done.stdout and "Traceback" not in done.stderr


def test_a_history_whose_color_a_switch_tells_says_it_begins_mid_run(tmp_path: Path) -> None:
    """The only file lost its `start` (a corrupt first member, a copy begun late), and a
    switch's `from` tells which color was served before it: replayed, and said, never as
    if the history began with a run."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.green_rolled_back()
    tl.rounds(50)
    tl.close()
    [day] = sorted((state / "observations").iterdir())
    lines = gzip.decompress(day.read_bytes()).splitlines(keepends=True)
    assert json.loads(lines[0])["kind"] == "start"
    day.write_bytes(gzip.compress(b"".join(lines[1:])))
    doc = replay_json("--config", str(config(tmp_path, state)))
    [rb] = decisions(doc, "rollback_completed")
    assert rb["color"] == "green", rb
    said = [p for p in doc["history"]["problems"] if "begins mid-run" in p]
    assert len(said) == 1 and "was taken from the first switch's `from`, at " in said[0], said


@pytest.mark.parametrize("head", ["context", "start"])
def test_records_before_the_first_that_tells_the_color_are_left_out_whatever_follows(
    tmp_path: Path, head: str
) -> None:
    """The first day's file lost its `start` (a corrupt first member, a copy begun late);
    the next day's file begins with its `context` head, or a new run's `start`. The records
    before that head are left out and said, never replayed under the color it tells (a
    `context` says the color as of its own time, a `start` its own run's): no made-up
    hold, and the second day's incident still found."""
    state = tmp_path / "state"
    tl = Timeline(state, wall=DAY0 - 60)
    tl.start(active="green")
    tl.rounds(300)  # one minute, then midnight
    if head == "start":
        tl.close()
        tl = Timeline(state, wall=DAY0 + 5)
        tl.start(active="green")
    tl.rounds(300)
    tl.rounds(23, green="http_5xx")
    tl.rolled_back()
    tl.close()
    first, second = sorted((state / "observations").iterdir())
    lines = gzip.decompress(first.read_bytes()).splitlines(keepends=True)
    assert json.loads(lines[0])["kind"] == "start"
    first.write_bytes(gzip.compress(b"".join(lines[1:])))
    assert json.loads(gzip.decompress(second.read_bytes()).splitlines()[0])["kind"] == head
    doc = replay_json("--config", str(config(tmp_path, state)))
    taken = [d["event"] for d in doc["configs"][0]["decisions"]]
    assert "hold" not in taken and "alert" not in taken, taken
    [rb] = decisions(doc, "rollback_completed")
    assert rb["color"] == "green" and rb["to"] == "blue", rb
    assert any("the history begins mid-run" in p for p in doc["history"]["problems"])
    left_out = doc["history"]["skipped"]["record before the served color was known"]
    assert left_out >= 2 * 300 - 2, doc["history"]["skipped"]


def test_a_time_ago_with_its_minus_is_taken_as_the_docs_write_it(tmp_path: Path) -> None:
    """`--from -2h` as the contract writes it, not only `--from=-2h` (argparse reads a
    lone `-2h` as an option)."""
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    apart = replay("--config", str(cfg), "--from", "-20000d", "--to", "-1s", "--json")
    glued = replay("--config", str(cfg), "--from=-20000d", "--to=-1s", "--json")
    assert apart.returncode == 0, apart.stderr
    assert (
        json.loads(apart.stdout)["history"]["records"]
        == (json.loads(glued.stdout)["history"]["records"])
    )


def test_a_period_wider_than_the_history_shows_what_was_recorded(tmp_path: Path) -> None:
    """`--from` an hour before the first record: the header gives the period asked for and,
    beside it, the span the records cover, so neither reads as the other."""
    tl = _healthy(tmp_path / "state")  # 60 s of rounds from DAY0 + 3600
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    asked = rfc3339(DAY0)
    doc = replay_json("--config", str(cfg), "--from", asked)
    h = doc["history"]
    assert h["from"] == asked
    first, last = (parse_rfc3339(t) for t in h["recorded"])
    assert abs(first - (DAY0 + 3600)) < 1 and abs(last - (DAY0 + 3660)) < 1, h["recorded"]
    text = replay("--config", str(cfg), "--from", asked).stdout
    assert f"{asked} .. {h['to']} (recorded: {h['recorded'][0]} .. {h['recorded'][1]})" in text


@pytest.mark.parametrize("hole_s", [8.0, 42.0])
def test_a_hole_of_seconds_inside_a_run_is_a_gap_not_probes_gone_stale(
    tmp_path: Path, hole_s: float
) -> None:
    """Records lost for less than a minute inside a run (a disk that refused, then
    recovered), the live rollback among them: the hole is a gap, the incident not covered
    (never "detected" by what the config decided after the hole), and no alert made up
    from probes that went stale in the hole."""
    tl = _healthy(tmp_path / "state")
    tl.tick(hole_s / 2)
    tl.rolled_back()
    tl.tick(hole_s / 2)
    tl.rounds(20, green="http_5xx")
    tl.rounds(100)
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    [gap] = doc["history"]["gaps"]
    assert abs(gap["seconds"] - hole_s) <= 1.0, gap
    [incident] = doc["configs"][0]["incidents"]
    assert incident["covered"] is False and incident["detected_at"] is None, incident
    assert incident["not_covered"].startswith("records lost for "), incident
    stale = [d for d in doc["configs"][0]["decisions"] if "stale" in (d["reason"] or "")]
    assert stale == [], stale


@pytest.mark.parametrize("first", ["green", "blue"])
def test_after_a_hole_no_color_is_stale_before_its_first_probe_since(
    tmp_path: Path, first: str
) -> None:
    """Both colors healthy on both sides of a hole of 20 s; after it, one color's probe
    is recorded before the other's. The other is not "stale" in between: the hole is no
    evidence, not probes that stopped, so nothing is decided at all."""
    tl = _healthy(tmp_path / "state")
    tl.tick(20.0)
    tl._probe(first, "ok")
    tl.rounds(50)
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, tmp_path / "state")))
    [gap] = doc["history"]["gaps"]
    assert abs(gap["seconds"] - 20.0) <= 1.0, gap
    assert doc["configs"][0]["decisions"] == []


def test_an_incident_is_matched_with_the_nearest_decision_about_its_color() -> None:
    """A hold 27 s before a rollback, both about green and within the tolerance of a live
    rollback taken with the replayed one: the rollback is the detection, not the hold."""
    at = DAY0 + 100.0
    decisions = [
        {"at": rfc3339(at - 27.0), "event": "hold", "color": "green", "severity": "P0"},
        {"at": rfc3339(at - 0.003), "event": "rollback_completed", "color": "green",
         "severity": "P0"},
        {"at": rfc3339(at + 10.0), "event": "hold", "color": "green", "severity": "P0"},
    ]  # fmt: skip
    live = [{"ts": rfc3339(at), "event": "rollback_completed", "from": "green", "to": "blue"}]
    [found] = _report.detect(live, decisions, 30.0)
    assert (found["detected_by"], found["delay_s"]) == ("rollback_completed", -0.003), found


def test_one_decision_is_the_detection_of_one_incident_at_most() -> None:
    """A dry run's one alert, 1 ms before a live hold and 5.25 s before the live rollback
    that followed it: it detects the hold; the rollback is not detected, and the report
    names that nearest decision with its time, never crediting it twice."""
    at = DAY0 + 100.0
    decisions = [
        {"at": rfc3339(at - 0.001), "event": "alert", "color": "blue", "severity": "P0",
         "rule": "errors"},
    ]  # fmt: skip
    live = [
        {"ts": rfc3339(at), "event": "hold", "from": "blue"},
        {"ts": rfc3339(at + 5.25), "event": "rollback_completed", "from": "blue", "to": "green"},
    ]
    held, rolled = _report.detect(live, decisions, 30.0)
    assert (held["detected_by"], held["detected_rule"], held["delay_s"]) == (
        "alert",
        "errors",
        -0.001,
    )
    assert rolled["detected_at"] is None, rolled
    assert rolled["nearest"] == {
        "at": rfc3339(at - 0.001),
        "event": "alert",
        "delay_s": -5.251,
        "detects_another": True,
    }
    for found in (held, rolled):
        found["match_window_s"] = 30.0
    text = _report._incidents(
        {"journal": "j", "journal_problem": None}, [({"incidents": [held, rolled]}, None)]
    )
    assert (
        f"    not detected within 30s of it (the nearest decision on blue: alert at "
        f"{rfc3339(at - 0.001)}, -5.251s, the detection of another incident)"
    ) in text, text


def test_a_config_that_acted_outside_the_match_window_is_said_not_silent(
    tmp_path: Path,
) -> None:
    """The what-if rolled back 2 minutes before the live rollback (a lower threshold on a slow
    failure), outside the match window of 30 s: "not detected", with that decision and
    its time, so the operator sees it acted sooner rather than never."""
    tl = Timeline(tmp_path / "state")
    tl.start(active="green")
    tl.rounds(100)
    for _ in range(150):  # one failing round in four for 2 minutes, then all failing
        tl.rounds(3)
        tl.rounds(1, green="http_5xx")
    tl.rounds(3, green="http_5xx")
    tl.rolled_back()
    tl.recorder.switch("green", "blue", by="guardd", reason="rollback")
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    args = (
        "--config",
        str(cfg),
        "--set",
        "policy.p1_error_ratio=0.2",
        "--set",
        'policy.p1_sustain="1s"',
    )
    doc = replay_json(*args)
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] is None and incident["nearest"] is not None, incident
    near = incident["nearest"]
    assert near["event"] == "rollback_completed" and near["delay_s"] < -30.0, near
    assert near["detects_another"] is False
    text = replay(*args).stdout
    assert (
        f"not detected within 30s of it (the nearest decision on green: rollback at "
        f"{near['at']}, {near['delay_s']:+g}s)"
    ) in text, text


@pytest.mark.parametrize("hole_s", [75.0, 3600.0])
def test_records_lost_before_a_restart_are_a_gap_and_cover_nothing(
    tmp_path: Path, hole_s: float
) -> None:
    """The records at the end of a run lost (a crash, a corrupt member), then the daemon
    started again: that stretch is a gap like one inside a run, never ticked through, and
    an incident in it is not covered by the history."""
    tl = _healthy(tmp_path / "state")
    tl.tick(hole_s / 2)
    tl.rolled_back()  # what the journal says happened while no record was kept
    tl.tick(hole_s / 2)
    tl.start(active="blue")
    tl.rounds(300)
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    doc = replay_json("--config", str(cfg))
    [gap] = doc["history"]["gaps"]
    assert abs(gap["seconds"] - hole_s) <= 1.0, gap
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] is None and incident["covered"] is False, incident
    text = replay("--config", str(cfg))
    assert text.returncode == 0, text.stderr
    assert "not covered by the history" in text.stdout
    assert "records lost, not ticked through" in text.stdout


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(1.25, "1.2s"), (42.0, "42s"), (75.0, "1m15s"), (7200.0, "2h"), (2.5e11, "more than a year")],
)
def test_a_span_in_a_coverage_reason_reads_as_a_duration(seconds: float, said: str) -> None:
    """An incident stamped in the year 9999 was `2.51606e+11s` away."""
    from guardd.replay import _secs  # noqa: PLC0415 - the report's own wording

    assert _secs(seconds) == said


@pytest.mark.parametrize(
    ("rule", "kind", "delay", "bounded"),
    [
        ("consecutive_failures", None, 0.033, "an upper bound"),
        ("p1_error_ratio", None, 0.033, "an upper bound"),
        ("5xx-p0", "access_log", 5.0, "not a measurement"),
        ("5xx-p0", "access_log", 0.063, None),  # (the requests the live guard judged)
        ("5xx-p0", "log_match", 5.0, None),
        ("5xx-p0", "prometheus", 5.0, None),
        (None, "access_log", None, "until the live rollback only"),  # (not detected)
        (None, "log_match", None, None),
        (None, None, None, None),
    ],
)
def test_only_a_probe_or_traffic_rules_late_detection_is_bounded(
    rule: str | None, kind: str | None, delay: float | None, bounded: str | None
) -> None:
    """After the live rollback the color was probed as a standby: a rule on the probes
    waited for rounds a guard still serving it would have made sooner (an upper bound);
    and nginx sent it no request, so a traffic rule's window emptied (not a measurement).
    An application's own signal goes on whatever nginx serves: neither. A config with a
    traffic rule that does not detect the rollback at all judged the color's requests only
    until it."""
    from types import SimpleNamespace  # noqa: PLC0415

    from guardd.replay import _later_than_live  # noqa: PLC0415

    c = SimpleNamespace(
        probe=SimpleNamespace(interval=1.0, confirm_interval=0.25),
        rules=[SimpleNamespace(name="5xx-p0", signal="app")],
        signals={"app": SimpleNamespace(kind=kind)},
    )
    inc = {
        "event": "rollback_completed",
        "color": "blue",
        "delay_s": delay,
        "detected_rule": rule,
        "covered": True,
        "served": "blue",
    }
    bound = _later_than_live(inc, c, 1.0)
    assert (bound.split(":")[0] if bound else None) == bounded, bound


@pytest.mark.parametrize("recorded", [True, False])
def test_a_missing_journal_says_whether_operator_actions_went_unreplayed(
    tmp_path: Path, recorded: bool
) -> None:
    """A run that recorded its operator's pauses and resumes is replayed with them without
    the journal; one that did not (a guardd that did not record them wrote it) had them in
    the journal only: when it cannot be read, that is said, never left to look complete."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green", operator=recorded)
    tl.rounds(100)
    tl.start(active="green")  # (a run of today's guardd after it)
    tl.rounds(100)
    tl.close()
    (state / "events.jsonl").unlink()
    doc = replay_json("--config", str(config(tmp_path, state)))
    problem = doc["journal_problem"]
    assert problem.startswith(f"{state / 'events.jsonl'}: cannot read the journal"), problem
    said = "1 run(s) did not record the operator's pauses and resumes, which only the journal"
    assert (said in problem) is not recorded, problem


def test_an_incident_while_the_history_says_guardd_was_stopped_is_not_covered(
    tmp_path: Path,
) -> None:
    """The journal has an incident at a time the observations say guardd was stopped (its
    `stop`, then the next run's `start` ten minutes on): one of the two clocks is wrong.
    The replay says the history does not cover it, never that the config missed it."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(150)
    tl.recorder.stop()
    stopped = tl.wall
    tl.tick(300.0)
    tl.rolled_back()  # journaled five minutes into the stop
    tl.tick(300.0)
    started = tl.wall
    tl.start(active="green")
    tl.rounds(150)
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, state)))
    [inc] = doc["configs"][0]["incidents"]
    assert inc["covered"] is False and inc["detected_at"] is None, inc
    assert inc["not_covered"] == (
        f"guardd was stopped then, from {rfc3339(stopped)} to {rfc3339(started)}"
    )
    assert "not detected" not in replay("--config", str(config(tmp_path, state))).stdout


def test_an_incident_before_a_clock_stepped_back_and_a_stop_is_covered(tmp_path: Path) -> None:
    """Green fails and is rolled back live; then the host's wall clock is stepped back an
    hour, the run goes on and stops, and the history ends there. The wall times after the
    stop were lived by the run before the step: the incident of then is covered and
    detected, never "guardd was stopped then" (the stop's time is below it)."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.green_rolled_back()
    tl.rounds(30, green="http_5xx")
    tl.wall -= 3600.0  # (the monotonic clock goes on)
    tl.rounds(60, green="http_5xx")
    tl.recorder.stop()
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, state)))
    [inc] = doc["configs"][0]["incidents"]
    assert inc["covered"] is True and inc["not_covered"] is None, inc
    assert inc["detected_at"] is not None, inc


@pytest.mark.parametrize("option", ["--from", "--to"])
def test_a_period_bound_among_times_a_stepped_clock_repeats_is_refused(
    tmp_path: Path, option: str
) -> None:
    """60 s of rounds, the wall clock stepped back 40 s, 60 s more: the 40 s before the
    step occur twice. A `--from` or `--to` among them could mean either time: replaying
    one would read the other's records as lost and its incidents as misses. Refused,
    exit 1, saying which times repeat; a bound outside them replays."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    t0 = tl.wall
    tl.rounds(300)
    tl.wall -= 40.0  # (the monotonic clock goes on)
    tl.rounds(300)
    tl.close()
    cfg = config(tmp_path, state)
    among = rfc3339(t0 + 40.0)
    r = replay("--config", str(cfg), option, among)
    assert r.returncode == 1, r
    assert "the wall clock was stepped back: a record stamped " in r.stderr, r.stderr
    assert f"occur twice, and {option} {among} falls among them" in r.stderr, r.stderr
    outside = rfc3339(t0 + (10.0 if option == "--from" else 90.0))
    assert replay("--config", str(cfg), option, outside).returncode == 0


def test_a_to_within_the_hour_a_clock_stepped_forward_skipped_ticks_no_hour(
    tmp_path: Path,
) -> None:
    """60 s of healthy rounds, the wall clock stepped an hour forward, 60 s more. A `--to`
    in the skipped hour ends the period where the daemon's own clock went on at once: no
    hour of ticks without probes, no made-up "stale" alert."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    t0 = tl.wall
    tl.rounds(300)
    tl.wall += 3600.0  # (the monotonic clock goes on)
    tl.rounds(300)
    tl.close()
    cfg = config(tmp_path, state)
    for to in (t0 + 1800.0, t0 + 3660.0):  # within the hour; 50 ms before the next record
        doc = replay_json("--config", str(cfg), "--to", rfc3339(to))
        assert doc["configs"][0]["decisions"] == [], (to, doc["configs"][0]["decisions"])


@pytest.mark.parametrize("option", ["--from", "--to"])
def test_a_lone_record_stamped_back_across_a_bound_is_no_clock_step(
    tmp_path: Path, option: str
) -> None:
    """One record stamped 40 s back amid a run (a damaged line), then the run goes on: no
    times repeat, so a `--from` / `--to` near it replays as any other."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    t0 = tl.wall
    tl.rounds(300)
    tl.wall -= 40.0
    tl._probe("blue", "ok")
    tl.wall += 40.0
    tl.rounds(300)
    tl.close()
    cfg = config(tmp_path, state)
    bound = rfc3339(t0 + (30.0 if option == "--from" else 50.0))
    assert replay("--config", str(cfg), option, bound).returncode == 0


def test_a_journal_cut_short_leaves_what_it_lacks_unknown(tmp_path: Path) -> None:
    """The journal ends before the history does (cut short, or rotated away): the runs the
    history holds after its end have no `started` in it. The decisions the replay takes
    there are not "where the live guard did not act" (that is unknown), and the report
    says how far the journal reaches."""
    state = tmp_path / "state"
    tl = Timeline(state)
    starts = [tl.failing_run(healthy_after=50, down=60.0) for _ in range(3)]
    tl.close()
    cfg = config(tmp_path, state)
    whole = replay_json("--config", str(cfg))
    assert whole["journal_gap"] is None and whole["configs"][0]["unmatched"] == []
    journal = state / "events.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:2]) + lines[2][:40])  # run 1, then a cut line
    doc = replay_json("--config", str(cfg))
    assert len(decisions(doc, "rollback_completed")) == 3
    # (The two rollbacks after the cut are in the observations: taken from there.)
    incidents = doc["configs"][0]["incidents"]
    assert len(incidents) == 3 and all(i["detected_at"] for i in incidents), incidents
    # (With the rule their recorded reason names, as the journal would have held it.)
    assert [i["rule"] for i in incidents] == ["consecutive_failures"] * 3, incidents
    assert doc["configs"][0]["unmatched"] == []
    ended = rfc3339(parse_rfc3339(json.loads(lines[1])["ts"]))
    assert doc["journal_gap"] == (
        f"the journal ends at {ended}, before the run(s) begun at {rfc3339(starts[1])}, "
        f"{rfc3339(starts[2])} (no `started` for them: cut short, rotated away?): incidents "
        "and the live guard's decisions outside it are unknown; the observations hold 2 "
        "rollback(s) by guardd the journal does not (it is cut short or edited): taken from "
        "the observations"
    )
    assert f"  ({doc['journal_gap']})" in replay("--config", str(cfg)).stdout


def test_a_rollback_whose_end_the_journal_lacks_is_taken_from_the_observations(
    tmp_path: Path,
) -> None:
    """The journal holds a rollback's `rollback_started` but not its `rollback_completed`
    (a line deleted, the journal edited); the observations hold its switch by guardd. The
    replay's rollback there is that incident's detection, taken from the observations and
    said, never "the live guard did not act then"; and it is placed at the decision the
    journal kept, as the journal's own would be, not at the switch recorded after it."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(150)
    tl.rounds(3, green="http_5xx")
    reason = "P0 consecutive_failures: 3 >= 3 on green; rolling back to blue"
    started = tl.journal.append(
        "rollback_started", source="green", target="blue", reason=reason, severity="P0"
    )
    tl.tick(0.4)  # (the switch and its verification)
    tl.recorder.switch("green", "blue", by="guardd", reason=reason, severity="P0")
    tl.rounds(100)
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, state)))
    [inc] = doc["configs"][0]["incidents"]
    assert inc["rule"] == "consecutive_failures" and inc["detected_at"] is not None, inc
    assert inc["at"] == started["ts"], (inc, started)
    assert doc["configs"][0]["unmatched"] == []
    assert "taken from the observations" in (doc["journal_gap"] or ""), doc["journal_gap"]


def test_compare_given_twice_is_a_usage_error(tmp_path: Path) -> None:
    """`--compare A --compare B` kept B and dropped A unsaid: a usage error now (exit 2)."""
    done = replay("--config", "x.toml", "--compare", "a.toml", "--compare", "b.toml")
    assert done.returncode == 2 and done.stdout == "", done
    assert "--compare: given more than once" in done.stderr


def test_an_incident_of_a_color_the_what_if_never_served_says_so(tmp_path: Path) -> None:
    """Live, green failed and was rolled back to blue; later blue failed and was rolled
    back to green. A what-if too slow for green's failure keeps serving green: blue's
    failure was never its to act on. The report says the color it served, never a plain
    "not detected" (a miss); the config as live detects both."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.green_rolled_back()
    tl.rounds(150)
    tl.rounds(3, blue="http_5xx")
    tl.rolled_back("blue", "green")
    tl.recorder.switch("blue", "green", by="guardd", reason="rollback")
    tl.rounds(150)
    tl.close()
    cfg = config(tmp_path, state)
    as_live = replay_json("--config", str(cfg))
    assert [i["detected_at"] is not None for i in as_live["configs"][0]["incidents"]] == [
        True,
        True,
    ]
    assert [i["served"] for i in as_live["configs"][0]["incidents"]] == ["green", "blue"]
    slow = ("--config", str(cfg), "--set", "policy.consecutive_failures=50")
    doc = replay_json(*slow)
    first, second = doc["configs"][0]["incidents"]
    assert first["detected_at"] is None and first["served"] == "green", first
    assert second["detected_at"] is None and second["served"] == "green", second
    text = replay(*slow).stdout
    assert (
        "    not detected: this config served green then, not blue: no failure of it to act on"
        in text
    )
    assert text.count("not detected") == 2, text


@pytest.mark.parametrize("cut", ["its first line only", "the rollback deleted"])
def test_a_live_rollback_the_journal_lacks_is_taken_from_the_observations(
    tmp_path: Path, cut: str
) -> None:
    """The journal cut short after its first line, or the live rollback's line deleted:
    the observations still record the live guard's switch. The replay's rollback there is
    the detection of that incident, never "where the live guard did not act", and the
    report says the journal lacks it."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.failing_run()
    tl.close()
    cfg = config(tmp_path, state)
    whole = replay_json("--config", str(cfg))
    [inc] = whole["configs"][0]["incidents"]
    journal = state / "events.jsonl"
    events = journal.read_text().splitlines(keepends=True)
    if cut == "its first line only":
        journal.write_text(events[0])
    else:
        journal.write_text("".join(e for e in events if "rollback_completed" not in e))
    doc = replay_json("--config", str(cfg))
    [found] = doc["configs"][0]["incidents"]
    assert found["color"] == inc["color"] and found["to"] == inc["to"], found
    assert found["detected_at"] == inc["detected_at"] is not None, found
    assert doc["configs"][0]["unmatched"] == [], doc["configs"][0]["unmatched"]
    assert "the observations hold 1 rollback(s) by guardd the journal does not" in (
        doc["journal_gap"] or ""
    ), doc["journal_gap"]
    text = replay("--config", str(cfg)).stdout
    assert "the live guard did not" not in text, text
