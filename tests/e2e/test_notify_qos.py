"""Notifications and the QoS guard window, end to end with real receivers and a real nginx."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from tests.harness.daemon import Lab, MakeLab, guardctl, wait_until
from tests.harness.nginx import free_port
from tests.harness.receiver import HANG, Receiver, Reply, Step, closed_port, serve

pytestmark = pytest.mark.nginx
OK = Reply(200)


@contextmanager
def receiver(
    script: tuple[Reply, ...] = (), *, default: Step = OK, port: int = 0
) -> Iterator[Receiver]:
    """A real webhook receiver served from a background event loop."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve(script, default=default, port=port)) as rec,
    ):
        yield rec


def webhook(url: str, events: list[str]) -> dict[str, object]:
    return {"notify": [{"kind": "webhook", "url_env": "GUARDD_TEST_HOOK", "events": events}]}


def make(make_lab: MakeLab, url: str, events: list[str], **overrides: Any) -> Lab:
    lab: Lab = make_lab(**overrides)
    extra_toml = (
        '\n[[notify]]\nkind = "webhook"\nurl_env = "GUARDD_TEST_HOOK"\n'
        f"events = {json.dumps(events)}\n"
    )
    lab.config_path.write_text(lab.config_text() + extra_toml)
    return lab


def test_500_twice_then_200_delivers_once_and_counts(make_lab: MakeLab) -> None:
    port = free_port()
    with receiver((Reply(500), Reply(500))) as rec:
        lab = make(make_lab, rec.url, ["rollback"], metrics__listen=f"127.0.0.1:{port}")
        d = lab.daemon(env={"GUARDD_TEST_HOOK": rec.url})
        lab.green.set_mode("http_503")
        done = d.wait_event("rollback_completed")
        wait_until(lambda: len(rec.requests) >= 3, 30, "three delivery attempts")
        bodies = [r.json() for r in rec.requests]
        assert {b["id"] for b in bodies} == {done["id"]}
        assert bodies[0]["event"] == "rollback_completed" and bodies[0]["evidence"]["rule"]

        def counts() -> dict[str, float]:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            out = {}
            for line in text.splitlines():
                if line.startswith("guardd_notifications_total{"):
                    outcome = line.split('outcome="')[1].split('"')[0]
                    out[outcome] = float(line.rsplit(" ", 1)[1])
            return out

        wait_until(lambda: counts().get("sent") == 1.0, 20, "sent counted")
        assert counts()["retried"] == 2.0
        assert counts().get("dropped", 0.0) == 0.0
        assert len(rec.requests) == 3, "exactly once with a 2xx"


def test_a_rotated_url_file_is_taken_at_a_reload_and_a_bad_one_rejects_it(
    make_lab: MakeLab,
) -> None:
    """A webhook URL in `url_file` rotated (systemd's LoadCredential), then SIGHUP: the file
    names the same path, so the config alone does not change, but the sink must send to
    the new URL; and a URL that is no URL rejects the reload, as at start."""
    with receiver() as old, receiver() as new:
        lab: Lab = make_lab(qos__window="1s")
        url_file = lab.tmp / "hook.url"
        url_file.write_text(old.url + "\n")
        lab.config_path.write_text(
            lab.config_text()
            + f'\n[[notify]]\nkind = "webhook"\nurl_file = "{url_file}"\nevents = ["qos"]\n'
        )
        d = lab.daemon()
        url_file.write_text(new.url + "\n")
        count = len(d.events())
        d.signal(signal.SIGHUP)
        reloaded = d.wait_event("config_reloaded", after=count)
        assert "notify" in reloaded["changed"], reloaded
        assert (
            guardctl("--config", str(lab.config_path), "qos", "lock", "--for", "1s").returncode == 0
        )
        wait_until(lambda: len(new.requests) >= 2, 30, "qos_locked and qos_released sent")
        assert old.requests == []
        url_file.write_text("http://127.0.0.1:99999/x\n")
        count = len(d.events())
        d.signal(signal.SIGHUP)
        rejected = d.wait_event("alert", after=count)
        assert rejected["reason"].startswith("reload rejected, still running the previous config: ")
        assert "notify[0].url_file" in rejected["reason"] and "99999" not in rejected["reason"]
        assert d.stop() == 0


