"""Rules over real traffic, end to end: a real guardd reads a real nginx's access log.

Blue and green are real upstreams behind a real nginx that logs every request with
guardd's shipped `log_format guardd`, to a file or to guardd's syslog socket; a load
generator sends real requests through nginx at a steady rate. `/healthz` stays UP
throughout, so whatever guardd decides comes from the traffic, never from its probes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guardd.timestamps import parse_rfc3339
from tests.faults.util import metric, metrics_port, scrape, status
from tests.harness.daemon import Daemon, Lab, MakeLab, guardctl, wait_until
from tests.harness.jsondoc import json_object
from tests.harness.traffic import Load

pytestmark = pytest.mark.nginx

RULE = "traffic.error_ratio"
ERROR_RULE: dict[str, Any] = {
    "signal": "traffic",
    "stat": "error_ratio",
    "above": 0.05,
    "severity": "P0",
    "min_samples": 50,
}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for a unix socket (paths stop at 108 bytes) that nginx may reach."""
    where = Path(tempfile.mkdtemp(prefix="guardd-e2e-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def traffic_lab(
    make_lab: MakeLab,
    where: Path,
    *,
    source: str = "file",
    rules: list[dict[str, Any]] | None = None,
    signal: bool = True,
    front_door: bool = False,
    stale_after: str | None = None,
    **overrides: Any,
) -> Lab:
    """A lab whose nginx logs to `where` (a file, or guardd's syslog socket) and whose
    config reads it as the signal `traffic` (10 s window) with `rules` (default: the P0
    error-ratio rule). With `front_door`, guardd probes through nginx too, and those
    probes are logged like any request."""
    if source == "file":
        log = where / "access.log"
        access_log, signal_source = str(log), f"file:{log}"
    else:
        sock = where / "web.sock"
        access_log = f"syslog:server=unix:{sock},nohostname"
        signal_source = f"syslog:{sock}"
    if signal:
        overrides["signals__traffic"] = {
            "kind": "access_log",
            "source": signal_source,
            "window": "10s",
            **({"stale_after": stale_after} if stale_after else {}),
        }
        overrides["rules"] = [ERROR_RULE] if rules is None else rules
    overrides.setdefault("metrics__listen", "127.0.0.1:0")
    if not front_door:
        # The front door's own probes would be logged as traffic too (5 a second).
        overrides["switch__verify_url"] = None
    return make_lab(access_log=access_log, **overrides)


def rule_state(doc: dict[str, Any], rule: str, color: str) -> dict[str, Any] | None:
    """One rule's state on one color in a `status --json` document."""
    for row in doc["rules"]:
        if row["rule"] == rule:
            state = row.get(color)
            return state if isinstance(state, dict) else None
    raise AssertionError(f"no rule {rule} in status: {[r['rule'] for r in doc['rules']]}")


def ticks(port: int) -> float:
    """guardd's own count of decision ticks."""
    return metric(scrape(port), "guardd_decision_ticks_total")


def wait_ticks(d: Daemon, port: int, more: int) -> None:
    """Wait until guardd has made `more` decision ticks from now."""
    start = ticks(port)
    wait_until(lambda: ticks(port) >= start + more, 60, f"{more} decision ticks")
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]


def rollbacks(d: Daemon) -> list[dict[str, Any]]:
    return [e for e in d.events() if e["event"] == "rollback_started"]


def assert_traffic_evidence(started: dict[str, Any], answered_by_green: int) -> None:
    """The rollback was the traffic rule's, over real requests at the real 5xx ratio."""
    assert started["from"] == "green" and started["to"] == "blue"
    assert started["severity"] == "P0"
    ev = started["evidence"]
    assert ev["rule"] == RULE
    assert ev["signal"] == "traffic"
    assert ev["stat"] == "error_ratio"
    assert ev["threshold"] == 0.05
    assert ev["samples"] >= 50
    # Real requests: no more than green answered, and at the ratio green failed them.
    assert ev["samples"] <= answered_by_green
    assert abs(ev["value"] - 0.2) <= 0.05, ev


