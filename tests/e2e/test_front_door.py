"""The front door (switch.verify_url) is watched all the time and weighed as evidence.

Real nginx, real upstreams, a real guardd: the front door and the active color's own
probes are made to disagree, and guardd must say so, re-apply the switch target once,
and hold if that does not settle it; a color never seen healthy is not rolled back
unless the front door agrees that it fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import Lab, MakeLab, guardctl, wait_until
from tests.harness.jsondoc import json_object
from tests.harness.nginx import free_port
from tests.harness.upstream import Mode, Upstream

pytestmark = pytest.mark.nginx


def ctl(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return guardctl("--config", str(lab.config_path), *argv)


def status(lab: Lab) -> dict[str, Any]:
    return json_object(ctl(lab, "status", "--json").stdout)


# A mismatch's episode ends once the front door and the probes have agreed for the policy
# window (`keep_firing_for`): a short one, for the tests that wait for it to end.
SHORT_EPISODES = {"policy__window": "3s"}


def is_mismatch(e: dict[str, Any]) -> bool:
    return e.get("event") == "alert" and str(e.get("reason", "")).startswith("mismatch:")


def test_link_flipped_by_hand_without_a_reload_is_caught_and_reapplied(make_lab: MakeLab) -> None:
    lab: Lab = make_lab(**SHORT_EPISODES)
    d = lab.daemon()
    count = len(d.events())
    # The link names blue, but nobody reloaded nginx: it still serves green.
    lab.nginx.active_link.unlink()
    lab.nginx.active_link.symlink_to(lab.nginx.targets["blue"])
    d.wait_event("external_switch", after=count)
    assert lab.nginx.served_color() == "green"
    lab.green.set_mode("http_503")
    alert = d.wait_event("alert", after=count, where=is_mismatch)
    assert "front door fails" in alert["reason"] and "blue" in alert["reason"]
    d.wait_event("alert", after=count, where=lambda e: e.get("reapplied") is True)
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    d.wait_event("alert", after=count, where=lambda e: "agree again" in e.get("reason", ""))
    assert wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK again")
    assert not [e for e in d.events()[count:] if e["event"] == "hold"]
    assert d.stop() == 0


@pytest.mark.parametrize("front_mode", ["http_503", "hang"])
def test_front_door_failing_while_probes_pass_holds_and_pages(
    make_lab: MakeLab, front_mode: Mode
) -> None:
    # The front door is another server that fails; green's own probes all pass.
    front = Upstream("front").start()
    try:
        front.set_mode(front_mode)
        lab: Lab = make_lab(switch__verify_url=front.url, **SHORT_EPISODES)
        d = lab.daemon()
        alert = d.wait_event("alert", where=is_mismatch)
        assert "front door fails" in alert["reason"] and "green" in alert["reason"]
        d.wait_event("alert", where=lambda e: e.get("reapplied") is True)
        hold = d.wait_event("hold", where=lambda e: "mismatch persists" in e["reason"])
        assert hold["from"] == "green"
        # A hanging front door answers (a timeout) once per timeout: between two answers
        # longer apart than three intervals it reads stale (healthy null), never healthy.
        doc = wait_until(
            lambda: (s := status(lab))["warnings"] and s["front_door"]["healthy"] is False and s,
            20,
            "a warning in status, the front door's last answer a failure",
        )
        assert doc["warnings"][0].startswith("mismatch:")
        assert doc["front_door"]["healthy"] is False
        assert ctl(lab, "status").returncode != 0
        assert "WARNING" in ctl(lab, "status").stdout
        assert lab.notify is not None
        lab.notify.wait_for(lambda m: m.startswith("STATUS=") and "front_door=mismatch" in m)
        assert not [e for e in d.events() if e["event"].startswith("rollback")]
        # The front door recovers: the mismatch and its hold end by themselves.
        count = len(d.events())
        front.set_mode("ok")
        d.wait_event("alert", after=count, where=lambda e: "agree again" in e.get("reason", ""))
        assert wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK again")
        assert status(lab)["warnings"] == []
        assert d.stop() == 0
    finally:
        front.stop()


def test_a_flapping_front_door_is_reapplied_and_paged_for_once(make_lab: MakeLab) -> None:
    # The front door fails and serves again in turn, each for a few answers, all within
    # the policy window: one episode, so one re-apply (an nginx reload) and one of each
    # page, not one per flap; it ends once the front door has served for a whole window.
    front = Upstream("front").start()
    try:
        lab: Lab = make_lab(switch__verify_url=front.url, policy__window="6s")
        d = lab.daemon()
        front.set_mode("http_503")
        d.wait_event("hold", where=lambda e: "mismatch persists" in e["reason"])
        # (Failing in other words each time: one page for the episode all the same.)
        modes: list[Mode] = ["ok", "json_down", "ok", "http_503", "ok", "json_down"]
        for mode in modes:
            front.set_mode(mode)  # (8 answers each: more than consecutive_failures)
            assert front.wait_for_requests(front.requests + 8, timeout=30)
        count = len(d.events())
        front.set_mode("ok")
        d.wait_event("alert", after=count, where=lambda e: "agree again" in e.get("reason", ""))
        said = [(e["event"], e.get("reason", "")) for e in d.events()]
        assert len([r for _, r in said if r.startswith("mismatch:")]) == 1, said
        assert len([e for e in d.events() if e.get("reapplied") is not None]) == 1, said
        assert len([r for ev, r in said if ev == "hold"]) == 1, said
        assert len([r for _, r in said if "agree again" in r]) == 1, said
        assert wait_until(lambda: ctl(lab, "status").returncode == 0, 20, "status OK again")
        assert d.stop() == 0
    finally:
        front.stop()


def test_mismatch_is_a_warning_in_status(make_lab: MakeLab) -> None:
    # Paused before the re-apply: the mismatch stands, and nothing holds yet.
    front = Upstream("front").start()
    try:
        front.set_mode("http_503")
        lab: Lab = make_lab(switch__verify_url=front.url)
        (lab.fault_dir / "before_reapply").touch()
        lab.daemon()
        wait_until((lab.fault_dir / "before_reapply.reached").exists, 30, "the re-apply")
        result = ctl(lab, "status")
        assert result.returncode == 1, result.stdout
        assert "WARNING" in result.stdout and "mismatch" in result.stdout
        (lab.fault_dir / "before_reapply").unlink()
    finally:
        front.stop()


def test_a_reapply_that_fails_holds_and_never_claims_it_ran(make_lab: MakeLab) -> None:
    # The front door fails; the re-apply meets a green file `nginx -t` refuses (broken by
    # a hand while guardd waited at the re-apply). The hold says so, never "after
    # re-applying".
    front = Upstream("front").start()
    try:
        front.set_mode("http_503")
        lab: Lab = make_lab(switch__verify_url=front.url)
        (lab.fault_dir / "before_reapply").touch()
        d = lab.daemon()
        wait_until((lab.fault_dir / "before_reapply.reached").exists, 30, "the re-apply")
        count = len(d.events())
        lab.nginx.targets["green"].write_text("upstream lab_app { this is not nginx }\n")
        (lab.fault_dir / "before_reapply").unlink()
        failed = d.wait_event("alert", after=count, where=lambda e: e.get("reapplied") is False)
        assert failed["reason"].startswith("re-applying green failed at test: "), failed
        hold = d.wait_event("hold", after=count)
        assert hold["reason"].startswith(f"mismatch persists, {failed['reason']}: "), hold
        assert "after re-applying" not in hold["reason"]
        assert status(lab)["state"] == "hold"
        assert lab.nginx.served_color() == "green"
        assert d.stop() == 0
    finally:
        front.stop()


@pytest.mark.parametrize("wrong", ["refused", "another_service"])
def test_typo_in_the_live_probe_url_alerts_instead_of_rolling_back(
    make_lab: MakeLab, tmp_path: Path, wrong: str
) -> None:
    other = Upstream("other").start()
    try:
        other.set_mode("json_down")
        lab: Lab = make_lab()
        typo = f"http://127.0.0.1:{free_port()}/healthz" if wrong == "refused" else other.url
        lab.config_path.write_text(lab.config_text().replace(lab.green.url, typo))
        d = lab.daemon()
        alert = d.wait_event(
            "alert", where=lambda e: "front door serves fine" in e.get("reason", "")
        )
        assert "check `upstreams.green.url`" in alert["reason"]
        # The mismatch runs its course (re-apply, then hold) without moving traffic.
        d.wait_event("hold", where=lambda e: "mismatch persists" in e["reason"])
        assert not [e for e in d.events() if e["event"].startswith("rollback")]
        assert lab.nginx.served_color() == "green"
        assert status(lab)["active"] == "green"
        assert d.stop() == 0
    finally:
        other.stop()


def test_never_seen_healthy_color_is_rolled_back_when_the_front_door_agrees(
    make_lab: MakeLab,
) -> None:
    # green fails from the start, and really does: the front door fails too.
    lab: Lab = make_lab()
    lab.green.set_mode("http_503")
    d = lab.daemon()
    done = d.wait_event("rollback_completed")
    assert done["from"] == "green" and done["to"] == "blue"
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert d.stop() == 0


def test_a_rollback_away_from_a_hung_color_verifies_though_the_first_answers_hang(
    make_lab: MakeLab,
) -> None:
    """Green takes requests and never answers. Right after nginx's reload an old worker may
    still take the verification's first connections and proxy them to green, hanging for
    all of probe.timeout, which here is the whole verify budget (half of switch.timeout):
    those are asked again beside, and the rollback verifies rather than being undone onto
    the hung color."""
    lab: Lab = make_lab(probe__timeout="2s", switch__timeout="4s")
    d = lab.daemon()
    assert lab.nginx.served_color() == "green"
    lab.green.set_mode("hang")
    done = d.wait_event("rollback_completed", timeout=60)
    assert done["from"] == "green" and done["to"] == "blue"
    assert not [e for e in d.events() if e["event"] in ("rollback_failed", "hold")]
    assert lab.nginx.wait_serving_only("blue", hold=0.5, timeout=20)
    assert d.stop() == 0