def test_hung_receiver_delays_neither_rollback_nor_status(make_lab: MakeLab) -> None:
    with receiver(default=HANG) as rec:
        lab = make(make_lab, rec.url, ["started", "rollback", "qos"])
        d = lab.daemon(env={"GUARDD_TEST_HOOK": rec.url})
        wait_until(lambda: rec.requests, 20, "the first notification to hang")
        lab.green.set_mode("http_503")
        assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
        done = d.wait_event("rollback_completed")
        assert done["duration_ms"] < 10_000
        res = guardctl("--config", str(lab.config_path), "status", "--json")
        assert res.returncode in (0, 1), res.stderr
        assert json.loads(res.stdout)["active"] == "blue"
        assert d.stop() == 0, "a hung sink does not delay shutdown either"


def test_undelivered_messages_survive_a_restart_and_are_not_sent_twice(make_lab: MakeLab) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/hook/T0KEN"
    lab = make(make_lab, url, ["rollback", "qos"], retry__attempts=2)
    d = lab.daemon(env={"GUARDD_TEST_HOOK": url})
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    assert d.stop() == 0
    queued = {e["id"] for e in d.events() if e["event"] in ("rollback_completed", "qos_locked")}
    with receiver(port=port) as rec:
        d2 = lab.daemon(env={"GUARDD_TEST_HOOK": url})
        wait_until(
            lambda: {r.json()["id"] for r in rec.requests} >= queued,
            30,
            "the queued messages after the restart",
        )
        assert d2.stop() == 0
        seen = [r.json()["id"] for r in rec.requests]
        d3 = lab.daemon(env={"GUARDD_TEST_HOOK": url})
        assert d3.stop() == 0
        after = [r.json()["id"] for r in rec.requests]
    assert sorted(i for i in seen if i in queued) == sorted(queued), "each exactly once"
    assert [i for i in after if i in queued] == [i for i in seen if i in queued], "not again"


def test_secrets_never_reach_logs_status_or_journal(make_lab: MakeLab) -> None:
    with receiver() as rec:
        token = rec.url.rsplit("/", 3)[-1]
        lab = make(
            make_lab,
            rec.url,
            ["rollback", "qos", "started", "stopped"],
            probe__headers={"Authorization": "Bearer s3cr3t-t0ken-value"},
        )
        d = lab.daemon(env={"GUARDD_TEST_HOOK": rec.url})
        lab.green.set_mode("http_503")
        d.wait_event("qos_locked")
        wait_until(lambda: len(rec.requests) >= 2, 20, "notifications delivered")
        status = guardctl("--config", str(lab.config_path), "status", "--json").stdout
        assert d.stop() == 0
        for where, text in (("log", d.log()), ("journal", d.raw_journal()), ("status", status)):
            assert token not in text, where
            assert rec.url not in text, where
            assert "s3cr3t-t0ken-value" not in text, where