# ---- 1 and 4: a real 5xx ratio rolls back ----------------------------------------------


@pytest.mark.parametrize("source", ["file", "syslog"])
def test_real_5xx_on_green_rolls_back_by_the_traffic_rule(
    make_lab: MakeLab, short_dir: Path, source: str
) -> None:
    # With the front door probed through nginx as well, as in production.
    lab = traffic_lab(make_lab, short_dir, source=source, front_door=True)
    lab.green.set_api(error_ratio=0.2)
    d = lab.daemon()
    with Load(lab.nginx, rate=100) as load:
        started = d.wait_event("rollback_started", timeout=60)
        d.wait_event("rollback_completed", timeout=60)
        # Green, the standby now, still has its 5xx in the 10 s window: its rule fires,
        # since the condition the rollback came of began, not since a tick after it.
        wait_ticks(d, metrics_port(d), 1)
        green = rule_state(status(lab), RULE, "green")
    assert_traffic_evidence(started, load.answered_by("green"))
    assert green is not None and green["state"] == "firing", green
    assert parse_rfc3339(green["since"]) <= parse_rfc3339(started["ts"]), (green, started)
    assert lab.green.api_counts[500] > 0 and lab.green.counts["ok"] > 0, "probes stayed UP"
    assert lab.nginx.wait_serving_only("blue")
    assert d.stop() == 0


def test_wait_healthy_is_not_met_while_real_5xx_fire_a_rule_the_probes_pass(
    make_lab: MakeLab, short_dir: Path
) -> None:
    # A P2 rule alerts and rolls nothing back: green stays active, its probes pass, and
    # `wait healthy` (a pipeline's "is the new color good?") must not say it is.
    rule = {**ERROR_RULE, "severity": "P2"}
    lab = traffic_lab(make_lab, short_dir, rules=[rule])
    lab.green.set_api(error_ratio=0.2)
    d = lab.daemon()
    with Load(lab.nginx, rate=100):
        d.wait_event("alert", timeout=60)
        wait_until(
            lambda: (rule_state(status(lab), RULE, "green") or {}).get("state") == "firing",
            30,
            "the traffic rule firing on green",
        )
        waited = guardctl("--config", str(lab.config_path), "wait", "healthy", "--timeout", "2s")
        doc = status(lab)
    assert doc["upstreams"]["green"]["healthy"] is True, doc["upstreams"]  # probes pass
    assert waited.returncode == 1, (waited.stdout, waited.stderr)
    assert f"green (active) firing rule {RULE} (P2: error_ratio >= 0.05)" in waited.stderr
    assert rollbacks(d) == []
    assert d.stop() == 0


def test_without_the_traffic_rule_real_5xx_change_nothing(
    make_lab: MakeLab, short_dir: Path
) -> None:
    # The same traffic with no traffic signal or rule: only the probes judge, and they pass.
    lab = traffic_lab(make_lab, short_dir, signal=False)
    lab.green.set_api(error_ratio=0.2)
    d = lab.daemon()
    port = metrics_port(d)
    with Load(lab.nginx, rate=100) as load:
        # Far more than the traffic rule needs (50 requests) ...
        load.wait_sent(500)
        # ... and many decisions made while it flowed.
        wait_ticks(d, port, 10)
    assert lab.green.api_counts[500] >= 50
    assert rollbacks(d) == []
    doc = status(lab)
    assert doc["active"] == "green" and doc["signals"] == {}
    assert lab.nginx.served_color() == "green"
    assert d.stop() == 0


# ---- 2: too few requests is inconclusive, never a rollback ------------------------------


