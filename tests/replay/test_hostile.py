"""`guardd replay` over a damaged history: what cannot be read is skipped, counted and
said, and the rest is replayed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from guardd.journal import parse_rfc3339
from guardd.observations import day_of
from tests.replay.history import DAY0, Timeline, config, decisions, replay, replay_json
from tests.signals.access_log_lib import BLUE, GREEN, line

DAY = 86400.0


def _damaged(tmp: Path) -> tuple[Path, float]:
    """Five days of history: day 0 sound, day 1 cut short, day 2 corrupt in the middle,
    day 3 gone, day 4 with junk lines, a clock step and green failing at its end.
    Returns the config and the wall time green's third failure came."""
    state = tmp / "state"
    obs = state / "observations"
    tl = Timeline(state, wall=DAY0 + 3600)
    tl.start(active="green")
    for _ in range(4):
        tl.rounds(600)
        tl.tick(DAY)
    tl.rounds(300)
    tl.wall += 3600.0  # NTP (or a person) stepped the wall clock an hour on
    tl.rounds(300)
    tl.rounds(3, green="http_5xx")
    failed_at = tl.wall
    tl.rounds(20, green="http_5xx")
    tl.close()
    days = sorted(obs.iterdir())
    assert len(days) == 5, days
    # Day 1: a crash cut the file mid-member.
    raw = days[1].read_bytes()
    days[1].write_bytes(raw[: len(raw) // 2])
    # Day 2: bytes overwritten in the middle (a bad disk).
    sick = bytearray(days[2].read_bytes())
    mid = len(sick) // 2
    sick[mid : mid + 64] = b"\xde\xad\xbe\xef" * 16
    days[2].write_bytes(bytes(sick))
    # Day 3: deleted.
    days[3].unlink()
    # Day 4: a member of junk appended (unknown kinds, broken JSON, an overlong line).
    ts = DAY0 + 4 * DAY + 7200
    junk = [
        json.dumps({"kind": "telemetry", "ts": ts, "mono": 1.0}),
        json.dumps({"kind": "probe", "color": "green"}),  # no ts or mono
        "{not json at all",
        json.dumps({"kind": "probe", "ts": ts, "mono": 2.0, "pad": "x" * 70_000}),
    ]
    with days[4].open("ab") as f:
        f.write(gzip.compress(("\n".join(junk) + "\n").encode()))
    return state, failed_at


def _garbage_log(logs: Path, t0: float) -> dict[str, int]:
    """An access log of healthy traffic with garbage lines among the good ones."""
    logs.mkdir()
    good = [line(GREEN, "200", msec=t0 + i * 0.5) for i in range(400)]
    bad = [
        "\x00\x01\x02 binary junk\n",
        "GET / HTTP/1.1 200 (a line in the wrong format)\n",
        '{"msec": "1.0", "status": "999", "upstream_addr": "x"}\n',
        '{"msec": "' + str(t0 + 1) + '", "upstream_addr": "' + BLUE + '", "pad": "'
        + "y" * 40_000 + '"}\n',
    ]  # fmt: skip
    lines = good[:200] + bad + good[200:]
    (logs / "access.log").write_text("".join(lines))
    return {"ok": 400, "unparsed": 3, "oversize": 1}


def test_damage_is_skipped_counted_and_said_and_the_rest_replayed(tmp_path: Path) -> None:
    state, failed_at = _damaged(tmp_path)
    day4 = DAY0 + 4 * DAY
    expected = _garbage_log(tmp_path / "logs", day4 + 3600 + 10)
    signal = f"""
[signals.traffic]
kind = "access_log"
source = "file:{tmp_path}/logs/access.log"
addresses = {{ blue = ["{BLUE}"], green = ["{GREEN}"] }}
"""
    cfg = config(tmp_path, state, extra=signal)
    doc = replay_json("--config", str(cfg))
    h = doc["history"]
    skipped = h["skipped"]
    assert skipped["unknown kind 'telemetry'"] == 1
    assert skipped["no ts or mono"] == 1
    # The junk line, and what the reader salvaged past the corrupt bytes of day 2.
    assert skipped["invalid JSON"] >= 1
    assert skipped["too long"] == 1
    assert skipped.get("corrupt file", 0) + skipped.get("cut-off last line", 0) >= 1
    problems = "\n".join(h["problems"])
    assert f"lab-{day_of(DAY0 + 2 * DAY)}.jsonl.gz: corrupt near byte" in problems
    assert h["missing_days"] == [day_of(DAY0 + 3 * DAY)]
    assert len(h["clock_steps"]) == 1
    # The days whose records were lost are gaps, not probes that stopped: no stale alert.
    assert len(h["gaps"]) >= 3
    assert all(g["seconds"] > 80_000 for g in h["gaps"])
    assert decisions(doc, "alert") == []
    assert h["clock_steps"][0]["step_s"] > 3500
    lines = doc["sources"]["traffic"]["lines"]
    for outcome, n in expected.items():
        assert lines[outcome] == n, lines
    # What could be read is replayed: green's failure on day 4 is still a rollback, on time.
    [rb] = decisions(doc, "rollback_completed")
    assert abs(parse_rfc3339(rb["at"]) - failed_at) <= 0.2
    text = replay("--config", str(cfg))
    assert text.returncode == 0, text.stderr
    for said in (
        "1 observation line(s): unknown kind 'telemetry'",
        "1 observation line(s): too long",
        f"{skipped['invalid JSON']} observation line(s): invalid JSON",
        f"no observation file for {day_of(DAY0 + 3 * DAY)}",
        "wall clock stepped +3600s",
        "records lost, not ticked through",
        "corrupt near byte",
        "lines: ok 400, unparsed 3, oversize 1",
    ):
        assert said in text.stdout, text.stdout
    assert "Traceback" not in text.stderr


def test_a_history_of_nothing_but_damage_has_nothing_to_judge(tmp_path: Path) -> None:
    obs = tmp_path / "state" / "observations"
    obs.mkdir(parents=True)
    (obs / "lab-2026-11-30.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 100)
    (obs / "lab-2026-12-01.jsonl.gz").write_bytes(b"")
    cfg = config(tmp_path, tmp_path / "state")
    for args in ([], ["--json"]):
        done = replay("--config", str(cfg), *args)
        assert done.returncode == 1, done.stdout
        assert "no history to judge" in done.stderr
        assert f"{obs / 'lab-2026-11-30.jsonl.gz'}: corrupt" in done.stderr
        assert f"{obs / 'lab-2026-12-01.jsonl.gz'}: no record" in done.stderr
        assert "No decision" not in done.stdout and "not detected" not in done.stdout
        assert "Traceback" not in done.stderr


def test_an_unreadable_journal_is_said_and_the_replay_goes_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(50)
    tl.close()
    (state / "events.jsonl").unlink()
    (state / "events.jsonl").mkdir()  # something that is no journal
    doc = replay_json("--config", str(config(tmp_path, state)))
    assert doc["configs"][0]["incidents"] == []
    assert any("cannot read the journal" in p for p in doc["history"]["problems"])
