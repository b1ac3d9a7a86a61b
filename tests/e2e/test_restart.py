"""A restart of the real daemon changes no decision; lost protection is never silent."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import signal
import subprocess
import time
from typing import Any

import pytest

from guardd.timestamps import parse_rfc3339
from tests.harness.daemon import GUARDD, Daemon, Lab, MakeLab, guardctl, log_lines, wait_until

pytestmark = pytest.mark.nginx


def ctl(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return guardctl("--config", str(lab.config_path), *argv)


def status(lab: Lab) -> dict[str, Any]:
    return dict(json.loads(ctl(lab, "status", "--json").stdout))


def levels(d: Daemon, event: str) -> set[str]:
    return {x["level"] for x in log_lines(d) if x.get("event") == event}


def test_sticky_hold_after_a_failed_switch_survives_a_restart(make_lab: MakeLab) -> None:
    lab: Lab = make_lab()
    d = lab.daemon()
    good = lab.nginx.targets["blue"].read_text()
    lab.nginx.targets["blue"].write_text("this is not nginx syntax {\n")
    lab.green.set_mode("http_503")
    d.wait_event("rollback_failed")
    d.wait_event("hold")
    assert wait_until(lambda: d.state().get("hold", {}) or None, 10, "hold in state.json")["sticky"]
    # The levels journald's priorities are made of: a failed rollback and a hold warn.
    # (The log line follows the journal's fsync'd line: wait for it, not the journal.)
    for event in ("rollback_failed", "hold"):
        said = functools.partial(levels, d, event)
        assert wait_until(said, 10, f"{event}'s log line") == {"warning"}
    assert levels(d, "rollback_started") == {"info"}
    assert d.stop() == 0

    # The target is fixed meanwhile; only an operator may send traffic there now.
    lab.nginx.targets["blue"].write_text(good)
    count = len(d.events())
    d2 = lab.daemon()
    served = lab.green.requests
    assert lab.green.wait_for_requests(served + 30, timeout=30), "green probed after the restart"
    assert wait_until(lambda: d2.state().get("state") == "hold", 10, "hold after the restart")
    new = [e["event"] for e in d2.events()[count:]]
    assert "rollback_started" not in new, new
    assert "hold" not in new, "the same hold, not a new one"
    assert ctl(lab, "status").returncode == 2
    assert lab.nginx.served_color() is None, "still on green: held, not switched"

    assert ctl(lab, "resume").returncode == 0
    d2.wait_event("rollback_completed", after=count)
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
    assert d2.stop() == 0


def test_a_guard_window_survives_a_restart_with_its_probes(make_lab: MakeLab) -> None:
    # A window that outlasts a stop and a start on a loaded machine (6 s did not, once),
    # and a restart quicker than three probe intervals, which moves no window: at the
    # lab's 200 ms probes a loaded machine's restart took longer than 600 ms.
    lab: Lab = make_lab(qos__window="20s", probe__interval="1s")
    d = lab.daemon()
    lab.green.set_mode("http_503")
    locked = d.wait_event("qos_locked")
    assert wait_until(
        lambda: ((d.state().get("qos") or {}).get("window") or {}).get("samples", 0) >= 3,
        10,
        "probes counted in the guard window",
    )
    assert d.stop() == 0
    counted = d.state()["qos"]["window"]["samples"]
    count = len(d.events())
    d2 = lab.daemon()
    assert json.loads(lab.lock_file.read_text())["until"] == locked["until"]
    released = d2.wait_event("qos_released", after=count, timeout=30)
    assert released["evidence"]["samples"] > counted, "the probes before the restart count"
    assert released["ts"] >= locked["until"], "not released before the window ended"
    assert not [e for e in d2.events()[count:] if e["event"] == "qos_extended"]
    assert d2.stop() == 0


def test_a_guardd_killed_while_it_holds_keeps_deploys_blocked_when_it_is_back(
    make_lab: MakeLab,
) -> None:
    """Both colors fail: guardd holds, and its QoS lock blocks deploys. Killed (-9) and
    started again, its windows are empty; that is no evidence the colors recovered, so the
    lock stays (never released and taken again) until they do, and then it ends."""
    lab: Lab = make_lab()
    d = lab.daemon()
    lab.blue.set_mode("http_503")
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked", where=lambda e: (e["reason"] or "").startswith("guardd holds"))
    d.kill9()
    count = len(d.events())
    d2 = lab.daemon()

    # Until the fresh windows hold ten probes of each color (past policy.min_samples), the
    # gate is asked all along: it never says deploys are allowed.
    def filled() -> bool:
        assert ctl(lab, "qos", "status").returncode == 1, "deploys allowed: both colors fail"
        doc = json.loads(ctl(lab, "status", "--json").stdout)
        return all(doc["upstreams"][c]["samples"] >= 10 for c in ("blue", "green"))

    wait_until(filled, 30, "ten probes of each color in the restarted guard's windows")
    assert [e for e in d2.events()[count:] if e["event"] == "qos_released"] == []
    assert lab.lock_file.exists()
    # Green is back: the hold ends once green's 30 s window no longer fails the P1 ratio
    # rule (nor holds its condition), and its lock with it.
    lab.green.set_mode("ok")
    released = d2.wait_event("qos_released", after=count, timeout=90)
    assert "no longer" in (released["reason"] or ""), released
    # One episode: the hold kept across the restart is the same hold (never journaled
    # anew), and its lock was never released and taken again while green's P1 ratio rule
    # waited out its `for` (after the P0 ratio rule above it stopped).
    after = [e["event"] for e in d2.events()[count:]]
    assert "qos_locked" not in after and "hold" not in after, after
    assert d2.stop() == 0


def test_a_dead_rollback_target_is_a_warning_once_per_episode(make_lab: MakeLab) -> None:
    # A short window: an episode ends once the target has passed for a whole window.
    lab: Lab = make_lab(policy__window="4s")
    d = lab.daemon()
    wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK")
    lab.blue.set_mode("http_503")
    alert = d.wait_event("alert", where=lambda e: "no safe rollback" in (e["reason"] or ""))
    assert "blue" in alert["reason"]
    assert lab.notify is not None
    lab.notify.wait_for(lambda m: m.startswith("STATUS=") and "no-rollback-target" in m, 20)
    status = wait_until(lambda: (r := ctl(lab, "status")).returncode == 1 and r, 20, "WARNING")
    assert "no safe rollback" in status.stdout
    doc = json.loads(ctl(lab, "status", "--json").stdout)
    assert doc["state"] == "steady" and "blue" in doc["no_rollback_target"]
    # The last decision says what was done in its own words, not the active color's
    # verdict ("healthy"), in the JSON and the text.
    assert doc["last_decision"]["action"] == "alert", doc["last_decision"]
    assert doc["last_decision"]["reason"] == alert["reason"], doc["last_decision"]
    assert re.search(r"last decision +\S+ alert: no safe rollback: ", status.stdout), status
    served = lab.blue.requests
    assert lab.blue.wait_for_requests(served + 20, timeout=30)
    alerts = [e for e in d.events() if "no safe rollback" in (e.get("reason") or "")]
    assert len(alerts) == 1, "once per episode"
    assert levels(d, "alert") == {"warning"}

    # The target recovers: the warning goes at once, and once it has passed for a window
    # (4 s: 20 probes at 200 ms) the next episode alerts again.
    lab.blue.set_mode("ok")
    assert wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK again")
    assert lab.blue.wait_for_requests(lab.blue.requests + 30, timeout=30)
    count = len(d.events())
    lab.blue.set_mode("http_503")
    d.wait_event("alert", after=count, where=lambda e: "no safe rollback" in (e["reason"] or ""))

    # ... and a restart in the middle of an episode does not alert it again.
    assert d.stop() == 0
    count = len(d.events())
    d2 = lab.daemon()
    served = lab.blue.requests
    assert lab.blue.wait_for_requests(served + 20, timeout=30)
    assert ctl(lab, "status").returncode == 1
    assert not [e for e in d2.events()[count:] if e["event"] == "alert"]
    assert d2.stop() == 0


def test_a_rollback_target_too_slow_to_stay_fresh_is_one_warning(make_lab: MakeLab) -> None:
    """Blue answers every probe well, but in 0.9 s: longer than the 0.6 s (3 probe
    intervals) after which a probe is stale, shorter than the 1 s probe timeout. Between
    its answers it cannot be vouched for, after each it can: one episode, one alert."""
    lab: Lab = make_lab()
    d = lab.daemon()
    wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK")
    lab.blue.set_mode("slow", delay=0.9)
    alert = d.wait_event("alert", where=lambda e: "no safe rollback" in (e["reason"] or ""))
    assert "blue is stale" in alert["reason"], alert
    served = lab.blue.requests
    assert lab.blue.wait_for_requests(served + 15, timeout=60)  # 15 answers, each fresh a while
    alerts = [e for e in d.events() if "no safe rollback" in (e.get("reason") or "")]
    assert len(alerts) == 1, [a["reason"] for a in alerts]
    assert d.stop() == 0


def test_under_journald_each_line_carries_its_syslog_priority(make_lab: MakeLab) -> None:
    """journald reads `<N>` off the front of a line as its priority (SyslogLevelPrefix=)."""
    lab: Lab = make_lab()
    assert lab.notify is None
    d = Daemon(lab.config_path, lab.state_dir, env={"GUARDD_FAULT_DIR": str(lab.fault_dir)})
    d.log_path.touch()
    st = d.log_path.stat()
    # The daemon's stderr is this very file: it is the "journal stream" here.
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    lab.daemons.append(d.start())
    lab.blue.set_mode("http_503")
    d.wait_event("alert", where=lambda e: "no safe rollback" in (e["reason"] or ""))

    def parsed() -> list[tuple[int, dict[str, Any]]]:
        out = []
        for line in d.log().splitlines():
            if line.startswith("<") and ">" in line:
                prio, _, rest = line[1:].partition(">")
                out.append((int(prio), json.loads(rest)))
        return out

    lines = wait_until(
        lambda: [p for p in parsed() if p[1]["event"] == "alert"] and parsed(), 10, "the alert line"
    )
    assert len(lines) == len(d.log().splitlines()), "every line is prefixed"
    by_event = {doc["event"]: prio for prio, doc in lines}
    assert by_event["alert"] == 4  # warning
    assert by_event["started"] == 6  # info
    assert all(prio == {"info": 6, "warning": 4, "error": 3}[doc["level"]] for prio, doc in lines)
    assert d.stop() == 0


def test_a_second_guardd_on_a_running_guards_state_writes_nothing(make_lab: MakeLab) -> None:
    """`guardd run` typed beside the running unit: refused before it reads or writes."""
    lab: Lab = make_lab()
    d = lab.daemon()
    journal = d.journal_path.read_bytes()
    link = lab.nginx.active_link.readlink()

    # The same state directory under another control socket: only the state lock tells.
    other = lab.tmp / "other.toml"
    other.write_text(lab.config_text().replace(str(lab.socket_path), str(lab.tmp / "other.sock")))
    # The same control socket with another state directory: the live socket tells.
    beside = lab.tmp / "beside.toml"
    beside_state = lab.tmp / "beside-state"
    beside.write_text(lab.config_text().replace(str(lab.state_dir), str(beside_state)))
    # Its own state directory and socket, the same nginx link: the link's lock tells.
    apart = lab.tmp / "apart.toml"
    apart_state = lab.tmp / "apart-state"
    apart.write_text(
        lab.config_text()
        .replace(str(lab.state_dir), str(apart_state))
        .replace(str(lab.socket_path), str(lab.tmp / "apart.sock"))
    )
    for config in (lab.config_path, other, beside, apart):
        second = subprocess.run(
            [*GUARDD, "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1, (config, second)
        said = second.stdout + second.stderr
        failed = [json.loads(x) for x in said.splitlines() if '"startup_failed"' in x]
        if config == other:
            assert len(failed) == 1, said
            assert failed[0]["error"] == (
                f"another guardd (pid {d.pid}) runs with this state directory: "
                f"{lab.state_dir} is locked"
            )
        elif config == apart:
            assert len(failed) == 1, said
            held = lab.nginx.active_link
            assert failed[0]["error"] == (
                f"{apart}: switch.active_link: another guardd (pid {d.pid}) switches {held}: "
                f"{held.parent / f'.{held.name}.guardd.lock'} is locked; two guards of one "
                "target undo each other's switches: give each instance its own"
            )
            assert not (apart_state / "events.jsonl").exists(), "nothing journaled"
        else:
            assert said.strip() == (
                f"{config}: control.socket: cannot bind {lab.socket_path}: another process "
                "listens on it (a guardd already running?)"
            ), said
    # Whatever the running guard journaled meanwhile, none of it is a start or a stop.
    assert d.journal_path.read_bytes().startswith(journal)
    assert [e["event"] for e in d.events()].count("started") == 1
    assert "stopped" not in [e["event"] for e in d.events()]
    assert not beside_state.exists() or not any(beside_state.iterdir())
    assert lab.nginx.active_link.readlink() == link
    assert d.proc is not None and d.proc.poll() is None, "the running guard goes on"
    assert ctl(lab, "status").returncode == 0

    # The lock dies with its holder, however it ends: the next start is not kept out.
    d.kill9()
    d2 = lab.daemon()
    assert d2.state_dir == d.state_dir
    assert (lab.state_dir / "guardd.pid").read_text().strip() == str(d2.pid)
    assert d2.stop() == 0


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b'{"version": 1, "paused": {"reason": "DB mig',
        b"[1, 2]",
        b"\xff\xfe",
        b'{"paused": 1}',
        b"{}",
        b'{"version": 99, "state": "steady"}',
    ],
)
def test_a_state_file_that_cannot_be_read_holds_never_decides_alone(
    make_lab: MakeLab, damage: bytes
) -> None:
    # Paused for a migration, then state.json is lost (cut short, overwritten): guardd
    # cannot tell it was paused, so it must not go back to deciding alone.
    lab: Lab = make_lab()
    d = lab.daemon()
    assert ctl(lab, "pause", "--reason", "DB migration").returncode == 0
    assert d.stop() == 0
    state = lab.state_dir / "state.json"
    state.write_bytes(damage)
    count = len(d.events())
    d2 = lab.daemon()
    held = d2.wait_event("hold", after=count)
    kept = lab.state_dir / "state.json.unreadable"
    assert held["reason"].startswith(f"{state} was not "), held
    assert f"kept as {kept}: whether guardd was paused or held is unknown" in held["reason"]
    assert kept.read_bytes() == damage
    doc = status(lab)
    assert (doc["state"], doc["qos"]["locked"]) == ("hold", True), doc
    # Held: a failing green is not rolled back until an operator has looked.
    lab.green.set_mode("http_503")
    assert lab.green.wait_for_requests(lab.green.requests + 10, timeout=30)
    assert "rollback_started" not in [e["event"] for e in d2.events()[count:]]
    assert ctl(lab, "resume").returncode == 0
    d2.wait_event("rollback_completed", after=count)
    assert d2.stop() == 0


# ---- the `for` of a pending rule --------------------------------------------------------

SUSTAIN = "6s"
# A quarter of green's probes fail: no P0 rule may fire first.
NO_P0 = {"policy__p0_error_ratio": 0.9, "policy__consecutive_failures": 100}


def _pending_p1(lab: Lab) -> float:
    """Make green fail about a quarter of its answers at random (the front door's too,
    whose requests reach it between the probes) and wait for its P1 ratio rule to be
    pending; the onset (wall seconds) status gives. The lab's P0 rules are set out of
    reach."""
    lab.green.set_mode("random_5xx", probability=0.25, seed=11)

    def since() -> str | None:
        row = next(r for r in status(lab)["rules"] if r["rule"] == "p1_error_ratio")
        green = row["green"]
        return green["since"] if green["state"] == "pending" else None

    return parse_rfc3339(wait_until(since, 30, "green's P1 ratio rule pending"))


def _onset_of(started: dict[str, Any]) -> float:
    """When the `for` of the rule behind `rollback_started` began (wall seconds)."""
    return parse_rfc3339(started["ts"]) - float(started["evidence"]["sustained_s"])


def test_a_restart_never_restarts_the_for_of_a_pending_rule(make_lab: MakeLab) -> None:
    """Killed (-9) while a P1 rule is pending and started again, guardd rolls back when
    the rule's `for` ends counted from its onset before the kill: a guardd restarted more
    often than its `for` (a crash loop) would otherwise never roll back on a P1."""
    # A `for` long enough that the kill, a start on a loaded machine and the refill of
    # the window fit in it: an onset carried over lapses when its `for` would have ended.
    lab: Lab = make_lab(policy__p1_sustain="15s", **NO_P0)
    d = lab.daemon()
    since = _pending_p1(lab)
    saved = wait_until(lambda: d.state().get("onsets"), 10, "the onset in state.json")
    assert [(o["rule"], o["color"]) for o in saved["onsets"]] == [("p1_error_ratio", "green")]
    d.kill9()
    count = len(d.events())
    restarted = time.time()
    d2 = lab.daemon()
    started = d2.wait_event("rollback_started", after=count, timeout=60)
    assert started["severity"] == "P1" and started["evidence"]["rule"] == "p1_error_ratio"
    # The onset is the one before the kill (to the millisecond state.json keeps), not one
    # taken after the restart.
    assert _onset_of(started) < restarted
    assert abs(_onset_of(started) - since) < 0.05, (started, since)
    d2.wait_event("rollback_completed", after=count)
    # The color traffic moved to starts its onsets afresh; the one it left keeps its own.
    assert all(
        o["color"] == "green" for o in (d2.state().get("onsets") or {"onsets": []})["onsets"]
    )


def test_a_reload_keeps_the_for_of_an_unchanged_rule_and_restarts_a_changed_one(
    make_lab: MakeLab,
) -> None:
    lab: Lab = make_lab(policy__p1_sustain="1h", **NO_P0)
    d = lab.daemon()
    since = _pending_p1(lab)

    def green() -> dict[str, Any]:
        return dict(next(r for r in status(lab)["rules"] if r["rule"] == "p1_error_ratio")["green"])

    def reload(*, kept: bool, **more: Any) -> tuple[float, float]:
        """(the rule's onset on green after the reload, when the reload was journaled)."""
        count = len(d.events())
        lab.write_config(**more)
        d.signal(signal.SIGHUP)
        reloaded = d.wait_event("config_reloaded", after=count)
        # status shows the last tick's states: wait for one that judged more samples.
        before = green()["samples"]
        row = wait_until(lambda: (g := green())["samples"] > before and g, 10, "a tick")
        if kept:
            # The same rule, the same window: pending at the very next tick.
            assert row["state"] == "pending", row
        else:
            # Another rule, judged afresh on green's random quarter of failures: at a few
            # samples its ratio may dip below the threshold first (1 of 11 was seen).
            row = wait_until(
                lambda: (g := green())["state"] == "pending" and g, 30, "the new rule pending"
            )
        return parse_rfc3339(row["since"]), parse_rfc3339(reloaded["ts"])

    # A reload that leaves the rule as it was (the QoS window changes): its `for` goes on.
    onset, _ = reload(kept=True, qos__window="3s")
    assert abs(onset - since) < 0.005
    # One that changes it (a `for` of 30 minutes is another rule): it starts afresh.
    onset, reloaded = reload(kept=False, policy__p1_sustain="30m")
    assert onset >= reloaded - 0.005


def _second_guard(lab: Lab, name: str) -> subprocess.CompletedProcess[str]:
    """`guardd run` with its own state and socket, on the running guard's nginx link."""
    config = lab.tmp / f"{name}.toml"
    config.write_text(
        lab.config_text()
        .replace(str(lab.state_dir), str(lab.tmp / f"{name}-state"))
        .replace(str(lab.socket_path), str(lab.tmp / f"{name}.sock"))
    )
    return subprocess.run(
        [*GUARDD, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _taken_again(d: Daemon, count: int) -> bool:
    return [x.get("event") for x in log_lines(d)].count("switch_lock_taken_again") >= count


def test_a_switch_lock_removed_or_replaced_is_taken_again(make_lab: MakeLab) -> None:
    """The lock file removed (an `rm`, a cleaner of old files) or replaced under a running
    guard: its flock then locks no file, and a second guardd would start beside it. The
    running guard takes the lock again at its next tick, and the second is refused."""
    lab: Lab = make_lab()
    d = lab.daemon()
    link = lab.nginx.active_link
    lock = link.parent / f".{link.name}.guardd.lock"
    assert lock.read_text().strip() == str(d.pid)
    stranger = lab.tmp / "stranger"
    for count, how in enumerate(("removed", "replaced"), start=1):
        if how == "removed":
            lock.unlink()
        else:
            stranger.write_text("")
            stranger.replace(lock)
        wait_until(functools.partial(_taken_again, d, count), 20, f"the lock {how}: taken again")
        assert lock.read_text().strip() == str(d.pid), how
        second = _second_guard(lab, f"second-{how}")
        assert second.returncode == 1, (how, second)
        assert f"another guardd (pid {d.pid}) switches {link}: {lock} is locked" in second.stderr
    assert d.proc is not None and d.proc.poll() is None, "the running guard goes on"
    # Still the guard of the link: a failing green is rolled back.
    lab.green.set_mode("http_503")
    d.wait_event("rollback_completed")
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
    assert d.stop() == 0
    assert not lock.exists(), "a clean stop removes the file it holds"


def test_a_guard_whose_switch_lock_another_took_does_not_switch(make_lab: MakeLab) -> None:
    """Another process took the lock's path while this guard ran (a new file renamed over
    it, locked): this guard may no longer switch the link. Its rollback fails at the switch
    and it holds, the link untouched; once the other lets go, it takes the lock again, and
    an operator's resume rolls back."""
    lab: Lab = make_lab()
    d = lab.daemon()
    link = lab.nginx.active_link
    lock = link.parent / f".{link.name}.guardd.lock"
    before = link.readlink()
    # The other's lock is in place the instant the guard's file is gone: no tick between.
    theirs = lab.tmp / "theirs.lock"
    theirs.write_text("4242\n")  # (a pid of no guardd: the holder is this test)
    who = "another process (the pid its file names, 4242, runs no guardd)"
    fd = os.open(theirs, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        theirs.replace(lock)
        lost = wait_until(
            lambda: next((x for x in log_lines(d) if x.get("event") == "switch_lock_lost"), None),
            20,
            "switch_lock_lost",
        )
        assert lost["level"] == "error"
        assert f"{who} switches {link}: {lock} is locked" in lost["error"]
        # Said where an operator looks, before any rollback fails on it.
        refused = f"guardd does not switch {link} now: its lock cannot be held: "
        alert = d.wait_event("alert", where=lambda e: e["reason"].startswith(refused))
        assert "until it may, a rollback fails" in alert["reason"], alert
        assert any(w.startswith(refused) for w in status(lab)["warnings"])
        assert ctl(lab, "status").returncode == 1
        # An operator's switch is refused the same way, and undone before it began.
        wait_until(lambda: status(lab)["upstreams"]["blue"]["samples"] >= 5, 20, "blue's window")
        res = ctl(lab, "switch", "blue", "--reason", "by hand")
        assert res.returncode == 1, res
        said = res.stderr + res.stdout
        assert (
            f"switch to blue failed at switch (nothing was changed): guardd does not switch "
            f"{link} now: its lock cannot be held: {who}" in said
        ), said
        assert link.readlink() == before

        lab.green.set_mode("http_503")
        failed = d.wait_event("rollback_failed")
        assert (
            f"failed at switch: guardd does not switch {link} now: its lock cannot be held: "
            f"{who} switches" in failed["reason"]
        ), failed
        d.wait_event("hold")
        assert link.readlink() == before, "the link is untouched"
        assert lab.nginx.served_color() is None, "green and its 503s, not switched"
    finally:
        os.close(fd)
    wait_until(functools.partial(_taken_again, d, 1), 20, "the lock taken again once free")
    assert lock.read_text().strip() == str(d.pid)
    d.wait_event("alert", where=lambda e: e["reason"].startswith(f"guardd may switch {link} again"))
    assert not any(w.startswith(refused) for w in status(lab)["warnings"])
    count = len(d.events())
    assert ctl(lab, "resume").returncode == 0
    d.wait_event("rollback_completed", after=count)
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=20)
    assert d.stop() == 0
