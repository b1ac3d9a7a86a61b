"""What a real daemon records for replay, and that recording never stands in a rollback's way.

Real blue and green upstreams behind a real nginx, a real `guardd run`: green fails, guardd
rolls back to blue, and `read_history` of the state directory gives the run's story in
order: the start, both colors' probes, the front door, the switch. With the observations
directory blocked the rollback happens just the same; status says recording fails, and once
the way is clear what was held in memory is written.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from guardd.observations import HistoryUnreadable, ReadReport, Record, day_of, read_history
from guardd.signals.scrape import ScrapeSignal, ScrapeSpec
from tests.harness.daemon import Lab, MakeLab, guardctl, wait_until
from tests.harness.exporter import Exporter
from tests.harness.jsondoc import json_object
from tests.signals.access_log_lib import FixedClock

pytestmark = pytest.mark.nginx


def status(lab: Lab) -> dict[str, Any]:
    # (Its exit status says how the guard is: 1 once it rolled back; the document is whole.)
    out = guardctl("status", "--json", socket=lab.socket_path)
    assert out.returncode in (0, 1), out.stderr
    return json_object(out.stdout)


def history(lab: Lab) -> tuple[list[Record], ReadReport]:
    report = ReadReport()
    try:
        return list(read_history(lab.state_dir / "observations", report, guard="lab")), report
    except HistoryUnreadable:
        return [], report


def switched(lab: Lab) -> list[Record]:
    return [r for r in history(lab)[0] if r.kind == "switch"]


def test_a_rollback_is_recorded_in_order(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    done = d.wait_event("rollback_completed")
    # Written within about a second, while the daemon runs: no shutdown needed.
    wait_until(lambda: switched(lab), 20, "the switch in observations/")
    rec = status(lab)["recording"]
    assert rec["enabled"] is True and rec["errors"] == 0 and rec["last_error"] is None
    assert rec["dir"] == str(lab.state_dir / "observations") and rec["written"] > 0
    assert d.stop() == 0

    records, report = history(lab)
    assert not report.problems and not report.skipped, report
    assert report.runs == 1
    folder = lab.state_dir / "observations"
    names = {f"lab-{day_of(r.ts)}.jsonl.gz" for r in records}  # one, unless run at midnight
    assert {p.name for p in folder.iterdir()} == names
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o640}
    start = records[0]
    assert start.kind == "start"
    assert start.doc["active"] == "green" and start.doc["guard"] == "lab"
    assert start.doc["probe_interval_s"] == 0.2 and start.doc["format"] == 1
    monos = [r.doc["mono"] for r in records]
    assert monos == sorted(monos), "mono only increases within a run"
    [switch] = [r for r in records if r.kind == "switch"]
    assert switch.doc["from"] == "green" and switch.doc["to"] == "blue"
    assert switch.doc["by"] == "guardd" and switch.doc["event"] == "rollback_completed"
    assert switch.doc["reason"] == done["reason"]
    at = records.index(switch)
    before, after = records[:at], records[at + 1 :]
    probes = [r.doc for r in before if r.kind == "probe"]
    assert {p["color"] for p in probes} == {"blue", "green"}
    failing = [p for p in probes if p["color"] == "green" and p["outcome"] != "ok"]
    assert len(failing) >= 3, "the failures that caused the rollback are in the history"
    assert all(p["status"] == 503 and p["latency_s"] >= 0 for p in failing)
    assert any(p["color"] == "blue" and p["outcome"] == "ok" for p in probes)
    assert any(r.kind == "front_door" for r in before)
    # After the switch the front door answers from blue.
    assert any(r.kind == "front_door" and r.doc["ok"] for r in after)
    for r in records:
        assert {"kind", "ts", "mono"} <= r.doc.keys()
        assert "://" not in json.dumps(r.doc.get("error")), "no URL is recorded"


def test_a_blocked_observations_dir_does_not_stop_the_rollback(make_lab: MakeLab) -> None:
    lab = make_lab()
    blocker = lab.state_dir / "observations"
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where guardd wants its observations directory\n")
    d = lab.daemon()
    failing = wait_until(
        lambda: (doc := status(lab))["recording"]["last_error"] and doc,
        20,
        "status to show the recording error",
    )
    rec = failing["recording"]
    assert rec["enabled"] is True and rec["errors"] >= 1 and rec["pending"] > 0
    assert str(blocker) in rec["last_error"]
    assert any("observations are not being recorded" in w for w in failing["warnings"])
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert "observations_write_failed" in d.log()
    # Once the way is clear, what was held meanwhile is written, the rollback with it.
    blocker.unlink()
    wait_until(lambda: switched(lab), 20, "the held records written")
    cleared = status(lab)
    assert cleared["recording"]["last_error"] is None
    assert not any("observations" in w for w in cleared["warnings"])
    assert d.stop() == 0
    records, _ = history(lab)
    assert records[0].kind == "start" and records[0].doc["active"] == "green"
    assert [r.doc["to"] for r in records if r.kind == "switch"] == ["blue"]


def test_keep_observations_0_records_nothing(make_lab: MakeLab) -> None:
    lab = make_lab(state__keep_observations="0")
    d = lab.daemon()
    assert status(lab)["recording"] == {"enabled": False}
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert d.stop() == 0
    assert not (lab.state_dir / "observations").exists()


def test_a_scrape_signal_s_samples_replay_to_what_the_daemon_saw(make_lab: MakeLab) -> None:
    failed, runs = 'agent_runs_total{result="failed"}', "agent_runs_total"
    with Exporter() as blue_m, Exporter() as green_m:
        blue_m.runs_per_scrape(ok=4, failed=0)
        green_m.runs_per_scrape(ok=3, failed=1)  # 25 % of green's runs fail
        table = {
            "kind": "scrape",
            "urls": {"blue": blue_m.url, "green": green_m.url},
            "ratio": {"of": failed, "to": runs},
            "every": "200ms",
            "window": "4s",
        }
        rule = {
            "name": "agent-failures",
            "signal": "runs",
            "stat": "value",
            "above": 0.20,
            "severity": "P1",
            "for": "2s",
            "min_samples": 3,
        }
        lab = make_lab(signals__runs=table, rules=[rule])
        d = lab.daemon()
        done = d.wait_event("rollback_completed", timeout=60)
        green_m.set_mode("http_500")  # a failed scrape is recorded as one
        wait_until(lambda: green_m.scrapes and _failed_samples(lab), 20, "a failed scrape")
        assert d.stop() == 0
    records, report = history(lab)
    assert not report.problems and not report.skipped
    samples = [r for r in records if r.kind == "sample"]
    assert {s.doc["signal"] for s in samples} == {"runs"}
    assert {s.doc["color"] for s in samples} == {"blue", "green"}
    # The recorded payloads, applied to a fresh adapter at their monotonic times, give the
    # value the rule saw when it rolled back.
    spec = ScrapeSpec(
        urls={"blue": "http://127.0.0.1:9/m", "green": "http://127.0.0.1:9/m"},
        ratio=(failed, runs),
        every_s=0.2,
        window_s=4.0,
    )
    replica = ScrapeSignal("runs", spec, FixedClock(mono=samples[0].doc["mono"]))
    switch_at = next(r.doc["mono"] for r in records if r.kind == "switch")
    for s in samples:
        if s.doc["mono"] <= switch_at:
            replica.apply_sample(s.doc["color"], s.doc["data"], s.doc["mono"])
    reading = replica.reading("green", switch_at)
    assert reading is not None and reading.stats["value"] is not None
    assert reading.stats["value"] == pytest.approx(done["evidence"]["value"], abs=0.03)
    last = [s.doc["data"] for s in samples if s.doc["color"] == "green"][-1]
    assert last["outcome"] == "http" and last["error"] == "http: HTTP 500"


def _failed_samples(lab: Lab) -> list[Record]:
    return [r for r in history(lab)[0] if r.kind == "sample" and r.doc["data"]["outcome"] != "ok"]


def test_a_reload_keeps_recording(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: history(lab)[0], 20, "the first records")
    lab.write_config(probe__interval="300ms", state__keep_observations="24h")
    d.signal(signal.SIGHUP)
    reloaded = d.wait_event("config_reloaded")
    # The retention is the running recorder's until the next start, and says so.
    assert reloaded["restart_required"] == ["state.keep_observations"]
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    # Probes go on being recorded after the reload and the rollback that followed it.
    wait_until(lambda: _probes_after_switch(lab), 20, "probes recorded after the switch")
    assert status(lab)["recording"]["keep_s"] == 7 * 86400
    assert d.stop() == 0
    records, _ = history(lab)
    assert [r.kind for r in records].count("start") == 1, "one run, recording all along"


def _probes_after_switch(lab: Lab) -> bool:
    records = history(lab)[0]
    kinds = [r.kind for r in records]
    return "switch" in kinds and "probe" in kinds[kinds.index("switch") :]


def test_a_crash_and_a_restart_leave_a_readable_history_of_two_runs(make_lab: MakeLab) -> None:
    lab = make_lab()
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    wait_until(lambda: switched(lab), 20, "the switch in observations/")
    d.kill9()  # the gzip member is left unfinished; the next run appends its own
    lab.green.set_mode("ok")
    again = lab.daemon()
    wait_until(
        lambda: [r.kind for r in history(lab)[0]].count("start") == 2, 20, "the second start"
    )
    wait_until(lambda: _probes_after(lab, "start", 2), 20, "the second run's probes")
    assert again.stop() == 0
    records, report = history(lab)
    assert report.runs == 2 and not report.problems and not report.skipped, report
    starts = [r for r in records if r.kind == "start"]
    assert [s.doc["active"] for s in starts] == ["green", "blue"]
    ats = [r.at for r in records]
    assert ats == sorted(ats), "the history's clock only moves forward across the crash"
    assert [r.doc["to"] for r in records if r.kind == "switch"] == ["blue"]


def _probes_after(lab: Lab, kind: str, nth: int) -> bool:
    kinds = [r.kind for r in history(lab)[0]]
    at = [i for i, k in enumerate(kinds) if k == kind]
    return len(at) >= nth and "probe" in kinds[at[nth - 1] :]


def test_a_bug_in_the_recording_loop_neither_stops_guardd_nor_loses_the_records(
    make_lab: MakeLab,
) -> None:
    lab = make_lab()
    d = lab.daemon()
    fault = lab.fault_dir / "raise_in_recording"
    fault.touch()
    alert = d.wait_event("alert", where=lambda e: e.get("loop") == "recording")
    assert alert["reason"] == (
        "unexpected error in the recording loop, which goes on: "
        "InjectedFault: injected fault at raise_in_recording"
    )
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert not switched(lab), "nothing written while every hand-over fails"
    fault.unlink()
    # The records waited in memory: the switch is written once the loop runs clean.
    wait_until(lambda: switched(lab), 20, "the held records written")
    assert d.stop() == 0
    records, report = history(lab)
    assert records[0].kind == "start" and not report.problems