def test_too_few_requests_leave_the_rule_inconclusive(make_lab: MakeLab, short_dir: Path) -> None:
    lab = traffic_lab(make_lab, short_dir)
    lab.green.set_api(error_ratio=0.2)
    d = lab.daemon()
    pattern = re.compile(r"^(\d+) of 50 samples$")

    def counted() -> dict[str, Any] | None:
        state = rule_state(status(lab), RULE, "green")
        if state is None or state["state"] != "inconclusive":
            return None
        found = pattern.match(state["why"] or "")
        # Enough real requests counted that their 5xx ratio would fire the rule.
        return state if found and int(found.group(1)) >= 10 else None

    with Load(lab.nginx, rate=2) as load:
        wait_until(counted, 60, "the rule inconclusive over some real requests")
        # What the rule would fire on, were there enough of them.
        ratio = status(lab)["signals"]["traffic"]["green"]["error_ratio"]
        assert ratio is not None and ratio >= 0.05, ratio
        result = guardctl("--config", str(lab.config_path), "status", "--json")
        text = guardctl("--config", str(lab.config_path), "status")
    assert lab.green.api_counts[500] >= 1
    doc = json_object(result.stdout)
    seen = rule_state(doc, RULE, "green")
    assert seen is not None and seen["state"] == "inconclusive", seen
    found = pattern.match(seen["why"])
    assert found is not None, seen
    assert 0 < int(found.group(1)) <= load.answered_by("green")
    assert "inconclusive" in text.stdout and RULE in text.stdout, text.stdout
    assert rollbacks(d) == []
    assert doc["active"] == "green"
    assert d.stop() == 0


# ---- 3: slower than the baseline after a switch -----------------------------------------


def test_latency_above_the_baseline_after_a_switch_rolls_back(
    make_lab: MakeLab, short_dir: Path
) -> None:
    rule = {
        "signal": "traffic",
        "stat": "p95_ms",
        "above_baseline": 2.0,
        "severity": "P1",
        "for": "1s",
        "min_samples": 20,
    }
    lab = traffic_lab(make_lab, short_dir, rules=[rule], active="blue")
    lab.blue.set_api(delay=0.03)
    lab.green.set_api(delay=0.09)
    d = lab.daemon()
    with Load(lab.nginx, rate=50) as load:
        # Blue's window fills with real requests before the operator moves traffic on.
        wait_until(
            lambda: (status(lab)["signals"]["traffic"]["blue"] or {}).get("samples", 0) >= 100,
            60,
            "100 of blue's requests counted",
        )
        switched = guardctl("--config", str(lab.config_path), "switch", "green", "--reason", "x")
        assert switched.returncode == 0, switched.stderr
        started = d.wait_event("rollback_started", timeout=60)
        d.wait_event("rollback_completed", timeout=60)
    assert load.answered_by("green") > 0
    names = [e["event"] for e in d.events()]
    assert names.index("switch") < names.index("rollback_started"), names
    assert started["from"] == "green" and started["to"] == "blue"
    assert started["severity"] == "P1"
    ev = started["evidence"]
    assert ev["rule"] == "traffic.p95_ms" and ev["stat"] == "p95_ms"
    assert ev["samples"] >= 20
    # Blue's p95 when traffic left it is the baseline; green's is about three times it.
    # The value is green's p95 over that baseline (blue's, at least its 30 ms delay; were it
    # green's own, the value would be about 1 and the rule would not have fired).
    assert ev["baseline_p95_ms"] >= 29, ev
    assert ev["p95_ms"] >= 89, ev
    assert ev["value"] == pytest.approx(ev["p95_ms"] / ev["baseline_p95_ms"], rel=0.01)
    assert ev["value"] >= 2.0, ev
    assert ev["sustained_s"] >= ev["sustain_s"] == 1.0, ev
    assert d.stop() == 0


# ---- 5: hostile lines while real traffic flows ------------------------------------------