def test_guard_window_is_released_when_slos_hold(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(qos__window="2s")
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    released = d.wait_event("qos_released")
    assert released["by"] == "guardd" and released["evidence"]["samples"] > 0
    assert not lab.lock_file.exists()
    wait_until(lambda: d.state().get("qos") is None, 10, "state.json mirror cleared")


def test_a_guard_window_lock_removed_by_hand_ends_in_the_journal(make_lab: MakeLab) -> None:
    # `rm` of the lock file is an operator's unlock: guardd never fights it, and never
    # lets deploys open in silence either.
    lab: Lab = make_lab(qos__window="10m")
    d = lab.daemon()
    lab.green.set_mode("http_503")
    locked = d.wait_event("qos_locked")
    lab.lock_file.unlink()
    released = d.wait_event("qos_released", after=d.events().index(locked))
    assert released["by"] == "external", released
    assert released["reason"] == (
        f"the lock file {lab.lock_file} was removed outside guardd; its lock "
        f"({locked['reason']}) ends"
    )
    wait_until(lambda: d.state().get("qos") is None, 10, "state.json mirror cleared")
    assert guardctl("--config", str(lab.config_path), "qos", "status").returncode == 0
    assert d.stop() == 0


def test_a_guard_window_lock_overwritten_by_hand_is_said_and_keeps_blocking(
    make_lab: MakeLab,
) -> None:
    # An emptied lock file is a lock of no one's: it holds (fail closed), but guardd's
    # window no longer ends it, and the journal says so rather than a silent freeze.
    lab: Lab = make_lab(qos__window="10m")
    d = lab.daemon()
    lab.green.set_mode("http_503")
    locked = d.wait_event("qos_locked")
    lab.lock_file.write_text("")
    said = d.wait_event(
        "alert", after=d.events().index(locked), where=lambda e: "overwritten" in e["reason"]
    )
    assert said["by"] == "external" and locked["reason"] in said["reason"], said
    assert guardctl("--config", str(lab.config_path), "qos", "status").returncode == 1
    # That lock removed in turn before the window passed (another tool done with it):
    # guardd's window went on beneath it, and its lock is back; deploys stay blocked.
    count = len(d.events())
    lab.lock_file.unlink()
    back = d.wait_event("qos_locked", after=count)
    assert back["by"] == "guardd" and back["reason"] == locked["reason"], back
    assert json.loads(lab.lock_file.read_text())["by"] == "guardd"
    assert guardctl("--config", str(lab.config_path), "qos", "status").returncode == 1
    assert d.stop() == 0


def test_guard_window_is_extended_when_slos_fail(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(
        qos__window="2s",
        policy__window="8s",
        policy__p0_error_ratio=1.0,
        policy__p1_error_ratio=1.0,
    )
    d = lab.daemon()
    lab.green.set_mode("http_503")
    locked = d.wait_event("qos_locked")
    lab.blue.set_mode("pattern", statuses=[503, 200, 200])  # 33 % errors on the active color
    ext = d.wait_event("qos_extended")
    assert "error ratio" in ext["reason"]
    assert ext["until"] > locked["until"]
    d.wait_event("alert", where=lambda e: "extended" in (e["reason"] or ""))
    assert lab.lock_file.exists()
    lab.blue.set_mode("ok")
    # Released only once a whole window passes with no rule firing: p2_error_ratio fires
    # until blue's errors leave its 8 s policy window, so the wait outlasts that window,
    # plus a guard window, plus room for a loaded machine.
    d.wait_event("qos_released", timeout=90)


def test_lock_survives_restart_and_a_cleared_run_dir(make_lab: MakeLab) -> None:
    # A restart quicker than three probe intervals moves no guard window; a slower one
    # would (the time guardd was down is not watched). At the lab's 200 ms probes a loaded
    # machine's stop and start took longer than 600 ms; at 1 s probes it has 3 s.
    lab: Lab = make_lab(qos__window="1h", probe__interval="1s")
    d = lab.daemon()
    lab.green.set_mode("http_503")
    d.wait_event("qos_locked")
    lock = json.loads(lab.lock_file.read_text())
    assert d.stop() == 0
    assert json.loads(lab.lock_file.read_text()) == lock, "a restart leaves the lock alone"
    lab.lock_file.unlink()  # a reboot clears /run
    d2 = lab.daemon()
    assert json.loads(lab.lock_file.read_text()) == lock, "restored from state.json"
    assert guardctl("--config", str(lab.config_path), "qos", "status").returncode == 1
    assert d2.stop() == 0
