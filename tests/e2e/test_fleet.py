"""Several guardd nodes, one decision: three real daemons, each with its own nginx in front
of the same blue and green upstreams, coordinated through a real 3-member etcd cluster."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.daemon import Daemon, Lab, guardctl, wait_until
from tests.harness.fleet import PREFIX, FleetLab
from tests.harness.upstream import Upstream

pytestmark = pytest.mark.nginx


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetLab]:
    made = FleetLab(tmp_path)
    try:
        yield made
    finally:
        made.close()


def applied(d: Daemon, generation: int) -> dict[str, Any]:
    return d.wait_event(
        "rollback_completed", timeout=60, where=lambda e: e.get("generation") == generation
    )


def test_green_fails_the_whole_fleet_rolls_back_once(fleet: FleetLab) -> None:
    fleet.start()
    assert all(lab.nginx.served_color() == "green" for lab in fleet.labs)
    fleet.green.set_mode("http_503")
    assert fleet.all_serve("blue")
    for d in fleet.daemons:
        done = applied(d, 1)
        assert done["from"] == "green" and done["to"] == "blue"
    status = fleet.fleet_status(0)
    assert status["rollbacks"] == 1
    assert status["desired"]["color"] == "blue" and status["desired"]["generation"] == 1
    assert status["leader"] in {"n0", "n1", "n2"}
    wait_until(
        lambda: all(n["generation"] == 1 for n in fleet.fleet_status(0)["nodes"]),
        30,
        "every node publishing generation 1",
    )
    assert {n["serving"] for n in fleet.fleet_status(0)["nodes"]} == {"blue"}
    # One rollback in the fleet's history, and no node applied a generation twice.
    for d in fleet.daemons:
        completed = [e for e in d.events() if e["event"] == "rollback_completed"]
        assert [e["generation"] for e in completed] == [1]


def test_qos_status_answers_from_the_fleets_lock_on_every_node(fleet: FleetLab) -> None:
    fleet.start()
    for lab in fleet.labs:
        out = guardctl("qos", "status", "--json", socket=lab.socket_path)
        assert out.returncode == 0, out
        assert json.loads(out.stdout)["source"] == "fleet"
    fleet.green.set_mode("http_503")
    assert fleet.all_serve("blue")

    def locked_everywhere() -> bool:
        for lab in fleet.labs:
            out = guardctl("qos", "status", "--json", socket=lab.socket_path)
            doc = json.loads(out.stdout)
            if out.returncode != 1 or doc["source"] != "fleet" or not doc["locked"]:
                return False
        return True

    wait_until(locked_everywhere, 60, "the fleet's lock on every node", poll=0.2)
    # The local lock file carries it too, so a CI gate reading the file is blocked.
    assert all(lab.lock_file.exists() for lab in fleet.labs)


def promote(lab: Lab) -> tuple[int, str]:
    """`guardctl promote` on `lab`, retried while green has not yet passed the local gate."""

    def attempt() -> tuple[int, str] | None:
        out = guardctl("promote", "--reason", "release 42", socket=lab.socket_path)
        said = out.stdout + out.stderr
        return None if "probes in a row" in said else (out.returncode, said)

    result: tuple[int, str] = wait_until(attempt, 60, "promote past the local gate", poll=0.3)
    return result


def test_a_node_whose_nginx_rejects_the_target_refuses_the_promote_fleet_wide(
    tmp_path: Path,
) -> None:
    fleet = FleetLab(tmp_path, active="blue")
    try:
        fleet.start()
        broken = fleet.labs[1].nginx.targets["green"]
        good = broken.read_text()
        broken.write_text("upstream lab_app { this is not nginx; }\n")
        code, said = promote(fleet.labs[0])
        assert code == 1, said
        assert "n1" in said and "not every node is ready" in said
        assert "n0" not in said.split("ready:", 1)[1] and "n2" not in said.split("ready:", 1)[1]
        for lab, d in zip(fleet.labs, fleet.daemons, strict=True):
            assert lab.nginx.wait_serving_only("blue", hold=0.3)
            assert lab.nginx.active_link.resolve() == lab.nginx.targets["blue"].resolve()
            assert not [e for e in d.events() if e["event"] in ("promote", "rollback_started")]
        assert PREFIX + "/desired" not in fleet.etcd.range(PREFIX + "/", prefix=True)
        # Fixed, the same promote goes through on every node as one generation.
        broken.write_text(good)
        code, said = promote(fleet.labs[2])
        assert code == 0, said
        assert fleet.all_serve("green")
        for d in fleet.daemons:
            done = d.wait_event("promote", timeout=60)
            assert done["generation"] == 1 and done["to"] == "green"
    finally:
        fleet.close()


def status_of(lab: Lab) -> dict[str, Any]:
    out = guardctl("status", "--json", socket=lab.socket_path)
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict), out
    return doc


def test_a_node_cut_off_from_etcd_keeps_its_color_then_converges(tmp_path: Path) -> None:
    fleet = FleetLab(tmp_path)
    try:
        proxy = fleet.through_proxy(2)
        fleet.start()
        cut = fleet.labs[2]
        proxy.stop()

        def says_unreachable() -> bool:
            warned = any("etcd is unreachable" in w for w in status_of(cut).get("warnings", []))
            assert cut.notify is not None
            seen = any("fleet=etcd-unreachable" in m for m in cut.notify.lines())
            return warned and seen

        wait_until(says_unreachable, 60, "the cut-off node's WARNING and STATUS=", poll=0.2)
        out = guardctl("status", socket=cut.socket_path)
        assert out.returncode == 1 and "etcd is unreachable" in out.stdout, out
        fleet.green.set_mode("http_503")
        assert fleet.labs[0].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        assert fleet.labs[1].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        applied(fleet.daemons[0], 1)
        applied(fleet.daemons[1], 1)
        # The cut-off node saw green fail too, but made no switch on its own.
        cut_d = fleet.daemons[2]
        wait_until(
            lambda: cut.nginx.served_color() is None, 30, "green failing through the cut-off node"
        )
        assert cut.nginx.active_link.resolve() == cut.nginx.targets["green"].resolve()
        assert not [e for e in cut_d.events() if e["event"].startswith("rollback")]
        proxy.start()
        assert cut.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        applied(cut_d, 1)
        wait_until(
            lambda: not any("etcd" in w for w in status_of(cut).get("warnings", [])),
            60,
            "the WARNING gone once etcd answers",
        )
    finally:
        fleet.close()


def test_the_leader_killed_mid_rollback_is_replaced_and_follows_when_back(
    fleet: FleetLab,
) -> None:
    fleet.start()
    old = fleet.leader()
    assert old is not None
    lab = fleet.labs[old]
    # The leader stops with the new link renamed in, before nginx is reloaded onto it.
    (lab.fault_dir / "after_renamed").write_text("")
    fleet.green.set_mode("http_503")
    wait_until((lab.fault_dir / "after_renamed.reached").exists, 60, "the leader mid-rollback")
    fleet.daemons[old].kill9()
    (lab.fault_dir / "after_renamed").unlink()
    others = [i for i in range(3) if i != old]
    wait_until(lambda: fleet.leader() not in (None, old), 60, "another leader", poll=0.1)
    for i in others:
        assert fleet.labs[i].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        applied(fleet.daemons[i], 1)
    restarted = lab.daemon()
    assert lab.nginx.wait_serving_only("blue", hold=0.3, timeout=60)
    wait_until(
        lambda: (
            {n["node"]: n["generation"] for n in fleet.fleet_status(others[0])["nodes"]}
            == {"n0": 1, "n1": 1, "n2": 1}
        ),
        60,
        "every node, the old leader too, at generation 1",
    )
    status = fleet.fleet_status(old)
    assert status["leader"] != f"n{old}"
    assert status["rollbacks"] == 1 and status["desired"]["generation"] == 1
    for d in [*fleet.daemons, restarted]:
        generations = [e["generation"] for e in d.events() if e["event"] == "rollback_completed"]
        assert len(generations) == len(set(generations)) and set(generations) <= {1}


def test_one_etcd_member_down_the_fleet_works_two_down_no_node_switches(
    fleet: FleetLab,
) -> None:
    fleet.start()
    fleet.etcd.kill(0)

    def fresh_everywhere() -> bool:
        # Each node's record is rewritten every round: fresh records are writes that passed.
        for i in range(3):
            doc = fleet.fleet_status(i)
            if not doc["etcd_reachable"] or doc["leader"] is None:
                return False
            if len(doc["nodes"]) != 3 or any(n["lease_age_s"] > 1 for n in doc["nodes"]):
                return False
        return True

    wait_until(fresh_everywhere, 60, "the fleet working on 2 of 3 etcd members", poll=0.2)
    assert not any(status_of(lab)["warnings"] for lab in fleet.labs)
    fleet.etcd.kill(1)

    def all_warn() -> bool:
        return all(
            any("etcd is unreachable" in w for w in status_of(lab)["warnings"])
            for lab in fleet.labs
        )

    wait_until(all_warn, 60, "every node saying etcd is unreachable", poll=0.2)
    fleet.green.set_mode("http_503")
    # Every node sees green fail past the rollback threshold, and none switches alone.
    wait_until(
        lambda: all(
            status_of(lab)["upstreams"]["green"]["consecutive_failures"] >= 6 for lab in fleet.labs
        ),
        60,
        "green failing on every node",
        poll=0.2,
    )
    for lab, d in zip(fleet.labs, fleet.daemons, strict=True):
        assert lab.nginx.active_link.resolve() == lab.nginx.targets["green"].resolve()
        assert not [e for e in d.events() if e["event"].startswith("rollback")]
        out = guardctl("fleet", "status", socket=lab.socket_path)
        assert out.returncode == 3 and "etcd is unreachable" in out.stdout, out
        assert lab.notify is not None
        assert any("fleet=etcd-unreachable" in m for m in lab.notify.lines())


def test_a_node_that_cannot_apply_the_rollback_is_reported_on_every_node(
    tmp_path: Path,
) -> None:
    fleet = FleetLab(tmp_path, switch__timeout="2s")
    try:
        fleet.start()
        fleet.labs[1].nginx.targets["blue"].write_text("upstream lab_app { not nginx; }\n")
        fleet.green.set_mode("http_503")
        assert fleet.labs[0].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        assert fleet.labs[2].nginx.wait_serving_only("blue", hold=0.3, timeout=60)
        fleet.daemons[1].wait_event("rollback_failed", timeout=60)

        def reported_everywhere() -> bool:
            for i, lab in enumerate(fleet.labs):
                if fleet.fleet_status(i)["alerts"] != ["n1"]:
                    return False
                if not any("node n1 serves green" in w for w in status_of(lab)["warnings"]):
                    return False
            return True

        wait_until(reported_everywhere, 60, "n1 reported as diverging on every node", poll=0.2)
        out = guardctl("fleet", "status", socket=fleet.labs[0].socket_path)
        assert out.returncode == 1 and "ALERT" in out.stdout, out
        for d in fleet.daemons:
            d.wait_event("alert", timeout=30, where=lambda e: "node n1 serves" in e["reason"])
    finally:
        fleet.close()


def test_a_reload_keeps_the_fleet_settings_until_the_next_start(fleet: FleetLab) -> None:
    fleet.start()
    lab, d = fleet.labs[0], fleet.daemons[0]
    lab.write_config(fleet__lease_ttl="3s", probe__timeout="900ms")
    d.signal(signal.SIGHUP)
    done = d.wait_event("config_reloaded", timeout=60)
    assert done["restart_required"] == ["fleet.lease_ttl"]
    assert "probe.timeout" in done["changed"]
    assert fleet.fleet_status(0)["etcd_reachable"] is True


def test_majority_quorum_one_nodes_view_does_not_switch_the_fleet(tmp_path: Path) -> None:
    fleet = FleetLab(tmp_path, fleet__quorum="majority")
    blind = Upstream("green", mode="http_503").start()
    try:
        fleet.start()
        leader = fleet.leader()
        assert leader is not None
        lab, d = fleet.labs[leader], fleet.daemons[leader]
        # Only the leader's probes see green fail: a blip of its own network, say.
        lab.green = blind
        lab.write_config()
        d.signal(signal.SIGHUP)
        d.wait_event("config_reloaded", timeout=60)
        wait_until(
            lambda: status_of(lab)["upstreams"]["green"]["consecutive_failures"] >= 6,
            60,
            "the leader seeing green fail",
            poll=0.2,
        )
        for other_lab, other in zip(fleet.labs, fleet.daemons, strict=True):
            assert other_lab.nginx.served_color() == "green"
            assert not [e for e in other.events() if e["event"].startswith("rollback")]
        assert PREFIX + "/desired" not in fleet.etcd.range(PREFIX + "/", prefix=True)
        # Every node sees it now: the majority is there, and the fleet rolls back once.
        fleet.green.set_mode("http_503")
        assert fleet.all_serve("blue")
        for node in fleet.daemons:
            applied(node, 1)
    finally:
        fleet.close()
        blind.stop()