def hostile_lines() -> list[bytes]:
    """Lines that must each end as something other than a request of a color."""
    junk = bytes(range(256)) * 4 + b"\n"
    huge = b'{"msec":"1","status":"500","upstream_addr":"' + b"9" * 1_048_576 + b'"}\n'
    forged = [
        b'{"msec":"x","status":"500","upstream_addr":"127.0.0.1:1"}\n',
        b'{"msec":"1","status":["500"],"upstream_addr":"127.0.0.1:1"}\n',
        b'{"msec":"1","status":"5000000","upstream_addr":"127.0.0.1:1"}\n',
        b'{"msec":{"a":1},"status":"500","upstream_addr":"127.0.0.1:1"}\n',
        b"[1, 2, 3]\n",
        b'{"msec":"1","status":"500","upstream_addr":' + b"[" * 5000 + b"\n",
    ]
    unattributed = [
        f'{{"msec":"1","status":"500","upstream_addr":"{addr}","upstream_status":"500",'
        f'"request_time":"0.001","upstream_response_time":"0.001"}}\n'.encode()
        for addr in ("10.9.9.9:80", "-", "127.0.0.1:1", "unix:/x")
    ]
    return [junk, huge, *forged, *unattributed]


def _json_or_none(raw: bytes) -> object:
    """One log line as JSON, or None for a line that is none (the hostile ones)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def test_hostile_lines_are_counted_and_change_nothing(make_lab: MakeLab, short_dir: Path) -> None:
    lab = traffic_lab(make_lab, short_dir)
    lab.green.set_api(error_ratio=0.02)
    log = short_dir / "access.log"
    d = lab.daemon()
    port = metrics_port(d)

    def lines(outcome: str) -> float:
        return metric(scrape(port), "guardd_traffic_lines_total", outcome=outcome)

    with Load(lab.nginx, rate=100) as load:
        wait_until(lambda: lines("ok") >= 100, 60, "100 requests counted")
        before = {k: lines(k) for k in ("ok", "unparsed", "unattributed", "oversize")}
        hostile = hostile_lines()
        for _ in range(3):
            for raw in hostile:
                # One write each with O_APPEND, as another writer of the log would.
                with log.open("ab") as f:
                    f.write(raw)
            load.wait_sent(load.sent + 50)
        wait_until(lambda: lines("oversize") >= before["oversize"] + 3, 60, "oversize counted")
        wait_until(lambda: lines("unattributed") >= before["unattributed"] + 12, 60, "unattributed")
        wait_until(lambda: lines("unparsed") >= before["unparsed"] + 3 * 7, 60, "unparsed")
        ok_then = lines("ok")
        load.wait_sent(load.sent + 100)
        # Real traffic is still counted after the junk, and decided on.
        wait_until(lambda: lines("ok") >= ok_then + 50, 60, "real requests after the junk")
        wait_ticks(d, port, 5)
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    assert rollbacks(d) == []
    doc = status(lab)
    assert doc["active"] == "green"
    state = rule_state(doc, RULE, "green")
    assert state is not None and state["state"] == "ok", state
    assert doc["signals"]["traffic"]["problem"] is None

    # None of the unattributed 500s was put on a color: once the load has stopped and the
    # log is read, green's 5xx are exactly those nginx logged for green. (nginx's own word,
    # not the app's count: a connection green dropped under load is nginx's 502 on green.)
    def counted() -> float:
        return metric(
            scrape(port), "guardd_traffic_requests_total", color="green", **{"class": "5xx"}
        )

    green = f"127.0.0.1:{lab.green.port}"  # (no hostile line names it: nginx's lines only)
    logged = sum(
        1
        for line in map(_json_or_none, log.read_bytes().splitlines())
        if isinstance(line, dict)
        and line.get("upstream_addr") == green
        and str(line["status"]).startswith("5")
    )
    assert logged >= 1, "green served no 5xx at a 2 % error ratio"
    wait_until(lambda: counted() == logged, 60, f"green's {logged} logged 5xx counted")
    assert d.stop() == 0


# ---- 6: the guard window counts real 5xx -----------------------------------------------


@pytest.mark.parametrize(
    ("blue_ratio", "outcome", "stale_after"),
    [
        (0.02, "qos_extended", None),
        (0.0, "qos_released", None),
        # Blue, the standby, served nothing for longer than stale_after before the
        # rollback, and its first requests after it are read a moment later (a quiet
        # service): its silence before the window is no blindness of the window's.
        (0.0, "qos_released", "2s"),
    ],
)
def test_guard_window_after_a_traffic_rollback_judges_real_5xx(
    make_lab: MakeLab, short_dir: Path, blue_ratio: float, outcome: str, stale_after: str | None
) -> None:
    lab = traffic_lab(
        make_lab, short_dir, stale_after=stale_after, qos__window="3s", qos__max_error_ratio=0.01
    )
    lab.green.set_api(error_ratio=0.2)
    lab.blue.set_api(error_ratio=blue_ratio)
    d = lab.daemon()
    with Load(lab.nginx, rate=100 if stale_after is None else 10):
        started = d.wait_event("rollback_started", timeout=60)
        assert started["evidence"]["rule"] == RULE
        d.wait_event("qos_locked", timeout=60)
        verdict = d.wait_event(
            outcome,
            timeout=60,
            where=lambda e: e.get("by") == "guardd" or e["event"] == "qos_extended",
        )
    other = "qos_released" if outcome == "qos_extended" else "qos_extended"
    assert not [e for e in d.events() if e["event"] == other], verdict
    assert "signals_blind" not in verdict["evidence"], verdict
    if outcome == "qos_extended":
        assert "real 5xx ratio" in verdict["reason"], verdict
        assert lab.lock_file.exists()
    else:
        assert "real 5xx" not in verdict["reason"], verdict
        assert not lab.lock_file.exists()
    assert lab.blue.counts["ok"] > 0 and all(k == "ok" for k in lab.blue.counts), lab.blue.counts
    assert d.stop() == 0


def test_a_guard_window_over_which_the_traffic_went_stale_is_not_met(
    make_lab: MakeLab, short_dir: Path
) -> None:
    """Rolled back on real 5xx, then nginx logs nothing more (the load stops): with no
    request for longer than `stale_after`, what users saw is unknown, and the window is
    extended, never released as "SLOs held" on the probes alone; a window with traffic
    again is released."""
    lab = traffic_lab(make_lab, short_dir, stale_after="1s", qos__window="3s")
    lab.green.set_api(error_ratio=0.2)
    d = lab.daemon()
    with Load(lab.nginx, rate=100):
        d.wait_event("rollback_started", timeout=60)
        d.wait_event("qos_locked", timeout=60)
    extended = d.wait_event("qos_extended", timeout=60)
    assert (
        "signals could not tell during the window (traffic: gave nothing, or went stale)"
        in (extended["reason"])
    ), extended
    assert extended["evidence"]["signals_blind"] == ["traffic"]
    assert lab.lock_file.exists()
    assert not [e for e in d.events() if e["event"] == "qos_released"]
    count = len(d.events())
    with Load(lab.nginx, rate=100):
        released = d.wait_event(
            "qos_released", timeout=60, after=count, where=lambda e: e.get("by") == "guardd"
        )
    assert "SLOs held" in released["reason"], released
    assert d.stop() == 0


# ---- 7: a log file that is not there yet -----------------------------------------------


def test_a_missing_log_is_waited_for_then_counted(make_lab: MakeLab, short_dir: Path) -> None:
    lab = traffic_lab(make_lab, short_dir)
    log = short_dir / "access.log"
    # guardd is set up before nginx logs there: the file does not exist yet (and nginx's
    # config test, which guardd runs at start, does not create it either).
    lab.nginx.log_to(None)
    log.unlink()
    d = lab.daemon()
    wanted = f"waiting for {log} (missing)"
    wait_until(
        lambda: status(lab)["signals"]["traffic"]["state"] == wanted, 30, "the signal waiting"
    )
    # Missing past the grace (10 s): no quiet log but a source that gives nothing, said once
    # and shown until it reads (a mistyped path looked like a service with no users).
    said = d.wait_event("alert", timeout=60, where=lambda e: "signal traffic" in e["reason"])
    assert said["reason"] == (
        "signal traffic gives nothing: does not exist; its rules are inconclusive until it "
        "reads again"
    )
    doc = status(lab)
    assert doc["signals"]["traffic"]["problem"] == "does not exist"
    assert "signal traffic gives nothing: does not exist" in doc["warnings"]
    assert guardctl("--config", str(lab.config_path), "status").returncode == 1
    waited = guardctl("--config", str(lab.config_path), "wait", "healthy", "--timeout", "1s")
    assert waited.returncode == 1 and "signal traffic gives nothing" in waited.stderr, waited
    assert rule_state(doc, RULE, "green") == {
        **(rule_state(doc, RULE, "green") or {}),
        "state": "inconclusive",
    }
    with Load(lab.nginx, rate=50) as load:
        load.wait_sent(50)
        doc = status(lab)
        assert doc["signals"]["traffic"]["state"] == wanted
        assert doc["signals"]["traffic"]["lines"]["ok"] == 0
        lab.nginx.log_to(str(log))  # nginx creates the file and logs there from now on
        wait_until(
            lambda: status(lab)["signals"]["traffic"]["state"] == f"reading {log}",
            30,
            "the signal reading the new file",
        )
        wait_until(
            lambda: (status(lab)["signals"]["traffic"]["green"] or {}).get("samples", 0) >= 50,
            60,
            "50 requests of green counted",
        )
    # Counted from the file's first line: every request nginx logged there.
    logged = len(log.read_text().splitlines())
    wait_until(
        lambda: status(lab)["signals"]["traffic"]["lines"]["ok"] == logged,
        30,
        f"all {logged} logged requests counted",
    )
    assert status(lab)["signals"]["traffic"]["problem"] is None
    assert "signal traffic gives nothing: does not exist" not in status(lab)["warnings"]
    assert logged <= load.answered_by("green")
    assert d.stop() == 0


@pytest.mark.parametrize("denied", ["file", "directory"])
def test_an_unreadable_log_is_a_problem_until_it_can_be_read(short_dir: Path, denied: str) -> None:
    # root reads any file whatever its mode: this guardd runs as nobody, as under systemd.
    logs = short_dir / "logs"
    logs.mkdir()
    log = logs / "access.log"
    the_lab = Lab(
        short_dir / "lab",
        access_log=str(log),
        signals__traffic={"kind": "access_log", "source": f"file:{log}", "window": "10s"},
        rules=[ERROR_RULE],
        switch__verify_url=None,
    )
    try:
        the_lab.open_to_nobody()
        the_lab.green.set_api(error_ratio=0.2)
        (log if denied == "file" else logs).chmod(0o000 if denied == "file" else 0o700)
        d = the_lab.daemon(notify=False, as_nobody=True)
        alert = d.wait_event(
            "alert", timeout=30, where=lambda e: "signal traffic" in (e.get("reason") or "")
        )
        assert "permission denied" in alert["reason"], alert
        with Load(the_lab.nginx, rate=100) as load:
            # Far more failing requests than the rule needs, in a log guardd may not read:
            # inconclusive, never read as healthy, and no rollback.
            load.wait_sent(300)
            doc = status(the_lab)
            signal = doc["signals"]["traffic"]
            assert signal["problem"] == "permission denied", signal
            assert signal["state"] == f"permission denied: {log}", signal
            assert signal["lines"]["ok"] == 0
            state = rule_state(doc, RULE, "green")
            assert state is not None and state["state"] == "inconclusive", state
            assert rollbacks(d) == []
            # The operator fixes the mode: the traffic from then on is read and acted on.
            (log if denied == "file" else logs).chmod(0o644 if denied == "file" else 0o755)
            # The decision is what this test is about: nobody may not run this root nginx's
            # config test, so the switch itself is refused (and undone) after it.
            started = d.wait_event("rollback_started", timeout=60)
        assert_traffic_evidence(started, load.answered_by("green"))
        assert status(the_lab)["signals"]["traffic"]["problem"] is None
        assert d.stop() == 0
    finally:
        the_lab.close()
