"""`guardd replay` fails closed: no record to judge is no verdict, an incident the history
does not cover is not "not detected", a reversed period is a usage error, and what came
from the environment or could not be read is said."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from guardd.journal import rfc3339
from guardd.replay import env_settings
from tests.harness.shell import redirected
from tests.replay.history import DAY0, GUARDD, Timeline, config, replay, replay_json


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
    tl.incident(
        "rollback_completed",
        source="green",
        target="blue",
        reason="P0 consecutive_failures: 3 >= 3 on green; rolling back to blue",
        severity="P0",
        evidence={"rule": "consecutive_failures", "threshold": 3, "value": 3},
    )
    end = tl.wall + 60
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    period = ("--from", rfc3339(DAY0), "--to", rfc3339(end))
    doc = replay_json("--config", str(cfg), *period)
    [incident] = doc["configs"][0]["incidents"]
    assert incident["detected_at"] is None and incident["covered"] is False
    text = replay("--config", str(cfg), *period)
    assert text.returncode == 0, text.stderr
    assert "not covered by the history" in text.stdout
    assert "not detected" not in text.stdout


def test_from_after_to_is_a_usage_error(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    for lo, hi in (
        ("2026-12-01T05:13Z", "2026-12-01T05:12Z"),
        ("1h", "2h"),
        ("now", "30s"),
    ):
        done = replay("--config", str(cfg), "--from", lo, "--to", hi)
        assert done.returncode == 2, done.stdout
        assert f"--from {lo}" in done.stderr and "is after" in done.stderr
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
    # 60 s of the 120 s are in the period; the warm-up (30 s before it) is counted apart.
    assert h["records"] + h["warmup_records"] < all_records["records"]
    assert abs(h["records"] - all_records["records"] / 2) <= 10
    text = replay("--config", str(cfg), "--from", rfc3339(DAY0 + 3600 + 60)).stdout
    assert f"{h['records']} records (and {h['warmup_records']} before it" in text


def test_settings_from_the_environment_are_listed_secrets_redacted(tmp_path: Path) -> None:
    tl = _healthy(tmp_path / "state")
    tl.close()
    cfg = config(tmp_path, tmp_path / "state")
    env = {**os.environ, "GUARDD_POLICY__CONSECUTIVE_FAILURES": "7", "GUARDD_CONFIG": "/x"}
    for args in (["--json"], []):
        done = subprocess.run(
            [*GUARDD, "replay", "--config", str(cfg), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=env,
        )
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
    journal.write_text('{"event": "hold"\nnot json\n{"no": "event"}\n')
    doc = replay_json("--config", str(cfg))
    assert doc["journal_skipped"] == 3
    text = replay("--config", str(cfg))
    assert f"3 journal line(s) of {journal}: not an event" in text.stdout


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
