"""`guardd replay` over a damaged history: what cannot be read is skipped, counted and
said, and the rest is replayed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

from guardd.observations import ReadReport, Recorder, day_of, read_history
from guardd.replay import Signalled
from guardd.replay._engine import scratch_folder
from guardd.timestamps import parse_rfc3339, rfc3339
from tests.harness.daemon import wait_until
from tests.replay.history import DAY0, GUARDD, Timeline, config, decisions, replay, replay_json
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
        '{"msec": "' + str(t0 + 2) + '", "status": "999", "upstream_addr": "x"}\n',
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
    # The junk line without stamps, and those salvaged from day 2's corrupt bytes (which
    # they are depends on where the damage fell: counted on day 2 alone).
    day2 = tmp_path / "day2"
    day2.mkdir()
    shutil.copy(state / "observations" / f"lab-{day_of(DAY0 + 2 * DAY)}.jsonl.gz", day2)
    alone = ReadReport()
    list(read_history(day2, alone))
    assert skipped["no ts or mono"] == 1 + alone.skipped["no ts or mono"]
    # The junk line, and what the reader salvaged past the corrupt bytes of day 2.
    assert skipped["invalid JSON"] >= 1
    assert skipped["too long"] == 1
    assert skipped["corrupt member"] == 1, skipped
    problems = "\n".join(h["problems"])
    assert f"lab-{day_of(DAY0 + 2 * DAY)}.jsonl.gz: corrupt near byte" in problems
    # Day 1 ends where it was cut: said, though every whole line of it was read.
    assert f"lab-{day_of(DAY0 + DAY)}.jsonl.gz: ends unfinished" in problems
    assert h["missing_days"] == [day_of(DAY0 + 3 * DAY)]
    assert len(h["clock_steps"]) == 1 + len(alone.clock_steps)  # (day 2's salvage may hold one)
    # The days whose records were lost are gaps, not probes that stopped: no stale alert.
    assert len(h["gaps"]) >= 3
    assert all(g["seconds"] > 80_000 for g in h["gaps"])
    assert decisions(doc, "alert") == []
    assert [s["step_s"] for s in h["clock_steps"] if s["step_s"] > 0] == [3600.0]
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
        "1 corrupt gzip member(s) of the observations: their lines past the damage lost",
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


def test_impossible_numbers_in_records_are_skipped_and_counted(tmp_path: Path) -> None:
    """A probe's latency that is no number a probe can take (NaN, infinite, 1e308 s) and a
    time beyond what a clock can say (1e300) are damage: skipped, counted, and the
    records around them replayed."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(100)
    [today] = sorted((state / "observations").iterdir())
    probe = '{"kind":"probe","color":"green","outcome":"ok","error":null,"status":200,'
    junk = [
        probe + f'"latency_s":NaN,"ts":{tl.wall},"mono":{tl.mono}}}',
        probe + f'"latency_s":Infinity,"ts":{tl.wall},"mono":{tl.mono}}}',
        probe + f'"latency_s":1e308,"ts":{tl.wall},"mono":{tl.mono}}}',
        probe + f'"latency_s":1e30,"ts":{tl.wall},"mono":{tl.mono}}}',
        probe + '"latency_s":0.004,"ts":1e300,"mono":-1e300}',
        probe + '"latency_s":0.004,"ts":-5.0,"mono":1.0}',
    ]
    # The recorder's member is closed first, then recording goes on in a member of its own
    # (as after a write that failed half-way), the junk between them.
    tl.recorder.close()
    with today.open("ab") as f:
        f.write(gzip.compress(("\n".join(junk) + "\n").encode()))
    tl.recorder = Recorder(
        state / "observations", "lab", keep_s=DAY, wall=lambda: tl.wall, monotonic=lambda: tl.mono
    )
    tl.rounds(3, green="http_5xx")
    failed_at = tl.wall
    tl.rounds(20, green="http_5xx")
    tl.close()
    cfg = config(tmp_path, state)
    doc = replay_json("--config", str(cfg))
    skipped = doc["history"]["skipped"]
    assert skipped["probe record with an impossible latency"] == 4, skipped
    assert skipped["ts not a time from 1970 to 9999"] == 2, skipped
    [rb] = decisions(doc, "rollback_completed")
    assert abs(parse_rfc3339(rb["at"]) - failed_at) <= 0.2
    text = replay("--config", str(cfg))
    assert text.returncode == 0, text.stderr
    assert "4 observation line(s): probe record with an impossible latency" in text.stdout
    assert "Traceback" not in text.stderr


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_an_observation_file_that_is_no_regular_file_is_refused_not_read(
    tmp_path: Path, kind: str
) -> None:
    """A FIFO would block the open, `/dev/zero` behind a symlink would give zeros without
    end: a day's name on anything but a regular file is said and skipped, and the other
    days are replayed; the same for the journal."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(50)
    tl.close()
    # Two days before: no day between it and the history is "missing" (it is no file).
    odd = state / "observations" / f"lab-{day_of(DAY0 - 2 * DAY)}.jsonl.gz"
    journal = state / "events.jsonl"
    journal.unlink()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "access.log").write_text(line(GREEN, "200", msec=tl.wall - 5))
    rotated = logs / "access.log.1"
    if kind == "fifo":
        os.mkfifo(odd)
        os.mkfifo(journal)
        os.mkfifo(rotated)
    elif kind == "device":
        for path in (odd, journal, rotated):
            path.symlink_to("/dev/zero")
    else:
        for path in (odd, journal, rotated):
            path.mkdir()
    signal_toml = f"""
[signals.traffic]
kind = "access_log"
source = "file:{logs}/access.log"
addresses = {{ blue = ["{BLUE}"], green = ["{GREEN}"] }}
"""
    what = {"fifo": "a FIFO", "device": "a character device", "directory": "a directory"}[kind]
    cfg = config(tmp_path, state, extra=signal_toml)
    done = replay("--config", str(cfg), "--json")  # (bounded: 300 s)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (
        f"{rotated}: cannot open: not a regular file ({what})"
        in (doc["sources"]["traffic"]["problems"])
    )
    assert doc["sources"]["traffic"]["lines"]["ok"] == 1
    h = doc["history"]
    assert f"{odd}: cannot open: not a regular file ({what})" in h["problems"], h["problems"]
    assert h["missing_days"] == [], h
    assert f"{journal}: cannot read the journal (not a regular file ({what})): " in "\n".join(
        h["problems"]
    )
    assert h["records"] > 0


def _zeros_bomb(path: Path, members: int = 160) -> None:
    """An observation file that inflates to `members` times 64 MiB of zero bytes (one line too
    long to keep, read to its end): tens of seconds of work for a reader, about 10 MiB on disk
    (deflate's best ratio is about 1,000 to 1; each member is compressed once)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    member = b"".join(packer.compress(chunk) for _ in range(64)) + packer.flush()
    with path.open("wb") as f:
        for _ in range(members):
            f.write(member)


@pytest.mark.parametrize("at", ["made", "held"])
def test_a_signal_as_the_scratch_folder_is_made_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    """A Ctrl-C raised at any bytecode: here the moment right after the folder is made
    (where `tempfile.TemporaryDirectory` leaves it behind, no `with` owning it yet), and
    one while it is in use."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = os.mkdir

    def mkdir_then_signal(path: str, mode: int = 0o777) -> None:
        made(path, mode)
        raise Signalled(signal.SIGINT)

    def use() -> None:
        with scratch_folder() as folder:
            assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
            raise Signalled(signal.SIGINT)

    if at == "made":
        monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    with pytest.raises(Signalled):
        use()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_replay_at_once_and_leaves_nothing_behind(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C (or a SIGTERM) while a replay reads: it stops where it is, says so, exits
    128 + the signal's number, and removes its temporary folder."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(20)
    tl.close()
    _zeros_bomb(state / "observations" / f"lab-{day_of(DAY0 - DAY)}.jsonl.gz")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [*GUARDD, "replay", "--config", str(config(tmp_path, state))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        # Its temporary folder is made as the history begins to be read (not the file
        # `tempfile` writes and removes at once to learn the folder is writable).
        wait_until(lambda: any(tmp.glob("guardd-replay-*")), 60, "the replay under way")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 128 + sig, err
    assert f"guardd replay: stopped by {sig.name}" in err
    assert "Traceback" not in err and out == ""
    assert list(tmp.iterdir()) == []


def test_ctrl_c_while_a_replay_loads_is_said_as_later_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in its first half second (importing its modules, reading the config), before
    the replay's own handlers are set: the same answer and exit status as later on."""
    import guardd.replay  # noqa: PLC0415 - patched for this test only
    from guardd.cli import main  # noqa: PLC0415

    def interrupted(*_: object, **__: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(guardd.replay, "replay", interrupted)
    assert main(["replay", "--config", str(tmp_path / "guardd.toml")]) == 128 + signal.SIGINT
    out, err = capfd.readouterr()
    assert err == "guardd replay: stopped by SIGINT; nothing was reported\n" and out == ""


def test_another_guards_run_in_this_guards_file_is_skipped_and_said(tmp_path: Path) -> None:
    """A run whose `start` names another guard (its file copied under this guard's name)
    is not this guard's history: its records are skipped, counted under its name, and
    its failures decide nothing here."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(100)
    tl.close()
    other = Timeline(tmp_path / "shop", guard="shop", wall=tl.wall + 5)
    other.start(active="blue")
    other.rounds(50, blue="http_5xx")  # the shop's blue failing: nothing of lab's
    other.close()
    [lab_day] = sorted((state / "observations").iterdir())
    [shop_day] = sorted((tmp_path / "shop" / "observations").iterdir())
    with lab_day.open("ab") as f:
        f.write(shop_day.read_bytes())
    doc = replay_json("--config", str(config(tmp_path, state)))
    assert doc["history"]["skipped"]["records of another guard (shop)"] == 1 + 2 * 50
    assert doc["configs"][0]["decisions"] == [], doc["configs"][0]["decisions"]
    assert doc["history"]["runs"] == 1


def test_records_guardd_never_writes_are_counted_and_move_nothing(tmp_path: Path) -> None:
    """A start naming a color that is none of the two, in a format from elsewhere; a switch
    to such a color, and one by a list; a probe that took less than no time; records of a
    run after its own `stop`: each is counted under Skipped, none moves traffic, and no
    decision is made after the stop."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(100)
    [today] = sorted((state / "observations").iterdir())
    at = f'"ts":{tl.wall},"mono":{tl.mono}}}'
    junk = [
        '{"kind":"start","guard":"lab","active":"purple","format":99,"probe_interval_s":0.2,' + at,
        '{"kind":"switch","from":"green","to":"purple","by":"operator",' + at,
        '{"kind":"switch","from":"green","to":"blue","by":["x"],"severity":"P9",' + at,
        '{"kind":"probe","color":"green","outcome":"ok","status":200,"latency_s":-1000,' + at,
    ]
    tl.recorder.close()
    with today.open("ab") as f:
        f.write(gzip.compress(("\n".join(junk) + "\n").encode()))
    tl.recorder = Recorder(
        state / "observations", "lab", keep_s=DAY, wall=lambda: tl.wall, monotonic=lambda: tl.mono
    )
    tl.rounds(30)
    tl.rounds(3, green="http_5xx")
    failed_at = tl.wall
    tl.rounds(20, green="http_5xx")
    tl.recorder.stop()
    stopped = tl.wall
    tl.rounds(30, blue="http_5xx", green="http_5xx")
    tl.close()
    doc = replay_json("--config", str(config(tmp_path, state)))
    skipped = doc["history"]["skipped"]
    assert skipped["start record naming no color (its run replayed)"] == 1, skipped
    assert skipped["start record of a format other than 1 (read as it)"] == 1, skipped
    assert skipped["switch record without a color or by whom"] == 2, skipped
    assert skipped["probe record with an impossible latency"] == 1, skipped
    assert skipped["record after its run's stop record"] == 60, skipped
    # Green was still served (no switch moved it): its failures roll it back, once.
    [rb] = decisions(doc, "rollback_completed")
    assert abs(parse_rfc3339(rb["at"]) - failed_at) <= 0.2, rb
    late = [d for d in doc["configs"][0]["decisions"] if parse_rfc3339(d["at"]) > stopped]
    assert late == [], late


@pytest.mark.parametrize("stopped", [False, True])
def test_traffic_moved_while_records_were_lost_is_adopted_as_unknown_not_as_a_switch(
    tmp_path: Path, stopped: bool
) -> None:
    """Green failed and the live guard rolled back, but the run's last records (the
    switch among them) were lost in a crash: the next run starts serving blue. The replay
    follows it, and says how traffic moved is unknown, never that someone switched it
    while the daemon was down. After a clean `stop`, it is such a switch, as live."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.start(active="green")
    tl.rounds(100)
    if stopped:
        tl.recorder.stop()
    tl.tick(30)
    tl.start(active="blue")
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, state)
    doc = replay_json("--config", str(cfg))
    [moved] = decisions(doc, "external_switch")
    assert (moved["color"], moved["to"]) == ("green", "blue")
    if stopped:
        assert moved["by"] == "external", moved
        assert "while guardd was not running" in moved["reason"]
    else:
        assert moved["by"] == "unknown", moved
        assert "records before it were lost" in moved["reason"]
        assert "while guardd was not running" not in moved["reason"]


@pytest.mark.parametrize("damage", ["duplicated", "swapped", "swapped ten apart"])
def test_a_probe_record_duplicated_or_out_of_order_is_replayed_without_a_traceback(
    tmp_path: Path, damage: str
) -> None:
    """One probe record written twice, or two records swapped (neighbours, or ten apart: a
    copy spliced by hand), in a config without `probe.fast_interval` (its default): the
    replay runs and takes every decision it takes over the clean history, and no other
    (before, the records between two swapped ten apart were dropped as read before, and
    the colors judged stale for them)."""
    state = tmp_path / "state"
    tl = Timeline(state)
    tl.green_rolled_back()
    tl.rounds(100)
    tl.close()
    cfg = config(tmp_path, state)
    cfg.write_text(cfg.read_text().replace('fast_interval = "100ms"\n', ""))
    clean = replay_json("--config", str(cfg))
    [day] = (state / "observations").iterdir()
    lines = gzip.decompress(day.read_bytes()).decode().splitlines(keepends=True)
    probes = [i for i, text in enumerate(lines) if '"probe"' in text]
    i = probes[100]
    j = {"duplicated": i, "swapped": i + 1, "swapped ten apart": i + 10}[damage]
    if damage == "duplicated":
        lines.insert(i, lines[i])
    else:
        lines[i], lines[j] = lines[j], lines[i]
    day.write_bytes(gzip.compress("".join(lines).encode()))
    done = replay("--config", str(cfg))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-800:]
    doc = replay_json("--config", str(cfg))
    assert doc["configs"][0]["decisions"] == clean["configs"][0]["decisions"]
    assert doc["history"]["records"] == clean["history"]["records"]
    said = [p for p in doc["history"]["problems"] if "found after later-stamped" in p]
    assert len(said) == (damage != "duplicated"), doc["history"]["problems"]


def test_a_history_whose_records_appear_twice_is_replayed_once(tmp_path: Path) -> None:
    """Observation files concatenated to themselves (`cat obs obs | gzip`) with the journal
    (`cat events.jsonl events.jsonl`), or a day's file copied under a later day's name: the
    replay is the one of the history read once (the same runs, decisions and incidents
    found), the copies counted under skipped."""
    state = tmp_path / "state"
    tl = Timeline(state, wall=DAY0 + 3600)
    for _ in range(2):  # two runs, green failing in each, rolled back live each time
        tl.failing_run()
    tl.close()
    cfg = config(tmp_path, state)
    once = replay_json("--config", str(cfg))
    assert once["history"]["runs"] == 2
    assert once["configs"][0]["summary"]["rollbacks"] == 2
    assert len(once["configs"][0]["incidents"]) == 2
    [path] = sorted((state / "observations").iterdir())
    raw = path.read_bytes()
    lines = gzip.decompress(raw)
    path.write_bytes(gzip.compress(lines + lines))
    journal = state / "events.jsonl"
    events = journal.read_bytes()
    assert events.count(b"\n") == 4  # each run's `started`, the two rollbacks
    journal.write_bytes(events + events)
    doubled = replay_json("--config", str(cfg))
    assert doubled["journal_read_twice"] == 4 and doubled["journal_skipped"] == 0
    journal.write_bytes(events)
    later = path.with_name(path.name.replace(day_of(DAY0), day_of(DAY0 + DAY)))
    path.write_bytes(raw)
    later.write_bytes(raw)
    copied = replay_json("--config", str(cfg))
    for doc in (doubled, copied):
        assert doc["history"]["runs"] == 2
        assert doc["history"]["records"] == once["history"]["records"]
        assert doc["history"]["skipped"] == {
            "record at a time already read (the same records twice: a file copied or "
            "concatenated, or lines moved out of order)": lines.count(b"\n")
        }
        assert doc["configs"] == once["configs"]


@pytest.mark.parametrize("how", ["reversed", "one event edited a day back"])
def test_a_journal_out_of_order_is_said_and_its_incidents_taken_at_their_time(
    tmp_path: Path, how: str
) -> None:
    """The journal is written in order, by one process: events stamped over 30 s before an
    event written before them (a journal reversed, a time edited by hand) are counted and
    said, never taken silently, and each incident is still matched at its own time, and
    listed in time order (before: in the journal's order)."""
    state = tmp_path / "state"
    tl = Timeline(state, wall=DAY0 + 3600)
    for _ in range(2):
        tl.failing_run()
    tl.close()
    cfg = config(tmp_path, state)
    once = replay_json("--config", str(cfg))
    assert once["journal_out_of_order"] == 0
    journal = state / "events.jsonl"
    events = journal.read_text().splitlines(keepends=True)
    if how == "reversed":
        events.reverse()
        stamps = [parse_rfc3339(json.loads(e)["ts"]) for e in events]
        back = sum(t < max(stamps[:i], default=t) - 30 for i, t in enumerate(stamps))
        assert back >= 2
    else:
        doc = json.loads(events[-1])
        doc["ts"] = rfc3339(parse_rfc3339(doc["ts"]) - DAY)
        events[-1] = json.dumps(doc) + "\n"
        back = 1
    journal.write_text("".join(events))
    doc = replay_json("--config", str(cfg))
    assert doc["journal_out_of_order"] == back
    if how == "reversed":
        assert doc["configs"][0]["incidents"] == once["configs"][0]["incidents"]
    text = replay("--config", str(cfg)).stdout
    assert (
        f"  {back} journal event(s) of {journal}: stamped over 30s before an event written "
        "before them (a clock stepped back, the file edited or concatenated): taken at their "
        "own time"
    ) in text, text
